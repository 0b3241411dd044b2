"""simulate(): run an exported job on this machine: the server and every site in this process
(sites a ScriptRunner launches externally are processes of their own).

The server is the real gRPC server on loopback, so the simulator exercises the
same code paths as a deployment.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import re
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from flkit.client.settings import SiteSettings
from flkit.errors import ConfigError
from flkit.job.config import load_job
from flkit.runner import site_for
from flkit.runner.processes import sigterm_as_exit
from flkit.server.config import EVALUATE
from flkit.server.controller import RoundRecord
from flkit.server.persistor import STATE_FILE
from flkit.server.server import FLServer
from flkit.sim.backend import DEFAULT_BACKEND, TASKS_PER_WORKER, check_backend, default_workers, make_backend
from flkit.sim.check import CheckReport, build_report, check_workflow, print_report
from flkit.sim.pool import SitePool, SiteSpec
from flkit.sim.progress import RunDisplay, cross_site_table, evaluation_table, summary_table

log = logging.getLogger("flkit.sim")

# How long finished or failed jobs wait for site scripts to return before giving up on them.
SHUTDOWN_GRACE_S = 10.0
# Site errors printed in full in the summary; the others are counted.
MAX_ERRORS_SHOWN = 10


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
    # {evaluator_site: {model_name: {metric: value}}} when the job ran cross-site evaluation.
    cross_site_results: dict[str, Any] | None = None
    cross_site_path: Path | None = None
    # A dry run's findings (``simulate(dry_run=True)``); ``ok`` and ``reason`` are then its verdict.
    check: CheckReport | None = None
    # An evaluate-only job's report (what server/evaluation.json holds) and that file.
    evaluation: dict[str, Any] | None = None
    evaluation_path: Path | None = None


def parse_gpus(gpu: str | None) -> list[str]:
    """NVFlare's gpu string: "0,1" (one device per site, round-robin) or groups "[0,1],[2,3]"
    (a group per site). Without CUDA: a warning, and the sites run on the CPU."""
    if gpu is None or str(gpu).strip() == "":
        return []
    text = str(gpu).replace(" ", "")
    groups = re.findall(r"\[([0-9,]+)\]", text) if "[" in text else text.split(",")
    rest = re.sub(r"\[[0-9,]+\]", "", text).strip(",") if "[" in text else ""
    if rest or not groups or not all(re.fullmatch(r"[0-9]+(,[0-9]+)*", g) for g in groups):
        raise ConfigError(f"gpu must be device ids like '0,1' or groups like '[0,1],[2,3]', got {gpu!r}")
    import torch

    if not torch.cuda.is_available():
        warnings.warn(f"gpu={gpu!r} was given but CUDA is not available on this machine; the sites run on the CPU",
                      stacklevel=3)
        return []
    count = torch.cuda.device_count()
    bad = sorted({int(d) for g in groups for d in g.split(",") if int(d) >= count})
    if bad:
        raise ConfigError(f"gpu={gpu!r}: device(s) {bad} do not exist (this machine has {count} CUDA device(s))")
    return groups


# NVFlare's log modes, as levels of flkit's loggers.
_LOG_MODES = {"concise": logging.WARNING, "msg_only": logging.WARNING, "full": logging.INFO,
              "verbose": logging.DEBUG}


def apply_log_config(log_config: str | None) -> None:
    """A level name ("DEBUG", "INFO"...), NVFlare's mode ("concise", "msg_only", "full",
    "verbose") or a logging dictConfig file (JSON), as NVFlare's simulator takes."""
    if not log_config:
        return
    text = str(log_config)
    level = _LOG_MODES.get(text.lower(), logging.getLevelName(text.upper()))
    if isinstance(level, int):
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("flkit").setLevel(level)
        return
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"log_config {text!r} is no level, no NVFlare log mode ({', '.join(_LOG_MODES)}) and "
                          "no file")
    try:
        logging.config.dictConfig(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ConfigError(f"log_config {path}: not a usable logging dictConfig (JSON): {exc}") from None


def simulate(job_dir: str | Path, workspace: str | Path, n_clients: int | None = None,
             threads: int | None = None, gpu: str | None = None, quiet: bool = False,
             console: Console | None = None, clients: list[str] | None = None,
             log_config: str | None = None, strategy: str | None = None,
             strategy_args: dict[str, Any] | None = None, backend: str = DEFAULT_BACKEND,
             address: str = "127.0.0.1:0", tls: bool = False, dry_run: bool = False,
             check_timeout_s: float | None = None) -> SimulationResult:
    """Run the job in ``job_dir``; outputs go under ``workspace`` (``server/`` and one folder per site).

    ``backend`` runs the in-process sites' scripts: "processes" (the default: a pool of worker
    processes, each site-task in its own folder with fresh module globals and a seeded RNG, as on
    a machine of its own), "threads" (threads of this process, sharing its globals, folder and
    RNG), or "ray" (Ray actors; the ``flkit[ray]`` extra). ``threads``: the number of workers
    (default: the cores of this machine). With more sites than workers, a site's script runs once
    per task on whichever worker is free; otherwise each site keeps a worker and its script runs
    once for the job. Sites whose ScriptRunner launches an external process run as their own
    processes, whatever the backend. ``strategy``/``strategy_args``: use this registered strategy
    (or these arguments for the job's own) instead of what ``job.json`` names. ``address``: where the
    job's server listens ("host:port"; Ray workers on other nodes need a host they can reach). See
    ``FedJob.simulator_run`` for the other arguments. ``tls``: serve over mutual TLS with
    throwaway kits (``<workspace>/kits``): each site that connects by itself (an external process,
    a thread of its own) gets its own certificate; the pool's workers share a worker certificate,
    which acts only for the sessions the pool opened. For Ray workers on other nodes, whose links
    cross the network; the kits folder must be readable there at the same path.

    ``dry_run``: a pre-flight check instead of the job (``flkit check``): the job's first round
    only, a train task for every site (its script sees ``flare.is_dry_run()`` True), each result
    examined and every problem listed instead of refused, nothing aggregated and no model kept;
    ``check_timeout_s`` bounds each site's join and answer (default 300 s). The result's ``check`` holds the
    findings (``flkit.sim.check.CheckReport``), and ``ok``/``reason`` are its verdict: ok when no
    site has an error (a missing NUM_STEPS_CURRENT_ROUND is a warning).
    """
    console = console or Console(highlight=False, soft_wrap=True)
    apply_log_config(log_config)
    check_backend(backend)
    job = load_job(Path(job_dir))
    sites = job.resolve_sites(n_clients, clients)
    workflow = job.workflow_config(len(sites))
    if dry_run:
        workflow = check_workflow(workflow, check_timeout_s)
    chosen = job.make_strategy(strategy, strategy_args)
    initial_params, model_source = job.server_model()  # (a checkpoint that does not fit: before anything is cleared)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads (the number of workers) must be a whole number >= 1, got {threads!r}")
    workers = threads if threads is not None else default_workers()
    gpus = parse_gpus(gpu)
    workspace = Path(workspace).resolve()
    for name in ("server", *sites):  # a site folder that holds the job itself would be cleared with it
        if Path(job_dir).resolve().is_relative_to(workspace / name):
            raise ConfigError(f"the job folder {job_dir} lies in <workspace>/{name}, which the simulator writes "
                              f"(and clears); put the job elsewhere{' or rename the site' if name in sites else ''}")
    _clear_previous_run(workspace, list(sites), console, quiet)
    job_id = f"{job.name}-{secrets.token_hex(4)}"
    pooled = {name: runner for name, runner in sites.items() if not runner.launch_external_process}
    if backend == "threads" and len(pooled) <= workers:
        pooled = {}  # a thread per site for the whole job: the in-process runner as it always was
    kits = server_kit = None
    if tls:
        from flkit.deploy.kit import load_kit

        kits = _provision_kits(workspace / "kits", [s for s in sites if s not in pooled], address)
        server_kit = load_kit(kits / "server")
    # A progress bar over the rounds on an interactive terminal, else (and once a site draws a live
    # display of its own) a line per event.
    display = RunDisplay(console, quiet)
    server = FLServer(
        workflow,
        list(sites),
        initial_params,
        workspace / "server",
        job_id=job_id,
        on_event=display,
        job_name=job.name,
        strategy=chosen,
        address=address,
        # The pool runs at most TASKS_PER_WORKER site-tasks per worker at once; the others, one each.
        concurrent_sites=min(len(sites), len(sites) - len(pooled) + workers * TASKS_PER_WORKER),
        kit=server_kit,
        vouched_sites=frozenset(pooled),
        model_source=model_source,
    )
    del initial_params  # the server holds the model now
    address = server.start()
    if not quiet:
        how = (f"{backend} backend, {min(workers, len(pooled))} worker(s)" if pooled
               else "a thread per site" if any(not r.launch_external_process for r in sites.values())
               else "a process per site")
        work = (f"pre-flight check of round {workflow.start_round}" if dry_run
                else f"evaluate-only ({model_source['path'] if model_source else 'the initial model'})"
                if workflow.mode == EVALUATE else f"{workflow.num_rounds} round(s)")
        console.print(f"[bold]flkit simulator[/]: job {job_id}, {len(sites)} site(s) on {how}, "
                      f"{escape(work)}, server on {address}")
    # In-process sites use the memory transport (FLKIT_TRANSPORT=grpc forces the network path).
    transport = os.environ.get("FLKIT_TRANSPORT", "auto")
    runs = []
    pool: SitePool | None = None
    specs = []
    display.start()
    try:
        with sigterm_as_exit():  # SIGTERM still runs the `finally` below, which ends launched processes
            for i, (name, runner) in enumerate(sites.items()):
                site_transport = transport
                if name in pooled and backend != "threads" and transport == "memory":
                    site_transport = "auto"  # a worker process cannot share the server's memory
                kit = None if kits is None else str(kits / (WORKER_KIT if name in pooled else name))
                settings = SiteSettings(server=address, site_name=name, job_id=job_id, token=server.token or "",
                                        workspace=str(workspace / name), transport=site_transport, kit=kit)
                site_gpu = gpus[i % len(gpus)] if gpus else None
                if name in pooled:
                    settings = replace(settings, **runner.site_settings())
                    script = job.script_path(runner)
                    specs.append(SiteSpec(settings, script, list(runner.argv), site_gpu,
                                          (str(job.root.resolve()), str(script.parent))))
                    continue
                run = site_for(settings, runner, job.script_path(runner), job_root=job.root, gpu=site_gpu)
                run.start()
                runs.append(run)
            if specs:
                # Under the bar, worker processes write through this process (above the bar), not to the terminal.
                options = {"pipe_output": True} if backend == "processes" and display.drawing else {}
                pool = SitePool(server.service, make_backend(backend, **options), specs, workers, seed=workflow.seed,
                                shm=server.shm)
                pool.start()
            outcome = server.wait()
            grace = max([SHUTDOWN_GRACE_S, *(run.shutdown_timeout for run in runs)])
            deadline = time.monotonic() + grace
            if pool is not None:
                pool.stop(grace)
            for run in runs:
                if not run.join(max(0.0, deadline - time.monotonic())):
                    log.warning("site %s is still running %.0f s after the job ended; stopping it", run.site, grace)
    finally:
        try:
            if pool is not None:
                pool.stop(0.0)
            for run in runs:
                run.stop()
            server.stop()
        finally:
            display.stop()
    errors = {r.site: r.outcome.error for r in runs if r.outcome is not None and not r.outcome.ok}
    if pool is not None:
        errors.update(pool.errors)
    best = server.controller.selector.best
    cross_site = server.controller.cross_site
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
        cross_site_results=None if cross_site is None else cross_site.results,
        cross_site_path=None if cross_site is None else cross_site.path,
        evaluation=server.controller.evaluation,
        evaluation_path=server.controller.evaluation_path,
    )
    if dry_run:
        result.check = build_report(job.name, workflow, list(sites), server.controller, errors, outcome.reason)
        result.ok, result.reason = result.check.passed, result.check.verdict
        print_report(console, result.check)
        return result
    _print_summary(console, result)
    return result


