"""The ``flkit`` command: run exported jobs in the simulator, or as a real server and sites."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from flkit.errors import FLKitError

if TYPE_CHECKING:
    from flkit.deploy.kit import Kit


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
@click.option("--tls", is_flag=True,
              help="Serve over mutual TLS with throwaway kits (<workspace>/kits): each site that connects by itself "
                   "has its own certificate, the pool's workers a worker certificate. For Ray workers on other "
                   "nodes (the kits folder must be readable there at the same path).")
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
             address: str, workspace: Path, tls: bool, gpu: str | None, log_config: str | None,
             strategy: str | None, strategy_args: str | None, quiet: bool, verbose: int) -> None:
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
                     address=address, tls=tls)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(0 if result.ok else 1)


@main.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-n", "--n-clients", "n_clients", type=int, default=None,
              help="Number of sites (site-1..site-N) for jobs built with to_clients(); default: the job's.")
@click.option("-c", "--clients", default=None,
              help="Comma-separated site names instead of site-1..site-N.")
@click.option("-w", "--workspace", type=click.Path(path_type=Path), default=None,
              help="Where the check runs (default: a temporary folder, removed afterwards).")
@click.option("-b", "--backend", type=click.Choice(["processes", "threads", "ray"]), default="processes",
              show_default=True, help="Where the scripts run, as for `flkit simulate`.")
@click.option("--workers", "-t", "--threads", "threads", type=click.IntRange(min=1), default=None,
              help="Workers that run the sites' scripts (default: this machine's cores).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True,
              help="Seconds each site may take to join and to answer its task (its script's start included).")
@click.option("--gpu", default=None, help="CUDA devices given to sites round-robin, as for `flkit simulate`.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the findings to this file (JSON: per site its status, seconds, params type, "
                   "steps, metrics, errors and warnings).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def check(job_dir: Path, n_clients: int | None, clients: str | None, workspace: Path | None, backend: str,
          threads: int | None, timeout_s: float, gpu: str | None, json_file: Path | None, verbose: int) -> None:
    """Pre-flight check of the job in JOB_DIR before a long run: each site runs its real script on
    the job's first round once (the script sees flare.is_dry_run() True, so it may train on one
    batch), and every problem is listed per site instead of failing the job at the first one: key,
    shape and dtype mismatches against the global model, NaN or Inf (the tensor named), the key
    metric or all metrics missing, params sent as FULL or DIFF that hold the other, a script that
    raised (its last lines) or did not answer within --timeout. A result without
    NUM_STEPS_CURRENT_ROUND (the FedAvg weight then defaults to 1) is a warning. Nothing of the
    run is kept: no model is aggregated or saved.

    Exits 0 when no site has an error (warnings are shown), 1 otherwise.
    """
    from flkit.sim.check import check_workspace
    from flkit.sim.simulator import simulate as run

    _logging(verbose)
    names = None if clients is None else [c.strip() for c in clients.split(",") if c.strip()]
    console = Console(highlight=False, soft_wrap=True)
    try:
        with check_workspace(workspace) as folder:
            result = run(job_dir, folder, n_clients=n_clients, threads=threads, gpu=gpu, quiet=True,
                         console=console, clients=names, backend=backend, dry_run=True, check_timeout_s=timeout_s)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    assert result.check is not None
    if json_file is not None:
        json_file.write_text(json.dumps(result.check.to_json(), indent=2) + "\n")
    sys.exit(0 if result.ok else 1)


def _refuse_to_overwrite_an_interrupted_run(workspace: Path) -> None:
    """A run that stopped half-way (a crash, a kill) is not overwritten by a new start by mistake."""
    from flkit.server.persistor import STATE_FILE

    try:
        state = json.loads((workspace / STATE_FILE).read_text())
    except (OSError, ValueError):
        return
    if isinstance(state, dict) and state.get("status") == "running":
        raise click.ClickException(
            f"{workspace} holds a run of job {state.get('job_id')!r} that stopped after "
            f"{state.get('completed_rounds')} round(s) without ending: pass --resume to go on from there, or "
            "remove the folder (or choose another -w) to start over")


def _tls_choice(kit: Path | None, insecure: bool, token: str | None, need_token: bool = False) -> Kit | None:
    """The participant's kit (mutual TLS), or None for --insecure; exactly one must be chosen."""
    if kit is not None and insecure:
        raise click.UsageError("--kit and --insecure exclude each other")
    if kit is None and not insecure:
        raise click.UsageError("give a startup kit (--kit, made by `flkit provision`) for mutual TLS, or --insecure "
                               "for plain text with a shared token")
    if kit is None:
        logging.getLogger("flkit").warning(
            "plain-text gRPC (--insecure): traffic is not encrypted and anyone with the token can act as any site")
        if need_token and not token:
            raise click.UsageError("--insecure needs the server's token (--token or FLKIT_TOKEN)")
        return None
    if token:
        logging.getLogger("flkit").warning("--token (or FLKIT_TOKEN) is not used with a kit: the certificate is "
                                           "the credential")
    from flkit.deploy.kit import load_kit

    try:
        return load_kit(kit)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None


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
@click.option("--kit", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The server's startup kit (`flkit provision`, e.g. kits/server): mutual TLS, and each site "
                   "is who its certificate says. Sites added or revoked with `flkit provision` take effect "
                   "without a restart.")
