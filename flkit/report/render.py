"""``flkit report``: a run's history (``metrics.json``) drawn as a PNG and a self-contained HTML page.

The picture has one panel per metric (each site's curve over the rounds and their mean; with
more than ``MAX_SITE_LINES`` sites, the mean and a min-max band instead of a line per site), the
best round marked, then the sites' participation and the time of each round. The HTML page holds
that picture (base64), the job's status, reason and best round, a table of rounds and one of
sites; it loads nothing from anywhere (no script, no font, no stylesheet from outside) and every
string taken from the file is escaped.

matplotlib (the ``flkit[report]`` extra) is imported only when drawing, with the Agg canvas and
no pyplot (no global figure state, no GUI backend).
"""

from __future__ import annotations

import base64
import html
import io
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flkit.atomic_file import atomic_write_bytes
from flkit.report.history import ReportError, Round, RunHistory, load_history

PNG_FILE = "report.png"
HTML_FILE = "report.html"
# More sites than this: the mean and a min-max band, not a line per site.
MAX_SITE_LINES = 20
# Metrics drawn (the key metric first); the others are only counted.
MAX_METRIC_PANELS = 8
# Rows of the HTML tables, and failures listed, at most (the rest are counted).
MAX_TABLE_ROWS = 2000
MAX_FAILURES_LISTED = 200
MAX_REASON_CHARS = 500
LABEL_CHARS = 40
DPI = 100

INSTALL_HINT = "pip install 'flkit[report]'"


@dataclass(frozen=True)
class ReportFiles:
    png: Path
    html: Path


def write_report(where: str | Path, out_dir: str | Path | None = None) -> ReportFiles:
    """Read ``metrics.json`` from ``where`` (a workspace, a server's folder or the file) and write
    ``report.png`` and ``report.html`` into ``out_dir`` (default: the folder of ``metrics.json``)."""
    history = load_history(where)
    out = Path(out_dir) if out_dir is not None else history.path.parent
    png = draw_png(history)
    try:
        out.mkdir(parents=True, exist_ok=True)
        png_path, html_path = out / PNG_FILE, out / HTML_FILE
        atomic_write_bytes(png_path, png, durable=False)
        atomic_write_bytes(html_path, render_html(history, png).encode("utf-8"), durable=False)
    except OSError as exc:
        raise ReportError(f"cannot write the report into {out}: {exc}") from None
    return ReportFiles(png_path, html_path)


# -- the picture ------------------------------------------------------------------------


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise ReportError(f"flkit report draws with matplotlib, which is not installed ({exc}): "
                          f"{INSTALL_HINT}") from None
    return matplotlib


def _label(text: str) -> str:
    """A name as matplotlib shows it: one line, printable, at most LABEL_CHARS characters."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= LABEL_CHARS else clean[:LABEL_CHARS - 3] + "..."


# Names are shown as they are: no $...$ mathtext, no TeX.
_RC = {"text.parse_math": False, "text.usetex": False, "font.size": 9}


def draw_png(history: RunHistory) -> bytes:
    """The report's picture as PNG bytes."""
    mpl = _matplotlib()
    with mpl.rc_context(_RC), warnings.catch_warnings():
        # A name in a script the font lacks (CJK, say) is drawn as boxes; the page shows it as it is.
        warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)
        fig = build_figure(history)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    return buf.getvalue()


