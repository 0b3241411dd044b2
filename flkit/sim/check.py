"""The pre-flight check (``flkit check``, ``simulate(dry_run=True)``): one train task per site
before a long run starts, with every problem of every site listed instead of the job failing at the
first one.

``check_workflow`` turns a job's workflow into the check's: its real first round only, every site
offered that round's task, no early stopping, no final validation or cross-site evaluation, no
tracking receivers, and ``dry_run`` set, so the server examines each result
(``flkit.server.preflight``) rather than aggregate it, promotes no best model, and each site's
script sees ``flare.is_dry_run()`` True. ``CheckReport`` gathers what each site did; it prints as
a table and writes as JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flkit.errors import ConfigError
from flkit.messages import TRAIN
from flkit.server.config import WorkflowConfig
from flkit.server.controller import Controller
from flkit.server.listing import first_line
from flkit.server.sites import SiteStatus

# How long a site's task may take in a check, by default (its script's start included).
DEFAULT_TIMEOUT_S = 300.0
# Lines of a script's traceback kept in the report (after its summary line).
TRACEBACK_LINES = 4

OK, WARNING, FAILED = "ok", "warning", "failed"


def check_workflow(workflow: WorkflowConfig, timeout_s: float | None = None) -> WorkflowConfig:
    """``workflow`` as a pre-flight check runs it: one round (the job's first), a train task for
    every site, ``timeout_s`` (default 300) for the sites to join and for each to answer, nothing kept."""
    if timeout_s is None:
        timeout_s = DEFAULT_TIMEOUT_S
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"the check's timeout must be a positive number of seconds, got {timeout_s!r}")
    return dataclasses.replace(
        workflow, dry_run=True, num_rounds=1,
        # Every site gets the task and none's failure ends the round early: each is checked.
        min_clients=1, mandatory_clients=[], clients_per_round=None, fraction=None,
        final_validation=False, cross_site_eval=None, stop_cond=None, patience=None,
        tracking=[], client_tracking=[],
        join_timeout_s=min(workflow.join_timeout_s, timeout_s), round_timeout_s=timeout_s,
    )


@contextlib.contextmanager
def check_workspace(workspace: str | Path | None) -> Iterator[Path]:
    """``workspace``, or (None) a temporary folder, removed afterwards: a check keeps nothing."""
    if workspace is not None:
        yield Path(workspace)
        return
    with tempfile.TemporaryDirectory(prefix="flkit-check-") as folder:
        yield Path(folder)


@dataclass
class SiteCheck:
    """What the check found for one site."""

    site: str
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float | None = None  # from the task going out to its answer being taken
    params_type: str | None = None
    num_steps: Any = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return FAILED if self.errors else WARNING if self.warnings else OK

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "seconds": self.seconds, "params_type": self.params_type,
                "num_steps": self.num_steps, "metrics": self.metrics, "errors": self.errors,
                "warnings": self.warnings}


@dataclass
class CheckReport:
    """The check of a job: per site, its problems (errors fail the check, warnings do not)."""

    job: str
    round: int
    timeout_s: float
    sites: dict[str, SiteCheck]
    reason: str  # how the check's one-round job ended

    @property
    def passed(self) -> bool:
        return all(not s.errors for s in self.sites.values())

    @property
    def verdict(self) -> str:
        failed = [s.site for s in self.sites.values() if s.errors]
        warned = [s.site for s in self.sites.values() if s.warnings and not s.errors]
        if failed:
            shown = ", ".join(failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
            return f"check failed: {len(failed)} of {len(self.sites)} site(s) have problems ({shown})"
        note = f", {len(warned)} with warnings" if warned else ""
        return f"check passed: {len(self.sites)} site(s) OK{note}"

    def problems(self) -> str:
        """Each failed site's errors, one per line (for an exception's message)."""
        return "\n".join(f"{s.site}: {_unnamed(error, s.site)}" for s in self.sites.values() for error in s.errors)

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "passed": self.passed, "verdict": self.verdict, "round": self.round,
                "timeout_s": self.timeout_s, "reason": self.reason,
                "sites": {name: s.to_json() for name, s in self.sites.items()}}


def script_error(error: str) -> str:
    """A script's failure as the report shows it: its summary line and the traceback's last lines."""
    lines = [line for line in error.strip().splitlines() if line != "Traceback (most recent call last):"]
    if len(lines) <= 1 + TRACEBACK_LINES:
        return "\n".join(lines)
    return "\n".join([lines[0], "...", *lines[-TRACEBACK_LINES:]])


def build_report(job: str, workflow: WorkflowConfig, sites: list[str], controller: Controller,
                 site_errors: dict[str, str], reason: str) -> CheckReport:
    """What the check's run shows per site: the findings of its result (``Controller.checks``), or
    why it has none (its script raised, never answered within the timeout, never joined)."""
    record = next((r for r in controller.history if r.task == TRAIN), None)
    timeout = float(workflow.round_timeout_s or 0.0)
    report = CheckReport(job, workflow.start_round, timeout, {}, reason)
    for site in sites:
        check = report.sites[site] = SiteCheck(site)
        found = controller.checks.get(site)
        if found is not None:
            check.errors, check.warnings = list(found.errors), list(found.warnings)
            check.params_type, check.num_steps, check.metrics = found.params_type, found.num_steps, found.metrics
            if record is not None:
                check.seconds = record.answered_after_s.get(site)
        if site in site_errors:  # (after its answer too: the script must also end cleanly)
            check.errors.append(script_error(site_errors[site]))
        if found is not None or site in site_errors:
            continue
        failure = None if record is None else record.failed.get(site)
        state = controller.registry.sites[site]
        if failure is not None and failure.startswith("no answer within round_timeout_s"):
            check.errors.append(f"no answer within the check's timeout of {timeout:g} s: the script is stuck, or "
                                "its task takes longer (a script may train one batch when flare.is_dry_run())")
        elif failure is not None or state.failure is not None:
            check.errors.append(script_error(failure or state.failure or ""))
        elif state.status == SiteStatus.EXPECTED:
            check.errors.append(f"never joined the job within the check's timeout of {timeout:g} s (does its "
                                "script call flare.init() and flare.receive()?)")
        elif record is not None and site not in record.sites:
            check.warnings.append(f"not checked: the job's strategy gave it no task in round {record.round}")
        else:
            check.errors.append(f"not checked: {first_line(reason)}")
    return report


def check_table(report: CheckReport) -> Table:
    """One row per site: OK, WARN or FAIL, its task's seconds, what it sent, and each problem."""
    table = Table(title=f"flkit check: job {report.job}, round {report.round}")
    table.add_column("site")
    table.add_column("result")
    table.add_column("seconds", justify="right")
    table.add_column("params")
    table.add_column("steps", justify="right")
    table.add_column("problems")
    label = {OK: "[green]OK[/]", WARNING: "[yellow]WARN[/]", FAILED: "[bold red]FAIL[/]"}
    for check in report.sites.values():
        problems = [f"[red]{escape(_unnamed(e, check.site))}[/]" for e in check.errors]
        problems += [f"[yellow]{escape(_unnamed(w, check.site))}[/]" for w in check.warnings]
        table.add_row(
            escape(check.site), label[check.status], "-" if check.seconds is None else f"{check.seconds:.1f}",
            check.params_type or "-", "-" if check.num_steps is None else escape(str(check.num_steps)),
            "\n".join(problems) or "-",
        )
    return table


def _unnamed(message: str, site: str) -> str:
    """``message`` without its leading "site NAME: " (the table's row names the site)."""
    for prefix in (f"site {site}: ", f"site {site} "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def print_report(console: Console, report: CheckReport) -> None:
    console.print(check_table(report))
    style = "bold green" if report.passed else "bold red"
    console.print(f"[{style}]{escape(report.verdict)}[/]", highlight=False)