@click.option("--insecure", is_flag=True,
              help="Serve plain-text gRPC without a kit; sites authenticate with a shared token (--token). "
                   "Only for trusted networks: anyone who reads the token can act as any site.")
@click.option("--token", envvar="FLKIT_TOKEN", default=None,
              help="With --insecure: the shared secret the sites must present (env FLKIT_TOKEN); generated and "
                   "printed if absent.")
@click.option("--upload-stall-timeout", "upload_stall_s", type=click.FloatRange(min=1), default=None,
              help="Seconds a result upload may receive nothing before it is cut off and its buffer given back "
                   "(default: the larger of 300 s and the job's heartbeat timeout).")
@click.option("--resume", is_flag=True,
              help="Go on from the last round completed in the workspace (after a crash or a stop): its global "
                   "model, best model, strategy state and round records; sites re-join by themselves.")
@click.option("--linger", type=float, default=None,
              help="Seconds to keep serving after the job ends so busy sites learn it and leave "
                   "(default: two heartbeat intervals + 5 s).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def server(job_dir: Path, host: str, port: int, n_clients: int | None, clients: str | None, workspace: Path,
           job_id: str | None, kit: Path | None, insecure: bool, token: str | None, upload_stall_s: float | None,
           resume: bool, linger: float | None, verbose: int) -> None:
    """Serve the job in JOB_DIR to remote sites, over mutual TLS with a startup kit (--kit), or
    plain text with a shared token (--insecure).

    With a kit and a job whose sites all run one script (to_clients), the job's sites are the
    project's provisioned sites unless -n/-c say otherwise, and a site added later joins from the
    next round on. Exits 0 when the job completed, 1 when it failed.
    """
    from flkit.job.config import load_job
    from flkit.server.server import FLServer
    from flkit.sim.progress import ProgressPrinter, cross_site_table, evaluation_table, summary_table

    _logging(max(verbose, 1))
    console = Console(highlight=False, soft_wrap=True)
    server_kit = _tls_choice(kit, insecure, token)
    try:
        job = load_job(job_dir)
        names = None if clients is None else [c.strip() for c in clients.split(",") if c.strip()]
        accept_new = False
        if server_kit is not None and names is None and n_clients is None and job.clients is not None:
            from flkit.deploy.kit import read_participants

            provisioned, _, revoked = read_participants(server_kit.path)
            names = [s for s in provisioned if s not in revoked]
            accept_new = True
        sites = job.resolve_sites(n_clients, names)
        workflow = job.workflow_config(len(sites))
        if not resume:
            _refuse_to_overwrite_an_interrupted_run(workspace)
        initial_params, model_source = job.server_model()
        srv = FLServer(workflow, list(sites), initial_params, workspace,
                       job_id=job_id or job.name, address=f"{host}:{port}", token=token,
                       on_event=ProgressPrinter(console), job_name=job.name, strategy=job.make_strategy(),
                       kit=server_kit, accept_new_sites=accept_new, resume=resume, upload_stall_s=upload_stall_s,
                       model_source=model_source)
        del initial_params  # the server holds the model now
        address = srv.start()
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    if srv.resumed_after is not None:
        console.print(f"resumed after round {srv.resumed_after}: {len(srv.controller.history)} round(s) done, "
                      f"going on with round {srv.controller.first_round}")
    link = "mutual TLS" if server_kit is not None else "plain text (--insecure)"
    console.print(f"serving job {srv.job_id} on {address} ({link}) for sites {', '.join(sites)}")
    if server_kit is None and token is None:
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
    if srv.controller.evaluation is not None:
        console.print(evaluation_table(srv.controller.evaluation))
        console.print(f"evaluation -> {srv.controller.evaluation_path}")
    else:
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
@click.option("--kit", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="This site's startup kit (`flkit provision`, e.g. kits/site-1): mutual TLS; the site is "
                   "the one its certificate names.")
