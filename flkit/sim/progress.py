"""Terminal progress and the final summary of a job (rich)."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flkit.server.controller import RoundRecord
from flkit.server.listing import first_line


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# A round with more sites than this prints a count of its results, not a line per site; failures
# beyond this many per round are counted too.
MAX_SITE_LINES = 20


class ProgressPrinter:
    """Turns controller events into one line each; safe to call from any thread. With many sites,
    a round prints a line per site only up to MAX_SITE_LINES, then counts."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self._lock = threading.Lock()
        self._round_sites = 0  # sites of the current round
        self._results = 0
        self._failures = 0

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        with self._lock:
            if kind == "site_failed":
                self._failures += 1
                if self._failures <= MAX_SITE_LINES:
                    self.console.print(f"[bold red]{event['site']} failed:[/] {escape(event['reason'])}",
                                       highlight=False)
                elif self._failures == MAX_SITE_LINES + 1:
                    self.console.print("[bold red]more sites failed this round[/] (counted at its end)")
                return
            if self.quiet:
                return
            if kind == "round_started":
                if event.get("mode") == "evaluate":
                    label = "evaluation of the job's model"
                elif event["task"] == "validate":
                    label = f"final validation (after {event['total_rounds']} rounds)"
                else:
                    label = (f"round {event['round']} "
                             f"({event['round'] - event.get('first_round', 0) + 1}/{event['total_rounds']})")
                self.console.print(f"[bold]{label}[/]: {event['task']} on {len(event['sites'])} site(s)")
                self._round_sites, self._results, self._failures = len(event["sites"]), 0, 0
            elif kind == "result":
                self._results += 1
                if self._round_sites > MAX_SITE_LINES:
                    return
                metrics = ", ".join(f"{k}={v:.4g}" for k, v in event["metrics"].items()) or "no metrics"
                scored = f" scored {event['model_name']}" if event.get("model_name") else ""
                self.console.print(f"  {event['site']}{scored}: {metrics}", highlight=False)
            elif kind == "cross_site_started":
                self.console.print(f"[bold]cross-site evaluation[/] on {len(event['sites'])} site(s)")
                self._round_sites, self._results, self._failures = len(event["sites"]), 0, 0
            elif kind == "round_finished":
                rec: RoundRecord = event["record"]
                best = " [green]new best[/]" if rec.best else ""
                score = f": {event['key_metric']}={_fmt(rec.score)}{best}" if event["key_metric"] else ""
                counts = ""
                if self._round_sites > MAX_SITE_LINES or self._failures > MAX_SITE_LINES:
                    counts = f", {len(rec.metrics)} result(s), {len(rec.failed)} failure(s)"
                self.console.print(f"  done in {rec.seconds:.1f} s{counts}{score}", highlight=False)


def summary_table(rounds: list[RoundRecord], key_metric: str | None) -> Table:
    table = Table(title="flkit job summary")
    table.add_column("round", justify="right")
    table.add_column("task")
    table.add_column("sites", justify="right")
    table.add_column(f"{key_metric} (received model)" if key_metric else "score (no key_metric)", justify="right")
    table.add_column("best")
    table.add_column("seconds", justify="right")
    for rec in rounds:
        table.add_row(
            str(rec.round), rec.task, str(len(rec.metrics)), _fmt(rec.score), "*" if rec.best else "",
            f"{rec.seconds:.1f}",
        )
    return table


def cross_site_table(results: dict[str, dict[str, dict[str, float]]]) -> Table:
    """The cross-site matrix: one row per evaluating site, one column per model, every metric."""
    models = sorted({m for scores in results.values() for m in scores})
    table = Table(title="cross-site evaluation (rows: evaluating site)")
    table.add_column("site")
    for model in models:
        table.add_column(model, justify="right")
    for site, scores in results.items():
        cells = [", ".join(f"{k}={v:.4g}" for k, v in scores[m].items()) if m in scores else "-" for m in models]
        table.add_row(site, *cells)
    return table


# Longest failure reason shown in a table cell (the whole reason is in evaluation.json).
REASON_CHARS = 120
# Sites shown in the evaluation table (failed ones first, up to half of them); the rest are counted.
MAX_TABLE_SITES = 50


def evaluation_table(report: dict[str, Any]) -> Table:
    """An evaluate-only job's result (evaluation.json's content): one row per site, one column per
    metric, the mean row, and each failed site with its reason (beyond MAX_TABLE_SITES sites,
    a count of the others)."""
    metrics: dict[str, dict[str, float]] = report.get("metrics") or {}
    failed: dict[str, str] = report.get("failed") or {}
    names = sorted({m for scores in metrics.values() for m in scores})
    model = report.get("model") or {}
    title = "evaluation"
    if model.get("path"):
        title += f" of {model['path']}"
    if model.get("sha256"):
        title += f" (sha256 {model['sha256'][:12]})"
    table = Table(title=escape(title))
    table.add_column("site")
    for name in names:
        table.add_column(escape(name), justify="right")
    extra = [""] if failed else []
    if failed:
        table.add_column("failure")
    sites = list(report.get("sites") or [*metrics, *failed])
    shown = sites
    if len(sites) > MAX_TABLE_SITES:
        keep = set([s for s in sites if s in failed][: MAX_TABLE_SITES // 2])
        keep.update([s for s in sites if s not in keep][: MAX_TABLE_SITES - len(keep)])
        shown = [s for s in sites if s in keep]
    for site in shown:
        if site in metrics:
            table.add_row(escape(site), *(_fmt(metrics[site].get(n)) for n in names), *extra)
        elif site in failed:
            reason = first_line(failed[site])  # (a traceback follows it in evaluation.json)
            if len(reason) > REASON_CHARS:
                reason = reason[: REASON_CHARS - 3] + "..."
            table.add_row(escape(site), *("-" for _ in names), f"[red]{escape(reason)}[/red]")
    if len(shown) < len(sites):
        table.add_row(f"... {len(sites) - len(shown)} more", *("" for _ in names), *extra)
    mean = report.get("mean") or {}
    table.add_section()
    table.add_row(f"[bold]mean ({len(metrics)} site(s))[/bold]", *(_fmt(mean.get(n)) for n in names), *extra)
    return table
