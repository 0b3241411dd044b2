"""Where a recipe runs (NVFlare's execution envs) and the Run it returns.

- ``SimEnv``: flkit's simulator in this process (``FedJob.simulator_run``); ``execute`` returns
  when the job is over.
- ``PocEnv``: a proof-of-concept deployment on this host: ``flkit server`` and one
  ``flkit client`` per site, each a process of its own, talking gRPC on loopback.
  ``execute`` returns at once; ``Run.get_result()`` waits for the job.
- ``ProdEnv``: a provisioned deployment; it needs startup kits, which this version of flkit
  cannot make yet, so building one says so.

Results are kept: ``Run.get_result()`` is the job's workspace folder (``server/`` with the
global and best models, ``tb_events/``, ``cross_site_val/``; one folder per site). NVFlare's
PocEnv deletes its workspace at ``get_result(clean_up=True)``; flkit never deletes results.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
import sys
import threading
import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from flkit.compat import warn_if_set
from flkit.errors import ConfigError, FLKitError
from flkit.job.components import later
from flkit.job.config import site_names
from flkit.job.fed_job import FedJob
from flkit.runner import processes
from flkit.runner.external import STOP_GRACE_S
from flkit.runner.ports import free_port
from flkit.server.config import check_site_name

log = logging.getLogger("flkit.job")

RUNNING = "RUNNING"
COMPLETED = "FINISHED:COMPLETED"
ABORTED = "FINISHED:ABORTED"
FAILED = "FINISHED:EXECUTION_EXCEPTION"
# After the server process ended, how long the site processes get to leave by themselves.
SITE_EXIT_GRACE_S = 60.0


class ExecEnv(ABC):
    """NVFlare's ExecEnv: deploys a job and answers for it by job id."""

    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        self.extra = dict(extra or {})

    def get_extra_prop(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)

    @property
    def num_sites(self) -> int | None:
        """How many sites the env runs (None: the job decides)."""
        return None

    @abstractmethod
    def deploy(self, job: FedJob) -> str:
        """Start (or run) the job; returns its id."""

    @abstractmethod
    def get_job_status(self, job_id: str) -> str | None:
        """RUNNING, FINISHED:COMPLETED, FINISHED:ABORTED or FINISHED:EXECUTION_EXCEPTION."""

    @abstractmethod
    def abort_job(self, job_id: str) -> None:
        """Stop the job now."""

    @abstractmethod
    def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:
        """Wait for the job (``timeout`` seconds, 0: no limit); its result folder, or None on timeout."""

    def stop(self, clean_up: bool = False) -> None:  # noqa: B027 - an optional hook; most envs hold nothing
        """End whatever the env still runs; results are kept whatever ``clean_up`` says."""


def _sites(owner: str, num_clients: int | None, clients: list[str] | None) -> list[str] | None:
    if clients is not None:
        if not clients:
            raise ConfigError(f"{owner}: clients=[] names no site")
        names = [check_site_name(c) for c in clients]
        if len(set(names)) != len(names):
            raise ConfigError(f"{owner}: clients names a site twice: {names}")
        if num_clients and num_clients != len(names):
            raise ConfigError(f"{owner}: num_clients={num_clients} but {len(names)} client names were given")
        return names
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"{owner} needs num_clients >= 1 or a list of clients, got num_clients={num_clients!r}")
    return None