@click.option("--server", "server_address", default=None,
              help="host:port of `flkit server` (default with --kit: the address the project was provisioned "
                   "for).")
@click.option("--site", default=None, help="This site's name, e.g. site-1 (with --kit: the kit's, which is the "
                                           "default).")
@click.option("--job-id", default=None, help="Job id (default: the job name).")
@click.option("--insecure", is_flag=True,
              help="Plain-text gRPC without a kit, authenticating with the server's token (--token).")
@click.option("--token", envvar="FLKIT_TOKEN", default=None,
              help="With --insecure: the server's site token (env FLKIT_TOKEN).")
@click.option("-w", "--workspace", type=click.Path(path_type=Path), default=None,
              help="This site's working folder (default: workspace/<site>).")
@click.option("--connect-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to keep trying to reach the server (while it starts, restarts or the network is "
                   "down) before failing.")
@click.option("--transport", envvar="FLKIT_TRANSPORT", type=click.Choice(["auto", "shm", "grpc"]), default="auto",
              show_default=True,
              help="How params travel (env FLKIT_TRANSPORT): auto (shared memory when the server is on this host "
                   "and offers it, else gRPC), shm, or grpc (always the network).")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def client(job_dir: Path, kit: Path | None, server_address: str | None, site: str | None, job_id: str | None,
           insecure: bool, token: str | None, workspace: Path | None, connect_timeout: float, transport: str,
           verbose: int) -> None:
    """Run this site's script from JOB_DIR against a remote `flkit server`, over mutual TLS with
    this site's startup kit (--kit), or plain text with the server's token (--insecure)."""
    from flkit.client.settings import SiteSettings
    from flkit.job.config import load_job
    from flkit.runner import site_for
    from flkit.runner.processes import sigterm_as_exit

    _logging(verbose)
    site_kit = _tls_choice(kit, insecure, token, need_token=True)
    if site_kit is not None:
        if site_kit.role != "site":
            raise click.ClickException(f"the kit at {kit} is the {site_kit.role} {site_kit.name}'s, not a site's")
        if site is not None and site != site_kit.name:
            raise click.ClickException(f"--site {site}: the kit at {kit} is {site_kit.name}'s (a site is the one "
                                       "its certificate names)")
        site = site_kit.name
        server_address = server_address or site_kit.server
    if site is None:
        raise click.UsageError("--site is needed with --insecure")
    if server_address is None:
        raise click.UsageError("--server HOST:PORT is needed with --insecure")
    run = None
    try:
        from flkit.server.config import check_site_name

        job = load_job(job_dir)
        sites = job.resolve_sites()
        runner = sites.get(check_site_name(site)) or job.clients
        if runner is None:
            raise FLKitError(f"site {site} has no runner in job {job.name} (sites: {', '.join(sites)})")
        settings = SiteSettings(server=server_address, site_name=site, job_id=job_id or job.name,
                                token=token or "", kit=None if kit is None else str(kit.resolve()),
                                workspace=str((workspace or Path("workspace") / site).resolve()),
                                connect_timeout_s=connect_timeout, transport=transport)
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


