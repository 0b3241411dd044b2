"""The script's side of being launched as an external process by flkit's runner.

The runner (``flkit.runner.external``) sets two variables in the script's environment:
- ``FLKIT_LAUNCHER_PID``: the process that launched the script. If it disappears, even
  by SIGKILL, a watchdog thread here (started by ``flkit.init()``) ends this process (and
  its process group), so no rank is left orphaned. It also watches the parent (as of
  ``import flkit``): a torchrun worker whose agent was killed ends too.
- ``FLKIT_INIT_MARKER``: a file that ``flkit.init()`` creates on rank 0, so the runner
  can tell a slow import from a script that never calls ``flkit.init()``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from flkit.pids import alive

ENV_LAUNCHER_PID = "FLKIT_LAUNCHER_PID"
ENV_INIT_MARKER = "FLKIT_INIT_MARKER"
WATCH_INTERVAL_S = 1.0
KILL_GRACE_S = 10.0

_watchdog: threading.Thread | None = None
# (this process, its parent) when ``import flkit`` ran: see note_parent.
_noted: tuple[int, int] | None = None


def launcher_pid() -> int | None:
    raw = os.environ.get(ENV_LAUNCHER_PID, "")
    return int(raw) if raw.isdigit() and int(raw) != os.getpid() else None


def supervised() -> bool:
    """True in a process that flkit's runner launched (it reports the process's outcome)."""
    return launcher_pid() is not None


def note_init() -> None:
    """Tell the runner that flkit.init() was called (rank 0 only)."""
    marker = os.environ.get(ENV_INIT_MARKER)
    if marker:
        try:
            Path(marker).write_text(str(os.getpid()))
        except OSError as exc:  # the runner then reports a missing init; say why here
            print(f"flkit: cannot write the init marker {marker}: {exc}", file=sys.stderr)


    return True


def _end_this_process(reason: str) -> None:
    """SIGTERM (then SIGKILL) this process, with its whole group when it leads one (its
    data-loader workers and other children go too)."""
    try:
        print(f"flkit: {reason}; ending this process", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr was a pipe to the process that is gone
    pid = os.getpid()
    leads_group = os.getpgrp() == pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if leads_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
        threading.Event().wait(KILL_GRACE_S)


def _watch(launcher: int, parent: int) -> None:
    tick = threading.Event()
    while not tick.wait(WATCH_INTERVAL_S):
        if not alive(launcher):
            _end_this_process(f"the flkit launcher (pid {launcher}) is gone")
            return
        if os.getppid() != parent:
            _end_this_process(f"the parent process (pid {parent}) is gone")
            return


def note_parent() -> int:
    """Remember this process's parent now (``import flkit`` calls this; it starts no thread).

    The watchdog starts later, at ``flkit.init()``; it then still notices a parent (e.g.
    torchrun's agent) that died between the import and ``init()``. Returns the parent noted
    first in this process (a forked child notes its own).
    """
    global _noted
    if _noted is None or _noted[0] != os.getpid():
        _noted = (os.getpid(), os.getppid())
    return _noted[1]


def start_watchdog() -> None:
    """Start the orphan watchdog once, in processes the runner launched (``flkit.init()`` calls this)."""
    global _watchdog
    launcher = launcher_pid()
    if launcher is None or _watchdog is not None:
        return
    _watchdog = threading.Thread(target=_watch, args=(launcher, note_parent()), name="flkit-orphan-watchdog",
                                 daemon=True)
    _watchdog.start()
