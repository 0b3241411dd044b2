"""Terminal progress and the final summary of a job (rich).

Two ways to show a running job: ``ProgressPrinter`` prints a line per event (a round started, a
site answered or failed, a round ended); ``RoundBar`` draws a progress bar over the rounds with
the best score so far. ``RunDisplay`` chooses: the bar only on an interactive terminal, and only
while no site draws a live display of its own (a rich Live such as Lightning's progress bar, or
a tqdm bar); otherwise lines, as always. Tests and CI, whose output is no terminal, see lines.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

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


# What a live display writes and a plain line never does: a carriage return that does not end a
# line (tqdm, Lightning's TQDM bar), cursor movement, erasing a line or hiding the cursor (rich's
# Live: Lightning's default RichProgressBar). Colours (ESC[...m) are not live displays.
LIVE_DISPLAY = re.compile(r"\r(?!\n)|\x1b\[(?:\?25[lh]|\d*[ABEFGK]|\d*;\d*H)")


def draws_bar(console: Console, quiet: bool = False) -> bool:
    """Whether the simulator draws a progress bar on ``console``: an interactive terminal (never a
    file, a pipe or a dumb terminal), and not ``quiet``."""
    return not quiet and console.is_terminal and console.is_interactive


class BarStream:
    """Stands for ``sys.stdout`` or ``sys.stderr`` while the bar is drawn. Whole lines written to it
    (by sites in threads, through ``flkit.runner.thread_io``'s prefixing stream; by the output
    pumps of launched processes and of the process backend's workers; by this process's own
    prints and logs) are printed above the bar; the first write that looks like a live display of
    its own (``LIVE_DISPLAY``) calls ``on_live`` first, and from the moment the bar is stopped
    (``release``) everything goes straight to the stream it stands for."""

    def __init__(self, inner: TextIO, console: Console, on_live: Callable[[], None],
                 lock: threading.RLock | None = None) -> None:
        """``lock``: held while a line is printed above the bar; the bar stops holding it, so that
        no line printed by another thread lands below the bar's last picture."""
        self.inner = inner
        self._console = console
        self._on_live = on_live
        self._lock = lock or threading.RLock()
        self._partial: dict[int, str] = {}  # per writing thread: a line not ended yet
        self.active = True

    def write(self, text: str) -> int:
        if self.active and LIVE_DISPLAY.search(text):
            self._on_live()  # stops the bar: this write and the next go straight through
        with self._lock:
            if not self.active:
                return self.inner.write(text)
            key = threading.get_ident()
            *lines, rest = (self._partial.pop(key, "") + text).split("\n")
            if rest:
                self._partial[key] = rest
            if lines:
                self._console.print(Text("\n").join(Text.from_ansi(line) for line in lines), soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if not self.active:
            self.inner.flush()

    def release(self) -> None:
        """Pass everything straight through from now on (the partial lines first)."""
        with self._lock:
            self.active = False
            partial, self._partial = list(self._partial.values()), {}
            for text in partial:
                self.inner.write(text)
            self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        if name == "rich_proxied_file":  # a site's rich Console must write through this stream, not past it
            raise AttributeError(name)
        return getattr(self.inner, name)


class RoundBar:
    """A progress bar over the job's rounds: the round and its task, the answers so far, the best
    key metric so far, the time elapsed. Failures are printed above it. ``start`` puts a
    ``BarStream`` in place of ``sys.stdout`` and ``sys.stderr``; ``stop`` takes it away again
    (unless something wrapped it since: then it only lets everything through)."""

    def __init__(self, console: Console, on_site_display: Callable[[], None]) -> None:
        file = console.file
        # A console of its own, bound to the stream the caller's console writes to now: it must
        # never write into a BarStream (which prints through it).
        self.console = Console(file=file, force_terminal=console.is_terminal, force_interactive=console.is_interactive,
                               color_system=console.color_system,  # type: ignore[arg-type]
                               width=None if _isatty(file) else console.width, highlight=False, soft_wrap=True)
        self._on_site_display = on_site_display
        self._failures = ProgressPrinter(self.console, quiet=True)  # failure lines only
        self._progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[answers]}", markup=False), TextColumn("{task.fields[best]}", markup=False),
            TimeElapsedColumn(), console=self.console, redirect_stdout=False, redirect_stderr=False,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task("starting the sites", total=None, answers="", best="")
        self._lock = threading.RLock()  # also the streams' printing lock (see BarStream)
        self._streams: list[tuple[str, BarStream]] = []
        self._handlers: list[tuple[logging.StreamHandler[Any], BarStream]] = []
        self._first_round: int | None = None
        self._sites = 0
        self._answers = 0
        self._best: tuple[float, int] | None = None
        self.started = False

    def start(self) -> None:
        with self._lock:
            for name in ("stdout", "stderr"):
                stream = BarStream(getattr(sys, name), self.console, self._on_site_display, self._lock)
                setattr(sys, name, stream)
                self._streams.append((name, stream))
            streams = [stream for _, stream in self._streams]
            self._progress.start()
            self.started = True
        # Logging handlers made before (Lightning's, a basicConfig) hold the stream itself. (Not
        # under the lock: a handler writes holding its own lock, and writing takes this one.)
        for handler in _stream_handlers():
            for stream in streams:
                if handler.stream is stream.inner:
                    handler.setStream(stream)  # type: ignore[arg-type]
                    self._handlers.append((handler, stream))

    def stop(self) -> None:
        with self._lock:
            if not self.started:
                return
            self.started = False
            self._progress.stop()
            for _, stream in self._streams:
                stream.release()
            handlers, self._handlers = self._handlers, []
        for handler, stream in handlers:
            if handler.stream is stream:
                handler.setStream(stream.inner)
        self.restore_streams()

    def restore_streams(self) -> None:
        """Put back ``sys.stdout``/``sys.stderr`` where they are still this bar's streams. One that
        something wrapped since (a site running in a thread) only lets everything through until
        that is unwrapped; call this again then."""
        with self._lock:
            kept = []
            for name, stream in self._streams:
                if getattr(sys, name) is stream:
                    setattr(sys, name, stream.inner)
                else:
                    kept.append((name, stream))
            self._streams = kept

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "site_failed":
            with self._lock:  # above the bar, or straight out once it stopped
                self._failures(event)
        elif kind == "round_started":
            if self._first_round is None:
                self._first_round = event.get("first_round", event["round"])
            total = event["total_rounds"]
            if event["task"] == "validate":
                what = f"final validation (after {total} rounds)"
            else:
                what = f"round {event['round']}: {event['task']}"
            self._sites, self._answers = len(event["sites"]), 0
            self._progress.update(self._task, description=what, total=total, answers=f"0/{self._sites} answered")
        elif kind == "result":  # from the sites' threads
            with self._lock:
                self._answers += 1
                answers = f"{self._answers}/{self._sites} answered"
            self._progress.update(self._task, answers=answers)
        elif kind == "cross_site_started":
            self._sites, self._answers = len(event["sites"]), 0
            self._progress.update(self._task, description="cross-site evaluation",
                                  answers=f"0/{self._sites} answered")
        elif kind == "round_finished":
            rec: RoundRecord = event["record"]
            if rec.best and rec.score is not None:
                self._best = (rec.score, rec.round)
            best = ""
            if self._best is not None and event["key_metric"]:
                best = f"best {event['key_metric']}={self._best[0]:.4f} (round {self._best[1]})"
            if rec.task == "train":
                done = rec.round - (self._first_round or 0) + 1
                self._progress.update(self._task, completed=done, best=best)
            else:
                self._progress.update(self._task, best=best)


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    """Every logging handler that writes to a stream (files too: the caller picks by stream)."""
    loggers: list[Any] = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: dict[int, logging.StreamHandler[Any]] = {}
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):  # a PlaceHolder has none
            if isinstance(handler, logging.StreamHandler):
                found[id(handler)] = handler
    return list(found.values())