@main.command()
@click.option("-p", "--project", "project_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Project file (YAML: name, server {host, port, names}, sites, admins, valid_days, "
                   "ca_valid_days): create the root CA and every participant's kit.")
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output folder: ca/ (private, keep it here) and one kit folder per participant.")
@click.option("--add-site", "add_site", metavar="NAME", default=None,
              help="Issue a kit for a new site with the existing CA (no other kit changes).")
@click.option("--revoke", metavar="NAME", default=None,
              help="Revoke a site's or an admin's certificate (rewrites server/crl.pem and participants.json).")
@click.option("--renew", metavar="NAME", default=None,
              help="Issue a fresh certificate and key for a participant whose certificate expires.")
@click.option("--force", is_flag=True, help="With --project: replace an existing CA and all its kits.")
def provision(project_file: Path | None, out_dir: Path, add_site: str | None, revoke: str | None,
              renew: str | None, force: bool) -> None:
    """Create the project's root CA and a startup kit for the server, each site and each admin.

    \b
      flkit provision --project project.yml -o kits/   # CA + kits/server, kits/<site>, kits/<admin>
      flkit provision -o kits/ --add-site site-3       # one more site, same CA
      flkit provision -o kits/ --revoke site-2         # the server refuses site-2 from now on
      flkit provision -o kits/ --renew site-1          # new certificate for site-1

    Send each kit folder to its participant over a secure channel; kits/ca/ holds the CA's private
    key and never leaves this machine. A running server re-reads server/crl.pem and
    server/participants.json, so --add-site and --revoke need no restart.
    """
    from flkit.deploy import provision as deploy

    chosen = [opt for opt, value in (("--project", project_file), ("--add-site", add_site), ("--revoke", revoke),
                                     ("--renew", renew)) if value is not None]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --project, --add-site, --revoke, --renew"
                               + (f" (got {', '.join(chosen)})" if chosen else ""))
    if force and project_file is None:
        raise click.UsageError("--force only goes with --project (it replaces the CA and every kit)")
    console = Console(highlight=False, soft_wrap=True)
    try:
        if project_file is not None:
            result = deploy.provision(project_file, out_dir, force=force)
            console.print(f"project {result.project.name}: root CA in {result.ca_dir} (private: keep it here)")
            for name, kit in result.kits.items():
                console.print(f"  kit for {name} -> {kit}")
            console.print(f"certificates valid until {result.not_after:%Y-%m-%d}; send each kit folder to its "
                          "participant over a secure channel")
        elif add_site is not None:
            console.print(f"kit for new site {add_site} -> {deploy.add_site(out_dir, add_site)}")
            console.print(f"updated {out_dir / 'server' / 'participants.json'}: a running server picks it up "
                          "without a restart")
        elif revoke is not None:
            crl = deploy.revoke(out_dir, revoke)
            console.print(f"revoked {revoke}: rewrote {crl} and {crl.parent / 'participants.json'}; a running "
                          "server picks them up without a restart")
        elif renew is not None:
            console.print(f"new certificate for {renew} -> {deploy.renew(out_dir, renew)}; install that kit "
                          f"in place of the old one")
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("workspace", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write report.png and report.html into (made if missing; default: the folder "
                   "that holds metrics.json, <workspace>/server/).")
def report(workspace: Path, out_dir: Path | None) -> None:
    """Draw a run's history from WORKSPACE/server/metrics.json (WORKSPACE may also be a server's
    folder or the file itself): report.png and a self-contained report.html.

    The picture: each metric's curve per round (one line per site and their mean; with more than
    20 sites the mean and a min-max band), the best round marked, the sites offered, answered,
    failed and skipped in each round, and each round's time. The page: the picture, the job's
    status, reason and best round, a table of rounds and one of sites; it loads nothing from the
    network. Needs matplotlib: pip install 'flkit[report]'.
    """
    from flkit.report.render import write_report

    try:
        files = write_report(workspace, out_dir)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"report.png -> {files.png}")
    click.echo(f"report.html -> {files.html}")


