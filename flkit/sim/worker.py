"""A worker process of the ``processes`` backend: ``python -m flkit.sim.worker TASKS_FD DONE_FD THREADS``.

It imports torch and flkit once, then runs the site-tasks the simulator writes to ``TASKS_FD``
(one ``SiteTask`` as JSON per line), one at a time, each isolated (``flkit.sim.site_task``), and
answers each with one JSON line on ``DONE_FD``: ``{"site": ..., "error": null or "why", "released":
[the server's files the site no longer maps]}``. Its
first line says it is ready. Its stdout and stderr are the simulator's, with each line prefixed
by the site it comes from. Nothing read from the pipes is unpickled; params go through the
site's transport (shared memory on this host). It ends when ``TASKS_FD`` closes (a task still
queued then is not started: the job has ended), or, like every process flkit launches, when the
simulator is gone.
"""

from __future__ import annotations

import gc
import json
import os
import select
import sys
from collections import deque


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3 or not all(a.isdigit() for a in args):
        print("usage: python -m flkit.sim.worker TASKS_FD DONE_FD THREADS (started by flkit's simulator)",
              file=sys.stderr)
        return 2
    tasks_fd, done_fd, threads = (int(a) for a in args)
    from flkit.client import supervision

    supervision.start_watchdog()  # ends this process if the simulator is gone, even by SIGKILL
    import torch

    import flkit.api  # noqa: F401  (warm: every script imports it)
    from flkit.client.settings import SiteSettings
    from flkit.sim.backend import SiteTask
    from flkit.sim.site_task import run_site_task
    from flkit.transport import Transport, make_transport

    torch.set_num_threads(max(1, threads))
    gc.collect()
    gc.freeze()  # the libraries stay for good: later collections need not scan them
    transport: Transport | None = None
    inbox = Inbox(tasks_fd)
    with os.fdopen(done_fd, "w", encoding="utf-8") as done:
        done.write(json.dumps({"ready": os.getpid()}) + "\n")
        done.flush()
        while (line := inbox.next()) is not None:
            task = SiteTask.from_json(line)
            try:
                if transport is None:
                    transport = make_transport(SiteSettings(**task.settings))
                error, released = run_site_task(task, transport, isolate=True)
            except Exception as exc:  # the simulator must hear of every task
                error, released = f"the worker failed: {type(exc).__name__}: {exc}", []
            done.write(json.dumps({"site": task.site, "error": error, "released": released}) + "\n")
            done.flush()
    if transport is not None:
        transport.close()
    os.close(tasks_fd)
    return 0


class Inbox:
    """The task lines from the simulator. It reads ahead of the task it hands out: once the simulator
    closed the pipe (the job ended), a task still queued behind is not started at all."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self._lines: deque[str] = deque()
        self._closed = False

    def next(self) -> str | None:
        """The next task line; None once the simulator closed the pipe."""
        self._read(block=False)
        while not self._lines and not self._closed:
            self._read(block=True)
        return None if self._closed else self._lines.popleft()

    def _read(self, block: bool) -> None:
        while not self._closed:
            if not block and not select.select([self.fd], [], [], 0)[0]:
                return
            data = os.read(self.fd, 1 << 16)
            if not data:
                self._closed = True
                return
            self._buffer += data
            *lines, self._buffer = self._buffer.split(b"\n")
            self._lines.extend(line.decode("utf-8") for line in lines if line)
            if block:
                return


if __name__ == "__main__":
    sys.exit(main())