def _isatty(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class RunDisplay:
    """What the simulator shows while a job runs (``on_event`` of its server): a ``RoundBar`` when
    ``draws_bar(console, quiet)``, else a ``ProgressPrinter``'s lines. The bar gives way to lines,
    for the rest of the run, as soon as a site draws a live display of its own: the first write of
    one (see ``BarStream``) stops the bar, and the round in progress is printed again as a line."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.lines = ProgressPrinter(console, quiet)
        self._lock = threading.RLock()
        self._bar: RoundBar | None = RoundBar(console, self.site_live_display) if draws_bar(console, quiet) else None
        self._round_started: dict[str, Any] | None = None  # the latest, to print when the bar gives way
        self._stopped: list[RoundBar] = []
        self.gave_way = False

    @property
    def drawing(self) -> bool:
        """Whether the bar is (to be) drawn: else lines."""
        return self._bar is not None

    def start(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.start()

    def stop(self) -> None:
        """The job's end (after its sites ended): stop the bar, give back the streams."""
        with self._lock:
            if self._bar is not None:
                self._bar.stop()
                self._bar = None
            for bar in self._stopped:  # a bar that gave way while sites in threads wrapped its streams
                bar.restore_streams()
            self._stopped = []

    def site_live_display(self) -> None:
        """A site draws a live display of its own: stop the bar and print lines from now on."""
        with self._lock:
            bar, self._bar = self._bar, None
            if bar is None:
                return
            bar.stop()
            self._stopped.append(bar)
            self.gave_way = True
            # Through the bar's console: bound to the terminal, so never prefixed with the site's name.
            bar.console.print("a site draws its own progress display: the simulator prints lines from here on",
                              style="dim", highlight=False)
            if self._round_started is not None:
                self.lines(self._round_started)

    def __call__(self, event: dict[str, Any]) -> None:
        with self._lock:
            if event["type"] in ("round_started", "cross_site_started"):
                self._round_started = event
            bar = self._bar
            if bar is None:
                self.lines(event)
                return
        bar(event)


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
