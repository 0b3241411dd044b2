"""simulate(): run an exported job on this machine, every site a thread of this process.

The server is the real gRPC server on loopback, so the simulator exercises the
same code paths as a deployment.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from flkit.client.settings import SiteSettings
from flkit.errors import ConfigError
from flkit.job.config import load_job
from flkit.runner import site_for
from flkit.runner.processes import sigterm_as_exit
from flkit.server.controller import RoundRecord
from flkit.server.server import FLServer
from flkit.sim.progress import ProgressPrinter, summary_table

log = logging.getLogger("flkit.sim")

# How long finished or failed jobs wait for site scripts to return before giving up on them.
SHUTDOWN_GRACE_S = 10.0


@dataclass
class SimulationResult:
    ok: bool
    reason: str
    key_metric: str
    rounds: list[RoundRecord]
    best_round: int | None
    best_score: float | None
    global_model_path: Path
    best_model_path: Path
    workspace: Path
    site_errors: dict[str, str] = field(default_factory=dict)


def _parse_gpus(gpu: str | None) -> list[int]:
    if gpu is None or str(gpu).strip() == "":
        return []
    try:
        ids = [int(x) for x in str(gpu).split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"gpu must be a comma-separated list of device ids, got {gpu!r}") from None
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"gpu={gpu!r} was given but CUDA is not available on this machine")
    return ids


def simulate(job_dir: str | Path, workspace: str | Path, n_clients: int | None = None,
             threads: int | None = None, gpu: str | None = None, quiet: bool = False,
             console: Console | None = None) -> SimulationResult:
    """Run the job in ``job_dir`` with its sites as threads; outputs go under ``workspace``."""
    console = console or Console(highlight=False, soft_wrap=True)
    job = load_job(Path(job_dir))
    sites = job.resolve_sites(n_clients)
    workflow = job.workflow_config(len(sites))
    if threads is not None and threads < len(sites):
        raise ConfigError(
            f"threads={threads} is fewer than the {len(sites)} sites: every site's script runs for the whole job "
            "(launch_once=True), so each needs its own thread"
        )
    gpus = _parse_gpus(gpu)
    workspace = Path(workspace).resolve()
    job_id = f"{job.name}-{secrets.token_hex(4)}"
    server = FLServer(
        workflow,
        list(sites),
        job.initial_params(),
        workspace / "server",
        job_id=job_id,
        on_event=ProgressPrinter(console, quiet),
    )
    address = server.start()
    if not quiet:
        console.print(f"[bold]flkit simulator[/]: job {job_id}, {len(sites)} site(s), "
                      f"{workflow.num_rounds} round(s), server on {address}")
    runs = []
    try:
        with sigterm_as_exit():  # SIGTERM still runs the `finally` below, which ends launched processes
            for i, (name, runner) in enumerate(sites.items()):
                settings = SiteSettings(server=address, site_name=name, job_id=job_id, token=server.token,
                                        workspace=str(workspace / name))
                run = site_for(settings, runner, job.script_path(runner), gpu=gpus[i % len(gpus)] if gpus else None)
                run.start()
                runs.append(run)
            outcome = server.wait()
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            for run in runs:
                if not run.join(max(0.0, deadline - time.monotonic())):
                    log.warning("site %s is still running %.0f s after the job ended; stopping it", run.site,
                                SHUTDOWN_GRACE_S)
    finally:
        for run in runs:
            run.stop()
        server.stop()
    errors = {r.site: r.outcome.error for r in runs if r.outcome is not None and not r.outcome.ok}
    best = server.controller.selector.best
    result = SimulationResult(
        ok=not outcome.failed,
        reason=outcome.reason,
        key_metric=workflow.key_metric,
        rounds=list(server.controller.history),
        best_round=None if best is None else best.round,
        best_score=None if best is None else best.value,
        global_model_path=server.persistor.global_model_path,
        best_model_path=server.persistor.best_model_path,
        workspace=workspace,
        site_errors=errors,
    )
    _print_summary(console, result)
    return result


def _print_summary(console: Console, result: SimulationResult) -> None:
    if result.rounds:
        console.print(summary_table(result.rounds, result.key_metric))
    for site, error in result.site_errors.items():
        console.print(f"[bold red]{site} error:[/] {escape(error)}", highlight=False)
    if result.ok:
        console.print(f"[bold green]job completed[/]: {result.reason}")
        if result.best_round is not None:
            console.print(f"best model: round {result.best_round}, {result.key_metric}={result.best_score:.4f} "
                          f"-> {result.best_model_path}")
        console.print(f"final global model -> {result.global_model_path}")
    else:
        console.print(f"[bold red]job failed[/]: {escape(result.reason)}", highlight=False)