class SimEnv(ExecEnv):
    """Run the job in flkit's simulator, in this process, under ``<workspace_root>/<job name>``.

    ``num_threads``: the simulator's workers (default: the cores; see ``simulate``), on its default
    backend, worker processes;
    ``gpu_config``: CUDA devices for the sites ("0,1" or "[0,1],[2,3]"); ``log_config``: a level,
    an NVFlare log mode or a logging config file.
    ``dry_run=True`` (flkit's own): ``execute()`` runs the pre-flight check instead of the job (one
    train task per site, every problem listed: ``flkit check``); the Run's status is
    FINISHED:COMPLETED when no site has an error, and ``env.results[job name].check`` holds the
    findings.
    """

    def __init__(self, *, num_clients: int = 0, clients: list[str] | None = None, num_threads: int | None = None,
                 gpu_config: str | None = None, log_config: str | None = None,
                 workspace_root: str = "/tmp/flkit/simulation", extra: dict[str, Any] | None = None,
                 dry_run: bool = False) -> None:
        super().__init__(extra)
        self.dry_run = dry_run
        self.clients = _sites("SimEnv", num_clients, clients)
        self.num_clients = len(self.clients) if self.clients else num_clients
        self.num_threads = num_threads
        self.gpu_config = gpu_config
        self.log_config = log_config
        self.workspace_root = Path(workspace_root)
        self.results: dict[str, Any] = {}

    @property
    def num_sites(self) -> int:
        return self.num_clients

    def deploy(self, job: FedJob) -> str:
        """Simulate the whole job now. A failed job is a Run too (its status says so, after the
        simulator's summary), as with PocEnv; a job that cannot start raises."""
        self.results[job.name] = job.simulate(self.workspace_root / job.name,
                                              None if self.clients else self.num_clients, self.num_threads,
                                              self.gpu_config, self.log_config, clients=self.clients,
                                              dry_run=self.dry_run)
        return job.name

    def get_job_status(self, job_id: str) -> str | None:
        result = self.results.get(job_id)
        if result is None:
            return None
        return COMPLETED if result.ok else FAILED

    def abort_job(self, job_id: str) -> None:
        log.info("SimEnv: job %s ran to its end inside execute(); there is nothing to abort", job_id)

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:
        return str(self.workspace_root / job_id) if job_id in self.results else None