def build_figure(history: RunHistory) -> Any:
    """The report's matplotlib Figure (Agg canvas, no pyplot): a panel per metric (at most
    MAX_METRIC_PANELS), then participation and time per round."""
    mpl = _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = history.metric_names()[:MAX_METRIC_PANELS]
    with mpl.rc_context(_RC):
        rounds = history.rounds
        panels = len(metrics) + 2 if rounds else 1
        fig = Figure(figsize=(11, max(5.0, 0.8 + 2.6 * panels)), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
        fig.suptitle(_label(f"flkit report: {history.job_id or history.path}") +
                     f"  ({history.status}, {len(rounds)} round(s))", fontsize=11)
        if not rounds:
            ax = axes[0]
            ax.text(0.5, 0.5, f"no rounds recorded (status: {_label(history.status)})", ha="center",
                    va="center", fontsize=12, transform=ax.transAxes)
            ax.set_axis_off()
        else:
            for ax, name in zip(axes, metrics, strict=False):
                _metric_panel(ax, history, name)
            _participation_panel(axes[len(metrics)], rounds)
            _time_panel(axes[len(metrics) + 1], rounds)
            for ax in axes:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(True, alpha=0.3)
                if history.best_round is not None:
                    ax.axvline(history.best_round, color="tab:orange", linestyle="--", linewidth=1.2, zorder=0)
            axes[-1].set_xlabel("round")
    return fig


def _metric_panel(ax: Any, history: RunHistory, name: str) -> None:
    rounds = history.rounds
    sites = history.site_names()
    reporting = [s for s in sites if any(r.metrics.get(s, {}).get(name) is not None for r in rounds)]
    if len(reporting) <= MAX_SITE_LINES:
        for site in reporting:
            xs, ys = _series(rounds, lambda r, s=site: r.metrics.get(s, {}).get(name))
            ax.plot(xs, ys, marker=".", linewidth=1, alpha=0.75, label=_label(site))
    else:
        xs, lows, highs = [], [], []
        for r in rounds:
            values = [v[name] for v in r.metrics.values() if v.get(name) is not None]
            if values:
                xs.append(r.round)
                lows.append(min(values))
                highs.append(max(values))
        ax.fill_between(xs, lows, highs, color="tab:blue", alpha=0.25, linewidth=0,
                        label=f"min-max over {len(reporting)} sites")
    xs, ys = _series(rounds, lambda r: r.mean.get(name))
    ax.plot(xs, ys, color="black", linewidth=2.2, marker="o", markersize=4, label="mean over sites")
    other = [(r.round, r.mean[name]) for r in rounds if r.task != "train" and r.mean.get(name) is not None]
    if other:
        ax.scatter([x for x, _ in other], [y for _, y in other], marker="D", s=45, color="tab:purple", zorder=5,
                   label="validation round")
    title = _label(name)
    if name == history.key_metric:
        better = "higher" if history.key_metric_mode == "max" else "lower"
        title += f" (key metric, {better} is better)"
        if history.best_round is not None and history.best_score is not None:
            ax.scatter([history.best_round], [history.best_score], marker="*", s=220, color="tab:orange",
                       edgecolors="black", zorder=6, label=f"best: round {history.best_round}")
            ax.annotate(f"best {history.best_score:.4g}\nround {history.best_round}",
                        (history.best_round, history.best_score), textcoords="offset points", xytext=(8, -24),
                        fontsize=8)
    ax.set_title(title, loc="left")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _series(rounds: list[Round], value: Any) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rounds:
        v = value(r)
        if v is not None:
            xs.append(r.round)
            ys.append(v)
    return xs, ys


def participation(r: Round) -> dict[str, int]:
    """Counts of one round: offered, answered (aggregated or skipped), failed, skipped, no answer."""
    offered = len(set(r.sites) | set(r.answered) | set(r.failed))
    answered = len(r.answered)
    skipped = len(set(r.skipped) & set(r.answered)) if r.answered else len(r.skipped)
    failed = len(r.failed)
    return {"offered": offered, "answered": answered, "aggregated": max(0, answered - skipped), "failed": failed,
            "skipped": skipped, "no answer": max(0, offered - answered - failed)}


def _participation_panel(ax: Any, rounds: list[Round]) -> None:
    xs = [r.round for r in rounds]
    counts = [participation(r) for r in rounds]
    bottom = [0] * len(rounds)
    for key, color in (("aggregated", "tab:green"), ("skipped", "tab:gray"), ("failed", "tab:red"),
                       ("no answer", "gold")):
        heights = [c[key] for c in counts]
        if any(heights):
            ax.bar(xs, heights, bottom=bottom, color=color, width=0.7, label=key)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.scatter(xs, [c["offered"] for c in counts], marker="_", s=300, color="black", zorder=5, label="offered")
    ax.set_ylim(0, max([c["offered"] for c in counts] + [1]) * 1.15)
    ax.set_title("participation: sites per round", loc="left")
    ax.set_ylabel("sites")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _time_panel(ax: Any, rounds: list[Round]) -> None:
    xs = [r.round for r in rounds]
    ax.bar(xs, [r.seconds for r in rounds], color="tab:blue", width=0.7, label="round")
    slowest = [(r.round, max(r.answered_after_s.values())) for r in rounds if r.answered_after_s]
    if slowest:
        ax.scatter([x for x, _ in slowest], [y for _, y in slowest], marker="v", color="black", zorder=5,
                   label="last answer")
    ax.set_title("time per round", loc="left")
    ax.set_ylabel("seconds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


# -- the page ---------------------------------------------------------------------------

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; } dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
td.text, th.text { text-align: left; overflow-wrap: anywhere; max-width: 40em; }
tr.best { background: #fff3d6; }
.note { color: #666; font-size: 0.9em; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def render_html(history: RunHistory, png: bytes) -> str:
    """The page: status, the picture (inline), the rounds and the sites. No script, nothing fetched."""
    metrics = history.metric_names()
    shown = metrics[:MAX_METRIC_PANELS]
    better = "higher" if history.key_metric_mode == "max" else "lower"
    if history.best_round is not None:
        best = f"round {history.best_round}"
        if history.key_metric and history.best_score is not None:
            best += f" ({history.key_metric} = {history.best_score:.4g}, {better} is better)"
    else:
        best = "none (no round scored a key metric)"
    title = f"flkit report: {history.job_id or history.path.name}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be loaded from anywhere: the picture is inline, and there is no script.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{_e(title)}</h1>",
        "<dl>",
        f'<dt>status</dt><dd id="status">{_e(history.status)}</dd>',
        f'<dt>reason</dt><dd id="reason">{_e(history.reason or "")}</dd>',
        f'<dt>best round</dt><dd id="best">{_e(best)}</dd>',
        f"<dt>key metric</dt><dd>{_e(history.key_metric or 'none')}</dd>",
        f"<dt>strategy</dt><dd>{_e(history.strategy)}</dd>",
        f"<dt>rounds</dt><dd>{len(history.rounds)} recorded"
        f"{'' if history.num_rounds is None else f' of {history.num_rounds} planned'}</dd>",
        f"<dt>sites</dt><dd>{len(history.site_names())}</dd>",
        f"<dt>source</dt><dd>{_e(history.path)}</dd>",
        "</dl>",
        f'<img id="chart" alt="{_e("metric curves per round, participation and time per round")}" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
    ]
    if len(metrics) > len(shown):
        out.append(f'<p class="note">{len(metrics) - len(shown)} more metric(s) not drawn: '
                   f"{_e(', '.join(metrics[len(shown):][:50]))}</p>")
    out += _rounds_table(history, shown)
    out += _sites_table(history)
    out += _failures(history)
    out.append(f'<p class="note">written by flkit report at '
               f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _rounds_table(history: RunHistory, metrics: list[str]) -> list[str]:
    key = history.key_metric or "score"
    head = ["round", "task", "offered", "answered", "failed", "skipped", f"{key} (score)", "best", "seconds"]
    out = ["<h2>Rounds</h2>", '<table id="rounds"><thead><tr>']
    out += [f'<th class="{"text" if h == "task" else "num"}">{_e(h)}</th>' for h in head]
    out += [f"<th>mean {_e(m)}</th>" for m in metrics]
    out.append("</tr></thead><tbody>")
    marked = False
    for r in history.rounds[:MAX_TABLE_ROWS]:
        c = participation(r)
        best_row = not marked and r.round == history.best_round
        marked |= best_row
        cells = [str(r.round), f'<td class="text">{_e(r.task)}</td>', str(c["offered"]), str(c["answered"]),
                 str(c["failed"]), str(c["skipped"]), _fmt(r.score), "*" if r.best else "", f"{r.seconds:.2f}"]
        cells += [_fmt(r.mean.get(m)) for m in metrics]
        row = "".join(cell if cell.startswith("<td") else f"<td>{cell}</td>" for cell in cells)
        out.append(f'<tr class="best">{row}</tr>' if best_row else f"<tr>{row}</tr>")
    out.append("</tbody></table>")
    if len(history.rounds) > MAX_TABLE_ROWS:
        out.append(f'<p class="note">{len(history.rounds) - MAX_TABLE_ROWS} more round(s) not listed</p>')
    out.append('<p class="note">score: the key metric of the model the sites received that round; '
               "best (*): a new best score when the round ended; the highlighted row is the best round.</p>")
    return out


def _sites_table(history: RunHistory) -> list[str]:
    sites = history.site_names()
    key = history.key_metric
    offered: dict[str, int] = {}
    answered: dict[str, int] = {}
    failed: dict[str, int] = {}
    latest: dict[str, float | None] = {}
    for r in history.rounds:
        for s in set(r.sites) | set(r.answered) | set(r.failed):
            offered[s] = offered.get(s, 0) + 1
        for s in r.answered:
            answered[s] = answered.get(s, 0) + 1
        for s in r.failed:
            failed[s] = failed.get(s, 0) + 1
        if key:
            for s, values in r.metrics.items():
                if values.get(key) is not None:
                    latest[s] = values[key]
    out = ["<h2>Sites</h2>", '<table id="sites"><thead><tr><th class="text">site</th><th>offered</th>'
           f"<th>answered</th><th>failed</th><th>latest {_e(key or 'key metric')}</th></tr></thead><tbody>"]
    for s in sites[:MAX_TABLE_ROWS]:
        out.append(f'<tr><td class="text">{_e(s)}</td><td>{offered.get(s, 0)}</td><td>{answered.get(s, 0)}</td>'
                   f"<td>{failed.get(s, 0)}</td><td>{_fmt(latest.get(s))}</td></tr>")
    out.append("</tbody></table>")
    if len(sites) > MAX_TABLE_ROWS:
        out.append(f'<p class="note">{len(sites) - MAX_TABLE_ROWS} more site(s) not listed</p>')
    return out


def _failures(history: RunHistory) -> list[str]:
    entries = [(r.round, site, reason) for r in history.rounds for site, reason in r.failed.items()]
    if not entries:
        return []
    out = ["<h2>Failures</h2>", '<table id="failures"><thead><tr><th>round</th><th class="text">site</th>'
           '<th class="text">reason</th></tr></thead><tbody>']
    for round_num, site, reason in entries[:MAX_FAILURES_LISTED]:
        short = reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + " ..."
        out.append(f'<tr><td>{round_num}</td><td class="text">{_e(site)}</td><td class="text">{_e(short)}</td></tr>')
    out.append("</tbody></table>")
    if len(entries) > MAX_FAILURES_LISTED:
        out.append(f'<p class="note">{len(entries) - MAX_FAILURES_LISTED} more failure(s) not listed</p>')
    return out
