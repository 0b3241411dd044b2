"""Terminal progress and the final summary of a job (rich)."""

from __future__ import annotations

import threading
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flkit.server.controller import RoundRecord


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


class ProgressPrinter:
    """Turns controller events into one line each; safe to call from any thread."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self._lock = threading.Lock()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        with self._lock:
            if kind == "site_failed":
                self.console.print(f"[bold red]{event['site']} failed:[/] {escape(event['reason'])}", highlight=False)
                return
            if self.quiet:
                return
            if kind == "round_started":
                label = (
                    f"final validation (after {event['total_rounds']} rounds)"
                    if event["task"] == "validate"
                    else f"round {event['round']} ({event['round'] + 1}/{event['total_rounds']})"
                )
                self.console.print(f"[bold]{label}[/]: {event['task']} on {len(event['sites'])} site(s)")
            elif kind == "result":
                metrics = ", ".join(f"{k}={v:.4g}" for k, v in event["metrics"].items()) or "no metrics"
                self.console.print(f"  {event['site']}: {metrics}", highlight=False)
            elif kind == "round_finished":
                rec: RoundRecord = event["record"]
                best = " [green]new best[/]" if rec.best else ""
                self.console.print(
                    f"  done in {rec.seconds:.1f} s: {event['key_metric']}={_fmt(rec.score)}{best}", highlight=False
                )


def summary_table(rounds: list[RoundRecord], key_metric: str) -> Table:
    table = Table(title="flkit job summary")
    table.add_column("round", justify="right")
    table.add_column("task")
    table.add_column("sites", justify="right")
    table.add_column(f"{key_metric} (received model)", justify="right")
    table.add_column("best")
    table.add_column("seconds", justify="right")
    for rec in rounds:
        table.add_row(
            str(rec.round), rec.task, str(len(rec.metrics)), _fmt(rec.score), "*" if rec.best else "",
            f"{rec.seconds:.1f}",
        )
    return table