@main.command()
@click.option("--kit", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="An admin's startup kit (e.g. kits/admin) to ask a running server; any other kit (or the "
                   "folder `flkit provision` wrote) shows its certificates' expiry only.")
@click.option("--server", "server_address", default=None,
              help="host:port of `flkit server` (default: the address the project was provisioned for).")
@click.option("--rounds", type=click.IntRange(min=1, max=1000), default=5, show_default=True,
              help="How many of the latest rounds to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the server.")
def status(kit: Path, server_address: str | None, rounds: int, as_json: bool, timeout: float) -> None:
    """Show a running server's job (connected sites, the round, the latest results) over mutual TLS
    with an admin certificate, and when certificates expire.

    Exits 1 when the server cannot be reached or refuses the certificate.
    """
    from flkit.deploy.kit import load_kit

    console = Console(highlight=False, soft_wrap=True)
    if (kit / "ca").is_dir():  # the provisioner's folder: every kit's certificate
        _print_kits(console, kit)
        return
    try:
        admin = load_kit(kit)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    console.print(f"{admin.role} {admin.name} of project {admin.project}: certificate valid until "
                  f"{admin.not_after:%Y-%m-%d %H:%M} UTC ({admin.days_left()} days left)")
    if admin.role != "admin":
        return
    from flkit.transport.grpc_transport import GrpcTransport

    address = server_address or admin.server
    link = GrpcTransport(address, admin)
    try:
        state = link.status(rounds, timeout)
    except FLKitError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        link.close()
    if as_json:
        click.echo(json.dumps(state, indent=2))
        return
    _print_status(console, address, state)


def _print_kits(console: Console, folder: Path) -> None:
    from rich.table import Table

    from flkit.deploy.kit import certificate_info

    table = Table(title=f"certificates in {folder}")
    for column in ("participant", "role", "valid until (UTC)", "days left"):
        table.add_column(column)
    for cert in sorted(folder.glob("*/cert.pem")):
        info = certificate_info(cert.read_bytes())
        left = (info["not_after"] - datetime.now(timezone.utc)).days
        table.add_row(info["name"], info["role"], f"{info['not_after']:%Y-%m-%d %H:%M}",
                      str(left) if left >= 0 else "[red]expired[/red]")
    console.print(table)


def _print_status(console: Console, address: str, state: dict[str, Any]) -> None:
    from rich.table import Table

    where = f"round {state['round']} ({state['task']})" if state.get("round") is not None else "between rounds"
    console.print(f"job {state['job_id']} on {address}: {state['phase']}, {where}; "
                  f"{state['completed_rounds']} of {state['last_round'] - state['first_round'] + 1} "
                  "round(s) done")
    if state.get("end_reason"):
        console.print(f"ended: {state['end_reason']}")
    best = state.get("best")
    if isinstance(best, dict):
        console.print(f"best {state['key_metric']}: {best['score']:.4g} in round {best['round']}")
    counts = state.get("site_counts") or {}
    console.print("sites: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    sites = Table(title="sites")
    for column in ("site", "status", "last seen", "this round", "failure"):
        sites.add_column(column)
    for site in state.get("sites") or []:
        seen = "" if site["last_seen_s"] is None else f"{site['last_seen_s']:g} s ago"
        sites.add_row(site["name"], site["status"], seen, site["task"] or "", (site["failure"] or "")[:80])
    console.print(sites)
    rounds = Table(title="latest rounds")
    for column in ("round", "task", "sites", "answered", "failed", "score", "best", "seconds"):
        rounds.add_column(column)
    for r in state.get("rounds") or []:
        rounds.add_row(str(r["round"]), r["task"], str(r["sites"]), str(r["answered"]), str(len(r["failed"])),
                       "" if r["score"] is None else f"{r['score']:.4g}", "*" if r["best"] else "",
                       f"{r['seconds']:.2f}")
    console.print(rounds)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
