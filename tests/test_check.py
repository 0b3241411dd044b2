"""The pre-flight check (``flkit check``, ``simulator_run(dry_run=True)``): one train task per
site, on the job's real script and first round, and every problem of every site listed with its
cause. Real runs on scikit-learn's digits (tests/scripts/preflight_digits.py; ``--fault`` makes
a site send one kind of bad result)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from flkit.cli import main
from flkit.errors import CheckFailedError
from flkit.job import FedAvgJob, FedAvgRecipe, ScriptRunner, SimEnv
from flkit.messages import Result
from flkit.server.preflight import examine

from conftest import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet  # noqa: E402

SCRIPT = str(SCRIPTS / "preflight_digits.py")


def _job(faults: dict[str, str] | None = None, n_clients: int = 1, num_rounds: int = 5) -> FedAvgJob:
    """A digits job: site-1.. run the good script, ``faults`` names sites with a fault."""
    job = FedAvgJob(name="preflight", initial_model=SmallNet(), n_clients=n_clients, num_rounds=num_rounds)
    job.to_clients(ScriptRunner(script=SCRIPT))
    for site, fault in (faults or {}).items():  # e.g. "nan", or "slow --sleep 2.5"
        job.to(ScriptRunner(script=SCRIPT, script_args=f"--fault {fault}"), site)
    return job


def _seen(workspace: Path, site: str) -> dict:
    return json.loads((workspace / site / "preflight.json").read_text())


def test_a_good_job_passes_and_its_script_trains_one_batch(tmp_path):
    job_dir = _job(n_clients=2).export_job(tmp_path / "jobs")
    ws = tmp_path / "ws"
    out = CliRunner().invoke(main, ["check", str(job_dir), "-w", str(ws), "-b", "threads", "--json",
                                    str(tmp_path / "check.json")])
    assert out.exit_code == 0, out.output
    assert "check passed: 2 site(s) OK" in out.output
    for site in ("site-1", "site-2"):
        assert _seen(ws, site) == {"dry_run": [True], "batches": [1]}  # one task, one batch
    found = json.loads((tmp_path / "check.json").read_text())
    assert found["passed"] is True and found["round"] == 0
    for site in found["sites"].values():
        assert (site["status"], site["params_type"], site["num_steps"]) == ("ok", "FULL", 1)
        assert set(site["metrics"]) == {"accuracy"} and site["seconds"] > 0
    # nothing of the check is kept as a result: no model aggregated, saved or promoted
    assert not list((ws / "server").glob("*.safetensors"))
    metrics = json.loads((ws / "server" / "metrics.json").read_text())
    assert metrics["best"] is None and [r["round"] for r in metrics["rounds"]] == [0]
    assert {site: (c["errors"], c["num_steps"]) for site, c in metrics["checks"].items()} == {
        "site-1": ([], 1), "site-2": ([], 1)}  # the server's findings, also in metrics.json


def test_each_problem_is_named_with_its_cause(tmp_path):
    faults = {"site-2": "layout", "site-3": "nan", "site-4": "no_metrics", "site-5": "no_steps", "site-6": "raise",
              "site-7": "diff_as_full"}
    job_dir = _job(faults).export_job(tmp_path / "jobs")
    before = set(Path(tempfile.gettempdir()).glob("flkit-check-*"))
    out = CliRunner().invoke(main, ["check", str(job_dir), "-b", "threads", "--json", str(tmp_path / "check.json")],
                             env={"COLUMNS": "300"})  # the table's lines unwrapped
    assert out.exit_code == 1, out.output
    assert "check failed: 5 of 7 site(s) have problems (site-2, site-3, site-4, site-6, site-7)" in out.output
    assert set(Path(tempfile.gettempdir()).glob("flkit-check-*")) == before  # without -w: a folder, removed
    sites = json.loads((tmp_path / "check.json").read_text())["sites"]
    status = {name: (s["status"], s["errors"], s["warnings"]) for name, s in sites.items()}
    assert status["site-1"] == ("ok", [], [])
    # every layout problem at once (in the global model's order), with the messages a run refuses the first with
    assert status["site-2"][1] == [
        "site site-2: result keys do not match the global model: missing ['bn.running_var']; "
        "unexpected ['head.weight']",
        "site site-2: tensor 'fc.bias' has dtype torch.float64, expected torch.float32",
        "site site-2: tensor 'fc.weight' has shape (10, 64), expected (10, 128)",
    ]
    assert status["site-3"][1] == ["site site-3: tensor 'conv.bias' has 1 non-finite value(s) (NaN or Inf)"]
    assert status["site-4"][1] == ["site site-4 reported no 'accuracy' metric (it sent no metrics); best-model "
                                   "selection ignores it"]
    # a missing NUM_STEPS_CURRENT_ROUND is a warning: the site passes, and the report says so
    assert status["site-5"][:2] == ("warning", [])
    assert status["site-5"][2] == ["site site-5: meta has no NUM_STEPS_CURRENT_ROUND: its aggregation weight "
                                   "defaults to 1, whatever it trained (send meta={'NUM_STEPS_CURRENT_ROUND': steps})"]
    (error,) = status["site-6"][1]
    assert error.startswith("script preflight_digits.py raised RuntimeError: the data loader broke\n")
    assert 'raise RuntimeError("the data loader broke")' in error  # the traceback's last lines
    (error,) = status["site-7"][1]
    assert error.startswith("site site-7: the result is sent as FULL params but looks like a difference")
    # the table: a row per site, its result and its problems (without repeating the site's name)
    rows = {line.split()[1]: line for line in out.output.splitlines() if line.startswith("│ site-")}
    assert "│ OK " in rows["site-1"] and "│ WARN " in rows["site-5"]
    for site, text in (("site-2", "│ result keys do not match"), ("site-3", "│ tensor 'conv.bias' has 1 non-finite"),
                       ("site-4", "│ reported no 'accuracy' metric"), ("site-5", "│ meta has no NUM_STEPS"),
                       ("site-6", "│ script preflight_digits.py raised RuntimeError"),
                       ("site-7", "│ the result is sent as FULL params")):
        assert "│ FAIL " in rows[site] or site == "site-5", rows[site]
        assert text in rows[site], rows[site]


def test_a_site_that_does_not_answer_in_time_is_named(tmp_path):
    job_dir = _job({"site-1": "slow --sleep 2.5"}).export_job(tmp_path / "jobs")
    out = CliRunner().invoke(main, ["check", str(job_dir), "-b", "threads", "--timeout", "1", "--json",
                                    str(tmp_path / "check.json")])
    assert out.exit_code == 1, out.output
    site = json.loads((tmp_path / "check.json").read_text())["sites"]["site-1"]
    assert site["errors"] == ["no answer within the check's timeout of 1 s: the script is stuck, or its task takes "
                              "longer (a script may train one batch when flare.is_dry_run())"]


def test_simulator_run_dry_run_returns_the_findings_or_raises_them(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("flkit-check-*"))
    result = _job({"site-2": "no_steps"}).simulator_run(dry_run=True, backend="threads", quiet=True)
    assert result.ok and result.check.passed  # a warning alone passes
    assert result.check.sites["site-1"].status == "ok"
    assert result.check.sites["site-2"].warnings[0].startswith("site site-2: meta has no NUM_STEPS_CURRENT_ROUND")
    assert set(Path(tempfile.gettempdir()).glob("flkit-check-*")) == before  # its temporary workspace is gone

    with pytest.raises(CheckFailedError) as raised:
        _job({"site-2": "nan"}).simulator_run(tmp_path / "ws", dry_run=True, backend="threads",
                                                        quiet=True)
    assert "site-2: tensor 'conv.bias' has 1 non-finite value(s)" in str(raised.value)
    assert raised.value.report.sites["site-2"].status == "failed"
    assert raised.value.report.sites["site-1"].status == "ok"


def test_is_dry_run_is_false_in_a_normal_run(tmp_path):
    _job(num_rounds=2).simulator_run(tmp_path / "ws", backend="threads", quiet=True)
    assert _seen(tmp_path / "ws", "site-1") == {"dry_run": [False, False], "batches": [45, 45]}  # every batch


def test_a_recipe_checks_on_the_processes_backend(tmp_path):
    """SimEnv(dry_run=True) on the simulator's default backend: each site's script runs in a worker
    process of its own, and sees the check there too."""
    recipe = FedAvgRecipe(name="preflight", min_clients=2, num_rounds=3, model=SmallNet(), train_script=SCRIPT,
                          per_site_config={"site-1": {}, "site-2": {"train_args": "--fault nan"}})
    env = SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim"), dry_run=True)
    run = recipe.execute(env)
    assert run.get_status() == "FINISHED:EXECUTION_EXCEPTION"
    check = env.results["preflight"].check
    assert check.sites["site-1"].status == "ok"
    assert check.sites["site-2"].errors == ["site site-2: tensor 'conv.bias' has 1 non-finite value(s) (NaN or Inf)"]
    for site in ("site-1", "site-2"):
        assert _seen(Path(run.get_result()), site) == {"dry_run": [True], "batches": [1]}


GLOBAL = {"w": torch.ones(4, 3), "b": torch.zeros(3), "n": torch.tensor(7)}
STEPS = {"NUM_STEPS_CURRENT_ROUND": 3}


def _trained(delta: float = 0.01) -> dict[str, torch.Tensor]:
    return {"w": GLOBAL["w"] + delta, "b": GLOBAL["b"] + delta, "n": GLOBAL["n"] + 3}


@pytest.mark.parametrize(("result", "errors", "warnings"), [
    (Result("t", "FULL", _trained(), {"accuracy": 0.5}, STEPS), [], []),
    (Result("t", "DIFF", {k: v - GLOBAL[k] for k, v in _trained().items()}, {"accuracy": 0.5}, STEPS), [], []),
    (Result("t", "DIFF", _trained(), {"accuracy": 0.5}, STEPS),
     ["site s: the result is sent as DIFF params but looks like full weights"], []),
    (Result("t", "FULL", dict(GLOBAL), {"accuracy": 0.5}, STEPS), [],
     ["site s: the result equals the model it received: the script trained nothing in this task"]),
    (Result("t", "DIFF", {k: torch.zeros_like(v) for k, v in GLOBAL.items()}, {"accuracy": 0.5}, STEPS), [],
     ["site s: the result is a DIFF of zeros: the script trained nothing in this task"]),
    (Result("t", "FULL", _trained(), {"accuracy": float("nan")}, {"NUM_STEPS_CURRENT_ROUND": -1}),
     ["site s: metric 'accuracy' must be a finite number, got nan",
      "site s: meta NUM_STEPS_CURRENT_ROUND must be a number >= 0, got -1"], []),
    (Result("t", "", None, {"accuracy": 0.5}, STEPS), ["site s: a train task must be answered with params"], []),
    (Result("t", "HALF", _trained(), {"accuracy": 0.5}, STEPS),
     ["site s: params_type 'HALF' is neither FULL nor DIFF"], []),
])
def test_examine_lists_what_a_run_refuses_and_what_it_takes_silently(result, errors, warnings):
    found = examine("s", result, GLOBAL, "accuracy")
    assert len(found.errors) == len(errors) and len(found.warnings) == len(warnings), (found.errors, found.warnings)
    for seen, expected in zip(found.errors + found.warnings, errors + warnings, strict=True):
        assert seen.startswith(expected), seen


def test_without_a_key_metric_a_result_without_metrics_is_a_warning():
    found = examine("s", Result("t", "FULL", _trained(), {}, STEPS), GLOBAL, None)
    assert (found.errors, found.warnings) == ([], ["site s sent no metrics (the job has no key_metric, so nothing "
                                                   "needs them)"])
