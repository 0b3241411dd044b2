"""Run a site's script as an external process (``python3 -u``, ``torch.distributed.run``...).

The process runs in the site's folder ``<workspace>/<site>``, which holds ``custom/``, a copy
of the job's code, as NVFlare's app folder does: ``python3 -u custom/src/train.py`` works as
written, and relative paths such as ``./model.pth`` never collide between sites.

The launched script's rank 0 talks to the server itself; it finds its job through FLKIT_*
environment variables (``SiteSettings.to_env``), never through pickle. This module watches
the process: a non-zero exit of any rank (torchrun exits non-zero then), or a script that
never calls ``flkit.init()`` within ``launch_timeout``, fails the site's task at once, with
the exit status and the last lines of stderr. Stopping the site ends every process the
command started.

``launch_once=False`` launches the script once per task: between launches this runner keeps
the site in the job (joined, heartbeating) and asks for the next task's header only.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
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
from flkit.runner.script_runner import BaseScriptRunner

log = logging.getLogger("flkit.runner")

STOP_GRACE_S = 10.0
INIT_POLL_S = 0.2
CLEAN_UP_TIMEOUT_S = 120.0
CODE_DIR = "custom"
# torch.distributed variables of the launcher itself must not leak into the script's ranks.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
              "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


class ExternalSite:
    """One site's script as a process tree, watched until it ends (see the module doc)."""

    def __init__(self, settings: SiteSettings, runner: BaseScriptRunner, script: Path,
                 job_root: Path | None = None, gpu: str | None = None) -> None:
        """``script``: the script in the job folder ``job_root``; its ``custom/`` is copied into
        the site's folder, and the script runs from there."""
        self.settings = settings
        self.runner = runner
        self.script = Path(script).resolve()
        self.job_root = None if job_root is None else Path(job_root).resolve()
        self.argv = runner.argv
        self.command = runner.command
        self.launch_once = runner.launch_once
        self.launch_timeout = runner.launch_timeout
        self.shutdown_timeout = runner.shutdown_timeout
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
        if not shlex.split(self.runner.launch_command_line or self.command):
            raise ConfigError(f"site {self.site}: the launch command is empty")
        self.workspace.mkdir(parents=True, exist_ok=True)
        self._copy_code()
        self._thread.start()

    def _copy_code(self) -> None:
        """The job's ``custom/`` into the site's folder (NVFlare's app layout)."""
        if self.job_root is None or not (self.job_root / CODE_DIR).is_dir():
            return
        if self.workspace == self.job_root:
            return
        shutil.copytree(self.job_root / CODE_DIR, self.workspace / CODE_DIR, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))

    def _script_arg(self) -> str:
        """The script as the command names it: ``custom/...`` relative to the site's folder when it is
        part of the job's code, else its absolute path."""
        if self.job_root is not None:
            try:
                rel = self.script.relative_to(self.job_root / CODE_DIR)
            except ValueError:
                return str(self.script)
            if (self.workspace / CODE_DIR / rel).is_file():
                return str(Path(CODE_DIR) / rel)
        return str(self.script)

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
            answered = self.workspace / f".flkit_answered_{os.getpid()}"
            while error is None and not self._stopping.is_set():
                task = session.peek_task()
                if task is None:
                    break  # the job ended
                # The same task again: the launch did not answer it, unless it did and a restarted
                # server (--resume) hands the same task out again (task ids are the same in every run).
                if task.task_id == previous and _read(answered) != previous:
                    error = (f"script {self.script.name} exited without answering task '{task.name}' "
                             f"of round {task.round}")
                    break
                previous = task.task_id
                answered.unlink(missing_ok=True)
                error = self._launch({"FLKIT_MAX_TASKS": "1", "FLKIT_ANSWERED_FILE": str(answered)})
            answered.unlink(missing_ok=True)
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
            self._clean_up(log_file)
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

    def _clean_up(self, log_file) -> None:
        """The launcher's clean_up_script, after the process ended (a failure is logged, not fatal).
        It is supervised like the script: ``stop()`` ends it, and so does its time limit."""
        line = self.runner.clean_up_script
        if not line:
            return
        argv = processes.python_command(shlex.split(line))
        log_file.write(f"=== flkit clean-up: {shlex.join(argv)}\n")
        log_file.flush()
        with self._proc_lock:
            if self._stopping.is_set():
                return
            try:
                proc = subprocess.Popen(argv, cwd=self.workspace, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                log.warning("site %s: clean-up command %s cannot start: %s", self.site, shlex.join(argv), exc)
                return
            self._proc = proc
        try:
            code = proc.wait(CLEAN_UP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            processes.end_process_tree(proc, STOP_GRACE_S)
            log.warning("site %s: clean-up command %s did not end within %.0f s; stopped", self.site,
                        shlex.join(argv), CLEAN_UP_TIMEOUT_S)
            return
        processes.reap_group(proc.pid)
        if code != 0 and not self._stopping.is_set():
            log.warning("site %s: clean-up command %s %s", self.site, shlex.join(argv), processes.describe_exit(code))

    def _watch(self, proc: subprocess.Popen, marker: Path) -> str | None:
        """Wait for the process; end it if flkit.init() does not come within launch_timeout."""
        deadline = None if self.launch_timeout is None else time.monotonic() + self.launch_timeout
        while not marker.exists():
            try:
                proc.wait(timeout=INIT_POLL_S)
                return None
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and time.monotonic() > deadline and not marker.exists():
                processes.end_process_tree(proc, STOP_GRACE_S)
                return (f"script {self.script.name} did not call flkit.init() within {self.launch_timeout:g} s "
                        "(ScriptRunner launch_timeout); its processes were stopped")
        proc.wait()
        return None

    def _argv(self) -> list[str]:
        line = self.runner.launch_command_line
        if line is None:
            line = shlex.join([*shlex.split(self.command), self._script_arg(), *self.argv])
        if PORT_PLACEHOLDER in line:
            line = fill_port(line, free_port())
        return processes.python_command(shlex.split(line))

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
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu)
        return env


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None