class PocEnv(ExecEnv):
    """A proof-of-concept deployment on this host: ``flkit server`` and ``flkit client`` processes.

    Each participant is a process of its own with its own folder under
    ``<workspace_root>/<job id>/`` (``server/``, ``site-1/``...; console output in ``logs/``);
    ``workspace_root`` defaults to ``$FLKIT_POC_WORKSPACE``, ``$NVFLARE_POC_WORKSPACE`` or ``/tmp/flkit/poc``,
    and they talk gRPC on loopback over mutual TLS with throwaway startup kits (``kits/``). ``gpu_ids``: CUDA devices given to
    the sites round-robin (``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(self, *, num_clients: int | None = 2, clients: list[str] | None = None,
                 gpu_ids: list[int] | None = None, use_he: bool = False, docker_image: str | None = None,
                 project_conf_path: str = "", username: str = "admin@nvidia.com", study: str = "default",
                 extra: dict[str, Any] | None = None, workspace_root: str | None = None) -> None:
        super().__init__(extra)
        if use_he:
            raise ConfigError(f"PocEnv(use_he=True): {later('homomorphic encryption')}")
        warn_if_set("PocEnv", locals(), {"docker_image": None, "project_conf_path": "",
                                         "username": "admin@nvidia.com", "study": "default"}, {
            "docker_image": "the server and sites run as processes on this host",
            "project_conf_path": "PocEnv starts its participants itself; there is nothing to provision",
            "username": "PocEnv has no admin console to log in to",
            "study": "PocEnv has no admin console to log in to",
        })
        self.clients = _sites("PocEnv", num_clients, clients) or site_names(num_clients)
        self.gpu_ids = [int(g) for g in gpu_ids or []]
        self.workspace_root = Path(workspace_root or os.environ.get("FLKIT_POC_WORKSPACE")
                                    or os.environ.get("NVFLARE_POC_WORKSPACE") or "/tmp/flkit/poc")
        self._jobs: dict[str, _PocJob] = {}

    @property
    def num_sites(self) -> int:
        return len(self.clients)

    def deploy(self, job: FedJob) -> str:
        job_id = f"{job.name}-{secrets.token_hex(4)}"
        root = self.workspace_root / job_id
        job_dir = job.export_job(root / "job", n_clients=len(self.clients))
        gpus = _visible_gpus(self.gpu_ids)
        poc = _PocJob(job_id, root, job_dir, self.clients, gpus)
        self._jobs[job_id] = poc
        poc.start()
        return job_id

    def _job(self, job_id: str) -> _PocJob:
        poc = self._jobs.get(job_id)
        if poc is None:
            raise FLKitError(f"PocEnv has no job {job_id!r}")
        return poc

    def get_job_status(self, job_id: str) -> str | None:
        return self._job(job_id).status()

    def abort_job(self, job_id: str) -> None:
        self._job(job_id).abort()

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:
        poc = self._job(job_id)
        return str(poc.root) if poc.wait(None if not timeout else timeout) else None

    def stop(self, clean_up: bool = False) -> None:
        for poc in self._jobs.values():
            poc.end_all()


class ProdEnv(ExecEnv):
    """A provisioned deployment (``flkit provision``): the job runs on `flkit server` and `flkit
    client` processes on their own hosts, over mutual TLS, and this env follows it with an admin's
    startup kit (``startup_kit_location``, e.g. ``kits/admin``).

    flkit's server serves one job folder, given when it starts, so ``deploy`` does not upload the
    job: it exports it under ``<workspace_root>/<job name>/`` and prints the exact commands that
    run it (the job folder is copied to the server and to each site; each runs with its own kit).
    From then on ``get_job_status``, ``get_job_result`` and ``abort_job`` ask the running server
    over mutual TLS (``server``: host:port, default the address the project was provisioned for).
    ``login_timeout``: seconds each call to the server may take. ``monitor_job_duration`` (NVFlare
    main's): seconds ``deploy`` waits for the server to start serving the job (None: it does not
    wait; 0: no limit).
    """

    def __init__(self, startup_kit_location: str, login_timeout: float = 5.0, username: str = "admin@nvidia.com",
                 study: str = "default", extra: dict[str, Any] | None = None, *, server: str | None = None,
                 workspace_root: str = "flkit_jobs", monitor_job_duration: float | None = None) -> None:
        super().__init__(extra)
        from flkit.deploy.kit import load_kit

        warn_if_set("ProdEnv", locals(), {"username": "admin@nvidia.com", "study": "default"}, {
            "username": "the admin is the one the startup kit's certificate names",
            "study": "flkit has no studies: a server serves one job",
        })
        if not login_timeout > 0:
            raise ConfigError(f"ProdEnv: login_timeout must be > 0 seconds, got {login_timeout!r}")
        self.kit = load_kit(startup_kit_location)
        if self.kit.role != "admin":
            raise ConfigError(f"ProdEnv: the kit at {startup_kit_location} is the {self.kit.role} {self.kit.name}'s; "
                              "ProdEnv needs an admin's startup kit (e.g. kits/admin)")
        self.server = server or self.kit.server
        self.login_timeout = float(login_timeout)
        self.workspace_root = Path(workspace_root)
        self.monitor_job_duration = monitor_job_duration
        self.exported: dict[str, Path] = {}

    GONE_S = 60.0  # get_job_result: how long a server seen running may stay silent

    def _ask(self, call: str, *args: Any) -> Any:
        from flkit.transport.grpc_transport import GrpcTransport

        link = GrpcTransport(self.server, self.kit)
        try:
            return getattr(link, call)(*args, self.login_timeout)
        finally:
            link.close()

    def deploy(self, job: FedJob) -> str:
        """Export the job and print how to run it; returns the job id the server will serve it as."""
        job_dir = job.export_job(self.workspace_root / job.name)
        self.exported[job.name] = job_dir
        kits = self.kit.path.parent
        host, port = self.server.rsplit(":", 1)
        print(f"Job '{job.name}' exported to {job_dir}. Copy that folder to the server and to every site, then run\n"
              f"  on the server ({host}):  flkit server {job_dir} --kit {kits / 'server'} --port {port} "
              f"-w workspace/server\n"
              f"  on each site:  flkit client {job_dir} --kit {kits}/<site> --server {self.server}\n"
              f"and follow it with `flkit status --kit {self.kit.path}`.")
        if self.monitor_job_duration is not None:
            self._wait_for_server(job.name)
        return job.name

    def _wait_for_server(self, job_id: str) -> None:
        limit = self.monitor_job_duration or None
        deadline = None if limit is None else time.monotonic() + limit
        while self.get_job_status(job_id) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise FLKitError(f"ProdEnv: no server served job {job_id} at {self.server} within {limit:g} s")
            time.sleep(1.0)

    def _status(self, job_id: str) -> dict[str, Any] | None:
        """The server's answer; None while no server answers (not started, restarting, or gone).
        A refusal (a revoked or unknown admin certificate, another CA) is raised, not waited out."""
        from flkit.messages import ErrorCode, ServiceError

        try:
            state: dict[str, Any] = self._ask("status", 1)
        except ServiceError as exc:
            if exc.code != ErrorCode.UNAVAILABLE or "handshake" in str(exc).lower():
                raise
            log.info("ProdEnv: server at %s: %s", self.server, exc)
            return None
        if state.get("job_id") != job_id:
            raise FLKitError(f"ProdEnv: the server at {self.server} serves job {state.get('job_id')!r}, not {job_id!r}")
        return state

    def get_job_status(self, job_id: str) -> str | None:
        """The job's status from its server; None while no server answers (not started yet, or ended)."""
        state = self._status(job_id)
        if state is None:
            return None
        phase = state.get("phase")
        if phase == "completed":
            return COMPLETED
        if phase == "failed":
            return ABORTED if str(state.get("end_reason", "")).startswith("aborted") else FAILED
        return RUNNING

    def abort_job(self, job_id: str) -> None:
        if self._status(job_id) is None:
            raise FLKitError(f"ProdEnv: no server answers for job {job_id} at {self.server}")
        self._ask("abort", f"aborted by admin {self.kit.name}")

    def get_job_result(self, job_id: str, timeout: float = 0.0) -> str | None:
        """Wait until the server says the job ended; its output folder on the server's host. The
        server answers until it exits (``--linger`` after the job's end): a server that stops
        answering for ``GONE_S`` seconds after it was seen running is an error, not a wait."""
        deadline = None if not timeout else time.monotonic() + timeout
        last_seen: float | None = None
        while True:
            state = self._status(job_id)
            now = time.monotonic()
            if state is not None:
                last_seen = now
                if state.get("phase") in ("completed", "failed"):
                    return str(state.get("output_dir"))
            elif last_seen is not None and now - last_seen > self.GONE_S:
                raise FLKitError(f"ProdEnv: the server of job {job_id} at {self.server} stopped answering before "
                                 "the job's end was read; its results are in the server's workspace")
            if deadline is not None and now >= deadline:
                return None
            time.sleep(1.0)


