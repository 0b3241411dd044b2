"""Starting, watching and ending a launched command and everything it starts.

Why psutil and process groups both: the command runs in its own session (its own process
group), which one ``killpg`` ends; but ``torch.distributed.run`` starts each worker in a
session of its own, so the workers are found as descendants (psutil) before anything is
killed. Whatever still runs after the grace period gets SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TextIO

import psutil

STDERR_TAIL_LINES = 50


class OutputPump(threading.Thread):
    """Copies a child's pipe line by line: prefixed to our stream, to a log file, and (for
    stderr) into a tail of the last lines for the failure report."""

    def __init__(self, pipe: IO[bytes], prefix: str, stream: Callable[[], TextIO], log: IO[str] | None,
                 tail_lines: int = 0) -> None:
        super().__init__(name=f"flkit-output{prefix.strip()}", daemon=True)
        self.pipe = pipe
        self.prefix = prefix
        self.stream = stream
        self.log = log
        self.tail: deque[str] = deque(maxlen=tail_lines)

    def run(self) -> None:
        for raw in iter(self.pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.tail.append(line)
            try:
                out = self.stream()
                out.write(f"{self.prefix}{line}\n")
                out.flush()
                if self.log is not None:
                    self.log.write(line + "\n")
                    self.log.flush()
            except (OSError, ValueError):  # our stream or the log was closed: keep draining the pipe
                pass
        self.pipe.close()


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def start_process(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``argv`` in a new session (its own process group) with piped output."""
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _signal_all(root_pid: int, procs: list[psutil.Process], sig: int) -> None:
    try:
        os.killpg(root_pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def end_process_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process, its group and all its descendants; SIGKILL what is left after grace_s."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    _signal_all(proc.pid, procs, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if alive:
        _signal_all(proc.pid, alive, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=5)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
        pass


def reap_group(pgid: int) -> None:
    """After the command exited: SIGKILL anything it left running in its process group."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """In the main thread, turn SIGTERM into SystemExit(143) so ``finally`` blocks end the
    launched processes (Python's default SIGTERM action would skip them)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def python_command(argv: list[str]) -> list[str]:
    """A leading ``python``/``python3`` means the interpreter running flkit, so the script sees
    the same installed packages whether or not a virtualenv is activated."""
    if argv and argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv
