"""``flkit report``: a run's metrics.json drawn as report.png and a self-contained report.html.

A real simulation on digits writes metrics.json; the CLI draws it; the PNG is opened and checked
for its size and content, and the page is loaded in headless Chromium (Debian's ``chromium``
through Playwright's ``executable_path``; .ci/run installs it) with no console error, no page
error and no request that failed. Without Chromium or Playwright those checks skip, except under
``CI=true``, where they fail. Hostile and malformed files give escaped pages and clear errors.
"""

from __future__ import annotations

import html
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flkit.cli import main
from flkit.job import FedAvgJob, ScriptRunner
from flkit.report import history as history_module
from flkit.report.history import METRICS_FILE, ReportError, load_history
from flkit.report.render import MAX_SITE_LINES, build_figure, write_report

from conftest import SCRIPTS, with_flkit_import

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet  # noqa: E402

matplotlib_image = pytest.importorskip("matplotlib.image", reason="flkit[report] (matplotlib) is not installed")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# -- helpers -----------------------------------------------------------------------------


def _need_chromium():
    """Playwright's sync API, or a skip naming what is missing (a failure under CI=true)."""
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -e '.[dev]')"
    if why is None and not CHROMIUM.is_file():
        why = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if why is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the report page cannot be checked in a browser: {why}")
        pytest.skip(why)
    return sync_playwright


def load_in_chromium(page_path: Path) -> dict:
    """Open ``page_path`` in headless Chromium; what went wrong, the page's text and facts."""
    sync_playwright = _need_chromium()
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as user_data, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(user_data, executable_path=str(CHROMIUM),
                                                        args=CHROMIUM_ARGS, headless=True)
        try:
            page = context.new_page()
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} ({r.failure})"))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            facts = {
                "text": page.inner_text("body"),
                "best": page.inner_text("#best"),
                "chart_width": page.evaluate("document.getElementById('chart').naturalWidth"),
                "scripts": page.evaluate("document.scripts.length"),
                "requests": requests,
            }
        finally:
            context.close()
    facts["problems"] = problems
    return facts


def check_png(path: Path, charts: bool = True) -> None:
    """A PNG of at least 600x400 that is not blank: with ``charts``, many colours and a spread of
    values; else (text only) some ink on the white."""
    image = matplotlib_image.imread(str(path))
    height, width = image.shape[:2]
    assert width >= 600 and height >= 400, (width, height)
    pixels = image[:, :, :3].reshape(-1, 3)
    assert float(pixels.std()) > (0.05 if charts else 0.01), "the picture is blank"
    colours = {tuple(p) for p in (pixels[:: max(1, len(pixels) // 50_000)] * 255).round().astype(int).tolist()}
    assert len(colours) > (50 if charts else 5), f"the picture has only {len(colours)} colours"


def fake_metrics(n_sites: int, n_rounds: int, job_id: str = "many-sites", site_name=lambda i: f"site-{i + 1}",
                 failing: int = 0) -> dict:
    """A metrics.json in the shape flkit's server writes (test_report_of_a_real_simulation checks
    the keys against a real one)."""
    sites = [site_name(i) for i in range(n_sites)]
    rounds = []
    for r in range(n_rounds):
        failed = {s: f"site {s} failed in round {r}" for s in sites[:failing]}
        answered = sorted(s for s in sites if s not in failed)
        metrics = {s: {"accuracy": 0.5 + 0.4 * (1 - math.exp(-r)) + 0.001 * (i % 50), "loss": 2.0 / (r + 1 + i % 3)}
                   for i, s in enumerate(sites) if s in answered}
        mean = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in ("accuracy", "loss")}
        rounds.append({
            "round": r, "task": "train", "sites": sites, "answered": answered, "failed": failed,
            "skipped": {}, "weights": {s: 10.0 for s in answered},
            "answered_after_s": {s: 0.01 * (i + 1) for i, s in enumerate(answered)},
            "metrics": metrics, "mean": mean, "aggregated": None, "score": mean["accuracy"],
            "best": True, "seconds": 0.5 + 0.1 * r,
        })
    best = {"round": rounds[-1]["round"], "score": rounds[-1]["score"]} if rounds else None
    return {"job_id": job_id, "mode": "train", "key_metric": "accuracy", "key_metric_mode": "max", "strategy": "fedavg",
            "num_rounds": n_rounds, "status": "completed", "reason": f"completed {n_rounds} round(s)",
            "best": best, "rounds": rounds}


def _write(tmp_path: Path, data: object, name: str = METRICS_FILE) -> Path:
    folder = tmp_path / "ws" / "server"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _report_cli(*args: str):
    return CliRunner().invoke(main, ["report", *args], catch_exceptions=False)


# -- a real run ----------------------------------------------------------------------------


def test_report_of_a_real_simulation(tmp_path, monkeypatch):
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_fl.py", tmp_path / "user_code")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    job = FedAvgJob(name="report", initial_model=SmallNet(), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(script), script_args="--epochs 1"))
    result = job.simulator_run(tmp_path / "ws", quiet=True, backend="threads", threads=2)
    assert result.ok and result.best_round is not None

    written = json.loads((tmp_path / "ws" / "server" / METRICS_FILE).read_text())
    fake = fake_metrics(2, 1)
    assert set(written) == set(fake) and set(written["rounds"][0]) == set(fake["rounds"][0])

    run = _report_cli(str(tmp_path / "ws"))
    assert run.exit_code == 0, run.output
    png, page = tmp_path / "ws" / "server" / "report.png", tmp_path / "ws" / "server" / "report.html"
    assert f"report.png -> {png}" in run.output and f"report.html -> {page}" in run.output
    check_png(png)

    source = page.read_text()
    assert "http://" not in source and "https://" not in source and "<script" not in source
    facts = load_in_chromium(page)
    assert facts["problems"] == []
    assert facts["scripts"] == 0 and facts["chart_width"] >= 600
    assert all(url.startswith(("file:", "data:")) for url in facts["requests"]), facts["requests"]
    assert f"round {result.best_round}" in facts["best"]
    assert f"accuracy = {result.best_score:.4g}" in facts["best"]
    for site in ("site-1", "site-2"):
        assert site in facts["text"]
    assert "completed" in facts["text"]


def test_report_takes_the_server_folder_or_the_file_and_writes_where_told(tmp_path):
    path = _write(tmp_path, fake_metrics(3, 4))
    for where, out in ((path.parent, None), (path, tmp_path / "out" / "deeper")):
        run = _report_cli(str(where), *(["--out", str(out)] if out else []))
        assert run.exit_code == 0, run.output
        folder = out or path.parent
        check_png(folder / "report.png")
        assert (folder / "report.html").is_file()


def test_the_report_names_the_file_the_server_writes():
    from flkit.server.persistor import METRICS_FILE as SERVER_FILE

    assert METRICS_FILE == SERVER_FILE


# -- many sites ----------------------------------------------------------------------------


def test_many_sites_draw_a_mean_and_a_band_not_a_line_per_site(tmp_path):
    path = _write(tmp_path, fake_metrics(200, 6, failing=3))
    history = load_history(path)
    figure = build_figure(history)
    accuracy_axes = figure.axes[0]
    assert accuracy_axes.get_title(loc="left").startswith("accuracy")
    assert len(accuracy_axes.lines) <= 3  # the mean, the best round's marker line; no line per site
    assert accuracy_axes.collections, "no min-max band"
    labels = accuracy_axes.get_legend_handles_labels()[1]
    # 3 of the 200 sites fail every round: 197 report the metric.
    assert "min-max over 197 sites" in labels and not any(label.startswith("site-") for label in labels)

    files = write_report(path)
    check_png(files.png)
    page = files.html.read_text()
    assert "site-200" in page
    assert "site site-3 failed in round 5" in page

    few = build_figure(load_history(_write(tmp_path, fake_metrics(MAX_SITE_LINES, 3), "few.json")))
    site_lines = [line for line in few.axes[0].lines if line.get_label().startswith("site-")]
    assert len(site_lines) == MAX_SITE_LINES


# -- hostile and malformed files -----------------------------------------------------------

HOSTILE_SITE = "<script>alert(1)</script>"


def _hostile() -> dict:
    names = [HOSTILE_SITE, 'b"><img src=x onerror=alert(2)>', "$\\frac{a}{b}$ & co", "日本-site", "x" * 300]
    data = fake_metrics(len(names), 3, job_id="<b>job</b>", site_name=lambda i: names[i], failing=1)
    data["reason"] = "</dd><script>alert(3)</script> and a 'quote'"
    data["key_metric"] = "acc<u>"
    for r in data["rounds"]:
        for values in r["metrics"].values():
            values["acc<u>"] = values.pop("accuracy")
            values["<i>nan</i>"] = None
        r["mean"]["acc<u>"] = r["mean"].pop("accuracy")
    # Odd, yet in shape: a round with no answers, a failed site never offered, out-of-order rounds.
    data["rounds"].append({"round": 1, "task": "validate", "sites": [], "answered": [],
                           "failed": {"ghost": "<script>alert(4)</script>"}, "skipped": {}, "weights": {},
                           "answered_after_s": {}, "metrics": {}, "mean": {}, "aggregated": {}, "score": None,
                           "best": False, "seconds": 0})
    return data


def test_a_hostile_metrics_file_is_escaped_everywhere(tmp_path):
    path = _write(tmp_path, _hostile())
    files = write_report(path)
    check_png(files.png)
    page = files.html.read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>job" not in page and "<u>" not in page
    assert "<i>" not in page
    assert html.escape(HOSTILE_SITE) in page
    assert "&lt;/dd&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in page

    facts = load_in_chromium(files.html)
    assert facts["problems"] == []  # no alert dialog, no error
    assert facts["scripts"] == 0
    assert HOSTILE_SITE in facts["text"]  # shown as text
    assert "</dd><script>alert(3)</script>" in facts["text"]


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "the file must be a JSON object, not a list"),
    ('{"job_id": "x"}', "has no 'rounds'"),
    ('{"rounds": {}}', "rounds must be a JSON list, not an object"),
    ('{"rounds": [{"task": "train"}]}', "rounds[0].round must be a whole number, not null"),
    ('{"rounds": [{"round": 0, "task": "train", "metrics": {"s": {"acc": "high"}}}]}',
     "rounds[0].metrics['s']['acc'] must be a number, not a string"),
    ('{"rounds": [{"round": 0, "task": "train", "sites": "abc"}]}', "rounds[0].sites must be a JSON list"),
    ('{"rounds": [], "key_metric_mode": "sideways"}', "key_metric_mode must be 'max' or 'min'"),
    ('{"rounds": [], "best": {"round": true}}', "best.round must be a whole number, not a boolean"),
    ("[" * 100_000 + "]" * 100_000, "metrics"),
], ids=["not-json", "a-list", "no-rounds", "rounds-object", "no-round-number", "metric-string", "sites-string",
        "mode", "best-bool", "deep"])