def _clear_previous_run(workspace: Path, sites: list[str], console: Console, quiet: bool) -> None:
    """A workspace an earlier simulation wrote (it has server/round_state.json) starts clean: its
    server folder and this job's site folders go, so tracking files, logs and results of two runs
    never mix. Nothing is removed from a folder flkit did not write."""
    if not (workspace / "server" / STATE_FILE).is_file():
        return
    for name in ["server", *sites]:
        folder = workspace / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
    if not quiet:
        console.print(f"cleared the previous run's results in {workspace}")


def _print_summary(console: Console, result: SimulationResult) -> None:
    if result.evaluation is not None:
        console.print(evaluation_table(result.evaluation))
        console.print(f"evaluation -> {result.evaluation_path}")
    elif result.rounds:
        console.print(summary_table(result.rounds, result.key_metric))
    if result.cross_site_results:
        console.print(cross_site_table(result.cross_site_results))
        console.print(f"cross-site results -> {result.cross_site_path}")
    errors = list(result.site_errors.items())
    for site, error in errors[:MAX_ERRORS_SHOWN]:
        console.print(f"[bold red]{site} error:[/] {escape(error)}", highlight=False)
    if len(errors) > MAX_ERRORS_SHOWN:
        console.print(f"[bold red]... and {len(errors) - MAX_ERRORS_SHOWN} more site(s) with errors[/] "
                      f"(SimulationResult.site_errors; each round's failures are in server/{STATE_FILE})")
    if result.ok:
        console.print(f"[bold green]job completed[/]: {escape(result.reason)}", highlight=False)
        if result.best_round is not None:
            console.print(f"best model: round {result.best_round}, {result.key_metric}={result.best_score:.4f} "
                          f"-> {result.best_model_path}")
        if result.evaluation is None:
            console.print(f"final global model -> {result.global_model_path}")
    else:
        console.print(f"[bold red]job failed[/]: {escape(result.reason)}", highlight=False)


WORKER_KIT = "pool-worker"


def _provision_kits(folder: Path, own_sites: list[str], address: str) -> Path:
    """Throwaway kits for ``simulate(tls=True)``: the server, each site in ``own_sites`` (those that
    connect by themselves) and one worker kit for the pool's workers."""
    from flkit.deploy.project import parse_project
    from flkit.deploy.provision import provision_project

    host = address.rsplit(":", 1)[0].strip("[]")
    names = [host] if host not in ("", "0.0.0.0", "::", "localhost", "127.0.0.1") else []
    project = parse_project({"name": "simulation", "server": {"host": "localhost", "port": 8002, "names": names},
                             "sites": own_sites, "workers": [WORKER_KIT]})
    return provision_project(project, folder, force=True).out_dir