def _visible_gpus(gpu_ids: list[int]) -> list[int]:
    if not gpu_ids:
        return []
    import torch

    if not torch.cuda.is_available():
        warnings.warn(f"PocEnv gpu_ids={gpu_ids} were given but CUDA is not available on this machine; the sites "
                      "run on the CPU", stacklevel=4)
        return []
    return gpu_ids


class _PocJob:
    """The processes of one PocEnv job: the server and one client per site."""

    def __init__(self, job_id: str, root: Path, job_dir: Path, sites: list[str], gpus: list[int]) -> None:
        self.job_id = job_id
        self.root = root
        self.job_dir = job_dir
        self.sites = sites
        self.gpus = gpus
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}
        self.aborted = False
        self._lock = threading.Lock()

    def _popen(self, argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as out:
            return subprocess.Popen(argv, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _provision(self, port: int) -> Path:
        """Throwaway startup kits for this job's participants, so a PoC runs over mutual TLS as a
        real deployment does (``<root>/kits``; the CA's key never leaves this host)."""
        from flkit.deploy.project import parse_project
        from flkit.deploy.provision import provision_project

        project = parse_project({"name": "poc", "server": {"host": "localhost", "port": port},
                                 "sites": list(self.sites), "admins": ["admin"]})
        return provision_project(project, self.root / "kits", force=True).out_dir

    def start(self) -> None:
        port = free_port()
        kits = self._provision(port)
        env = {k: v for k, v in os.environ.items() if k != "FLKIT_TOKEN"}
        env["PYTHONUNBUFFERED"] = "1"
        flkit = [sys.executable, "-m", "flkit.cli"]
        with self._lock:
            self.server = self._popen([*flkit, "server", str(self.job_dir), "--host", "127.0.0.1", "--port", str(port),
                                       "--clients", ",".join(self.sites), "--workspace", str(self.root / "server"),
                                       "--job-id", self.job_id, "--kit", str(kits / "server")], "server", env)
            for i, site in enumerate(self.sites):
                site_env = dict(env)
                if self.gpus:
                    site_env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[i % len(self.gpus)])
                self.clients[site] = self._popen(
                    [*flkit, "client", str(self.job_dir), "--server", f"127.0.0.1:{port}", "--kit", str(kits / site),
                     "--job-id", self.job_id, "--workspace", str(self.root / site)], site, site_env)
        log.info("PocEnv: job %s started: server on 127.0.0.1:%d, sites %s; logs in %s", self.job_id, port,
                 ", ".join(self.sites), self.root / "logs")

    def status(self) -> str:
        if self.aborted:
            return ABORTED
        code = None if self.server is None else self.server.poll()
        if code is None:
            return RUNNING
        return COMPLETED if code == 0 else FAILED

    def wait(self, timeout: float | None) -> bool:
        """Wait for the server to end (the job's end), then for the sites to leave; True if over."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.server.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
        grace = time.monotonic() + SITE_EXIT_GRACE_S
        for site, proc in self.clients.items():
            try:
                proc.wait(max(0.0, grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("PocEnv: site %s did not leave %.0f s after the job ended; stopping it", site,
                            SITE_EXIT_GRACE_S)
        self.end_all()
        return True

    def abort(self) -> None:
        self.aborted = True
        self.end_all()

    def end_all(self) -> None:
        """SIGTERM (then SIGKILL) every process of the job that still runs, with what it started."""
        with self._lock:
            procs = [p for p in [self.server, *self.clients.values()] if p is not None and p.poll() is None]
        for proc in procs:
            processes.end_process_tree(proc, STOP_GRACE_S)


class Run:
    """A deployed job (NVFlare's Run): its id, its status, its result folder, abort."""

    def __init__(self, exec_env: ExecEnv, job_id: str) -> None:
        self.exec_env = exec_env
        self.job_id = job_id
        self._lock = threading.Lock()
        self._result: str | None = None
        self._stopped = False

    def get_job_id(self) -> str:
        return self.job_id

    def get_status(self) -> str | None:
        """RUNNING, FINISHED:COMPLETED, FINISHED:ABORTED or FINISHED:EXECUTION_EXCEPTION."""
        return self.exec_env.get_job_status(self.job_id)

    def get_result(self, timeout: float = 0.0, clean_up: bool = True) -> str | None:
        """Wait for the job (at most ``timeout`` seconds; 0: no limit) and return its result folder,
        or None on timeout. The folder is kept (``clean_up`` only ends leftover processes)."""
        with self._lock:
            if self._stopped:
                return self._result
            result = self.exec_env.get_job_result(self.job_id, timeout)
            if result is not None:
                self._result, self._stopped = result, True
                self.exec_env.stop(clean_up)
            return result

    def abort(self) -> None:
        """Stop the job now (its processes are ended)."""
        with self._lock:
            if not self._stopped:
                self.exec_env.abort_job(self.job_id)
