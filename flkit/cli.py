"""The ``flkit`` command: run exported jobs in the simulator, or as a real server and sites."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click
from rich.console import Console

from flkit.errors import FLKitError


def _logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="flkit")
def main() -> None:
    """flkit: federated learning for unchanged PyTorch scripts.

    Build a job folder with the job API (FedAvgJob(...).export_job(DIR)), then run it
    here with the simulator, or with `flkit server` and `flkit client` on real machines.
    """


@main.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-n", "--n-clients", "n_clients", type=int, default=None,
              help="Number of sites (site-1..site-N) for jobs built with to_clients(); default: the job's.")
@click.option("-c", "--clients", default=None,
              help="Comma-separated site names instead of site-1..site-N (e.g. hospital-a,hospital-b).")
@click.option("--workers", "-t", "--threads", "threads", type=click.IntRange(min=1), default=None,
              help="Workers that run the sites' scripts (default: this machine's cores). With more sites than "
                   "workers, a site's script runs once per task on a free worker; else each site keeps one. "
                   "-t/--threads is NVFlare's name for it.")
@click.option("-b", "--backend", type=click.Choice(["processes", "threads", "ray"]), default="processes",
              show_default=True,
              help="Where the scripts run: processes (each site-task in <workspace>/<site> with fresh module "
                   "globals and a seeded RNG), threads (threads of this process: fast, but sites share globals, "
                   "working directory and RNG), or ray (Ray actors, also on a multi-node cluster; needs "
                   "flkit[ray]).")
@click.option("--address", default="127.0.0.1:0", show_default=True,
              help="host:port the job's server listens on (port 0: a free one). For Ray workers on other "
                   "nodes, an address of this machine they can reach, e.g. 10.0.0.5:8002.")
@click.option("-w", "--workspace", type=click.Path(path_type=Path), default=Path("workspace"), show_default=True,
              help="Output folder: server/ holds the global and best models, site-N/ each site's files.")
@click.option("--gpu", default=None,
              help="CUDA devices given to sites round-robin: '0,1', or groups '[0,1],[2,3]'. Without CUDA: a "
                   "warning, and the sites run on the CPU.")
@click.option("-l", "--log-config", "log_config", default=None,
              help="A level (DEBUG, INFO...), an NVFlare log mode (concise, full, verbose) or a logging config "
                   "file (JSON dictConfig).")
@click.option("-s", "--strategy", default=None,
              help="Run with this registered strategy instead of the job's (e.g. fedavg; a custom one must be "
                   "registered by a file the job names).")
@click.option("--strategy-args", "strategy_args", default=None,
              help='The strategy\'s arguments as a JSON object, e.g. \'{"lr": 0.1}\' (default: the job\'s when '
                   "--strategy is not given, else none).")
@click.option("-q", "--quiet", is_flag=True, help="Only print failures and the final summary.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def simulate(job_dir: Path, n_clients: int | None, clients: str | None, threads: int | None, backend: str,
             address: str, workspace: Path, gpu: str | None, log_config: str | None, strategy: str | None,
             strategy_args: str | None, quiet: bool, verbose: int) -> None:
    """Run the job in JOB_DIR on this machine: the real server on loopback, and the sites' scripts
    on a pool of workers (--backend, --workers); sites whose runner launches an external process
    run as their own processes.

    Exits 0 when the job completed, 1 when it failed.
    """
    from flkit.sim.simulator import simulate as run

    _logging(verbose)
    names = None if clients is None else [c.strip() for c in clients.split(",") if c.strip()]
    args = None
    if strategy_args is not None:
        try:
            args = json.loads(strategy_args)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--strategy-args") from None
        if not isinstance(args, dict):
            raise click.BadParameter("must be a JSON object, e.g. '{\"lr\": 0.1}'", param_hint="--strategy-args")
    try:
        result = run(job_dir, workspace, n_clients=n_clients, threads=threads, gpu=gpu, quiet=quiet,
                     clients=names, log_config=log_config, strategy=strategy, strategy_args=args, backend=backend,
                     address=address)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8002, show_default=True, help="Port to listen on (0 picks a free one).")
@click.option("-n", "--n-clients", "n_clients", type=int, default=None, help="Number of sites (to_clients jobs).")
@click.option("-c", "--clients", default=None,
              help="Comma-separated site names instead of site-1..site-N (to_clients jobs).")
@click.option("-w", "--workspace", type=click.Path(path_type=Path), default=Path("workspace/server"),
              show_default=True, help="Where the global model, best model and round state are written.")
@click.option("--job-id", default=None, help="Job id the sites must present (default: the job name).")
@click.option("--token", envvar="FLKIT_TOKEN", default=None,
              help="Shared secret the sites must present (env FLKIT_TOKEN); generated and printed if absent.")
@click.option("--linger", type=float, default=None,
              help="Seconds to keep serving after the job ends so busy sites learn it and leave "
                   "(default: two heartbeat intervals + 5 s).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def server(job_dir: Path, host: str, port: int, n_clients: int | None, clients: str | None, workspace: Path,
           job_id: str | None, token: str | None, linger: float | None, verbose: int) -> None:
    """Serve the job in JOB_DIR to remote sites (insecure gRPC; TLS comes later)."""
    from flkit.job.config import load_job
    from flkit.server.server import FLServer
    from flkit.sim.progress import ProgressPrinter, cross_site_table, summary_table

    _logging(max(verbose, 1))
    console = Console(highlight=False, soft_wrap=True)
    try:
        job = load_job(job_dir)
        names = None if clients is None else [c.strip() for c in clients.split(",") if c.strip()]
        sites = job.resolve_sites(n_clients, names)
        srv = FLServer(job.workflow_config(len(sites)), list(sites), job.initial_params(), workspace,
                       job_id=job_id or job.name, address=f"{host}:{port}", token=token,
                       on_event=ProgressPrinter(console), job_name=job.name, strategy=job.make_strategy())
        address = srv.start()
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"serving job {srv.job_id} on {address} for sites {', '.join(sites)}")
    if token is None:
        console.print(f"site token: {srv.token}  (pass it to `flkit client --token` or FLKIT_TOKEN)")
    from flkit.runner.processes import sigterm_as_exit

    try:
        with sigterm_as_exit():  # SIGTERM still stops the server (and removes its /dev/shm folder)
            outcome = srv.wait()
            if not srv.drain(linger):
                console.print("some sites did not leave before the linger time ran out")
    except KeyboardInterrupt:
        outcome = None
    finally:
        srv.stop()
    console.print(summary_table(srv.controller.history, job.workflow.get("key_metric")))
    if srv.controller.cross_site is not None:
        console.print(cross_site_table(srv.controller.cross_site.results))
        console.print(f"cross-site results -> {srv.controller.cross_site.path}")
    if outcome is None or outcome.failed:
        console.print(f"job failed: {outcome.reason if outcome else 'interrupted'}")
        sys.exit(1)
    console.print(f"job completed: {outcome.reason}")


@main.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--server", "server_address", required=True, help="host:port of `flkit server`.")
@click.option("--site", required=True, help="This site's name, e.g. site-1.")
@click.option("--job-id", default=None, help="Job id (default: the job name).")
@click.option("--token", envvar="FLKIT_TOKEN", required=True, help="The server's site token (env FLKIT_TOKEN).")
@click.option("-w", "--workspace", type=click.Path(path_type=Path), default=None,
              help="This site's working folder (default: workspace/<site>).")
@click.option("--connect-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to keep trying to reach the server before failing.")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def client(job_dir: Path, server_address: str, site: str, job_id: str | None, token: str,
           workspace: Path | None, connect_timeout: float, verbose: int) -> None:
    """Run SITE's script from JOB_DIR against a remote `flkit server`."""
    from flkit.client.settings import SiteSettings
    from flkit.job.config import load_job
    from flkit.runner import site_for
    from flkit.runner.processes import sigterm_as_exit

    _logging(verbose)
    run = None
    try:
        from flkit.server.config import check_site_name

        job = load_job(job_dir)
        sites = job.resolve_sites()
        runner = sites.get(check_site_name(site)) or job.clients
        if runner is None:
            raise FLKitError(f"site {site} has no runner in job {job.name} (sites: {', '.join(sites)})")
        settings = SiteSettings(server=server_address, site_name=site, job_id=job_id or job.name, token=token,
                                workspace=str((workspace or Path("workspace") / site).resolve()),
                                connect_timeout_s=connect_timeout)
        with sigterm_as_exit():  # SIGTERM/Ctrl-C still end every process the site launched
            run = site_for(settings, runner, job.script_path(runner), job_root=job.root)
            run.start()
            run.join()
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if run is not None:
            run.stop()
    if run.outcome is None or not run.outcome.ok:
        click.echo(run.outcome.error if run.outcome else "site did not finish", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
