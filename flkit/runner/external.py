"""Run a site's script as an external process (``python3 -u``, ``torch.distributed.run``...).

The launched script's rank 0 talks to the server itself; it finds its job through FLKIT_*
environment variables (``SiteSettings.to_env``), never through pickle. This module watches
the process: a non-zero exit of any rank (torchrun exits non-zero then), or a script that
never calls ``flkit.init()`` within ``init_timeout_s``, fails the site's task at once, with
the exit status and the last lines of stderr. Stopping the site ends every process the
command started.

``launch_once=False`` launches the script once per task: between launches this runner keeps
the site in the job (joined, heartbeating) and asks for the next task's header only.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from flkit.client import supervision
from flkit.client.session import Session
from flkit.client.settings import SiteSettings
from flkit.errors import ConfigError, FLKitError
from flkit.runner import processes
from flkit.runner.outcome import SiteOutcome, report_site_failure
from flkit.runner.ports import PORT_PLACEHOLDER, fill_port, free_port

log = logging.getLogger("flkit.runner")

STOP_GRACE_S = 10.0
INIT_POLL_S = 0.2
# torch.distributed variables of the launcher itself must not leak into the script's ranks.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


class ExternalSite:
    """One site's script as a process tree, watched until it ends (see the module doc)."""

    def __init__(self, settings: SiteSettings, script: Path, argv: list[str], command: str,
                 launch_once: bool = True, init_timeout_s: float = 300.0, gpu: int | None = None) -> None:
        self.settings = settings
        self.script = Path(script).resolve()
        self.argv = list(argv)
        self.command = command
        self.launch_once = launch_once
        self.init_timeout_s = init_timeout_s
        self.gpu = gpu
        self.workspace = Path(settings.workspace).resolve()
        self.outcome: SiteOutcome | None = None
        self.launches = 0
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"flkit-site-{settings.site_name}", daemon=True)

    @property
    def site(self) -> str:
        return self.settings.site_name

    def start(self) -> None:
        if not self.script.is_file():
            raise FLKitError(f"site {self.site}: script {self.script} does not exist")
        if not shlex.split(self.command):
            raise ConfigError(f"site {self.site}: the launch command is empty")
        self.workspace.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the site to finish; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """End the script and every process it started (SIGTERM, then SIGKILL after grace_s)."""
        self._stopping.set()
        with self._proc_lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            log.info("site %s: stopping its process tree (pid %d)", self.site, proc.pid)
            processes.end_process_tree(proc, grace_s)
        self.join(grace_s + 5)

    # -- the watcher thread --------------------------------------------------

    def _main(self) -> None:
        try:
            error = self._run_once() if self.launch_once else self._run_per_task()
        except Exception as exc:  # a bug or an OS error here must still fail the site, not hang the job
            log.exception("site %s: runner error", self.site)
            error = f"the site runner failed: {type(exc).__name__}: {exc}"
        if error and not self._stopping.is_set():
            log.warning("site %s failed: %s", self.site, error)
            report_site_failure(self.settings, error)
        self.outcome = SiteOutcome(self.site, error is None, error)

    def _run_once(self) -> str | None:
        return self._launch({})

    def _run_per_task(self) -> str | None:
        """launch_once=False: hold the site's place in the job; one launch per task."""
        session = Session(self.settings)
        error: str | None = None
        finished = False  # False also when an exception leaves the loop
        try:
            previous: str | None = None
            while error is None and not self._stopping.is_set():
                task = session.peek_task()
                if task is None:
                    break  # the job ended
                if task.task_id == previous:
                    error = (f"script {self.script.name} exited without answering task '{task.task_name}' "
                             f"of round {task.current_round}")
                    break
                previous = task.task_id
                error = self._launch({"FLKIT_MAX_TASKS": "1"})
            finished = error is None
            return error
        finally:
            # On a failure, leave the report to _main: leaving here would fail the site first,
            # with a vaguer reason ("ended without answering").
            session.close(silent=not finished or self._stopping.is_set())

    def _launch(self, extra_env: dict[str, str]) -> str | None:
        """Start the command once and watch it to the end; the failure message, or None."""
        self.launches += 1
        marker = self.workspace / f".flkit_init_{os.getpid()}_{self.launches}"
        marker.unlink(missing_ok=True)
        argv = self._argv()
        env = self._env(marker, extra_env)
        log.info("site %s: launching %s", self.site, shlex.join(argv))
        with open(self.workspace / "output.log", "a") as log_file:
            log_file.write(f"=== flkit launch {self.launches}: {shlex.join(argv)}\n")
            log_file.flush()
            with self._proc_lock:
                if self._stopping.is_set():
                    return None
                proc = processes.start_process(argv, self.workspace, env)
                self._proc = proc
            prefix = f"[{self.site}] "
            pumps = [
                processes.OutputPump(proc.stdout, prefix, lambda: sys.stdout, log_file),
                processes.OutputPump(proc.stderr, prefix, lambda: sys.stderr, log_file,
                                     tail_lines=processes.STDERR_TAIL_LINES),
            ]
            for pump in pumps:
                pump.start()
            error = self._watch(proc, marker)
            for pump in pumps:
                pump.join(5)
            processes.reap_group(proc.pid)
        initialised = marker.exists()
        marker.unlink(missing_ok=True)
        if self._stopping.is_set():
            return None
        if error:
            return error
        if proc.returncode != 0:
            tail = "\n".join(pumps[1].tail)
            return (f"script {self.script.name} {processes.describe_exit(proc.returncode)} "
                    f"(command: {shlex.join(argv)})\nlast {len(pumps[1].tail)} lines of stderr:\n{tail}")
        if not initialised:
            return f"script {self.script.name} ended without calling flkit.init()"
        return None

    def _watch(self, proc: subprocess.Popen, marker: Path) -> str | None:
        """Wait for the process; end it if flkit.init() does not come within init_timeout_s."""
        deadline = time.monotonic() + self.init_timeout_s
        while not marker.exists():
            try:
                proc.wait(timeout=INIT_POLL_S)
                return None
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline and not marker.exists():
                processes.end_process_tree(proc, STOP_GRACE_S)
                return (f"script {self.script.name} did not call flkit.init() within {self.init_timeout_s:g} s "
                        "(ScriptRunner init_timeout_s); its processes were stopped")
        proc.wait()
        return None

    def _argv(self) -> list[str]:
        command = self.command
        if PORT_PLACEHOLDER in command:
            command = fill_port(command, free_port())
        return [*processes.python_command(shlex.split(command)), str(self.script), *self.argv]

    def _env(self, marker: Path, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("FLKIT_")}
        env.update(self.settings.to_env())
        env.update({
            "FLKIT_WORKSPACE": str(self.workspace),
            supervision.ENV_LAUNCHER_PID: str(os.getpid()),
            supervision.ENV_INIT_MARKER: str(marker),
            "PYTHONUNBUFFERED": "1",
            **extra,
        })
        if self.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return env