def test_a_malformed_metrics_file_is_a_clear_error(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(ReportError) as info:
        load_history(tmp_path / "ws")
    assert str(path) in str(info.value) and message in str(info.value)
    run = _report_cli(str(tmp_path / "ws"))
    assert run.exit_code == 1 and "Error:" in run.output and str(path) in run.output
    assert not (path.parent / "report.html").exists()


def test_missing_and_oversized_files_are_clear_errors(tmp_path, monkeypatch):
    run = _report_cli(str(tmp_path / "nowhere"))
    assert run.exit_code == 1 and f"{tmp_path / 'nowhere'} does not exist" in run.output
    (tmp_path / "empty").mkdir()
    run = _report_cli(str(tmp_path / "empty"))
    assert run.exit_code == 1 and f"{tmp_path / 'empty' / 'server' / METRICS_FILE}" in run.output

    path = _write(tmp_path, fake_metrics(2, 2))
    monkeypatch.setattr(history_module, "MAX_BYTES", 100)
    with pytest.raises(ReportError, match="more than the 100 a report reads"):
        load_history(path)


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch):
    path = _write(tmp_path, fake_metrics(2, 2))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    run = _report_cli(str(path))
    assert run.exit_code == 1 and "pip install 'flkit[report]'" in run.output


def test_a_run_that_failed_before_its_first_round_still_gets_a_report(tmp_path):
    data = fake_metrics(2, 0)
    data.update(status="failed", reason="fewer than min_clients=2 sites can take part", best=None)
    files = write_report(_write(tmp_path, data))
    check_png(files.png, charts=False)
    page = files.html.read_text()
    assert "fewer than min_clients=2 sites can take part" in page and "none (no round scored" in page
