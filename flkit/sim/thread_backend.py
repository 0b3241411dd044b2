"""The ``threads`` backend: workers are threads of the simulator's process.

Site-tasks share the process's module globals, working directory and RNG, so this backend is for
scripts known to be safe together; in exchange a site-task costs no process and its params are
handed over in memory.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from flkit.client.settings import SiteSettings
from flkit.sim.backend import Backend, SiteTask, TaskDone
from flkit.sim.site_task import run_site_task
from flkit.transport import Transport, make_transport

log = logging.getLogger("flkit.sim")


class ThreadBackend(Backend):
    name = "threads"
    isolated = False

    def __init__(self) -> None:
        self._queues: list[queue.SimpleQueue[SiteTask | None]] = []
        self._threads: list[threading.Thread] = []
        self._on_done: Callable[[TaskDone], None] = lambda done: None
        self._stopping = False

    def start(self, workers: int, on_done: Callable[[TaskDone], None]) -> None:
        self._on_done = on_done
        for i in range(workers):
            inbox: queue.SimpleQueue[SiteTask | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._work, args=(i, inbox), name=f"flkit-worker-{i}", daemon=True)
            self._queues.append(inbox)
            self._threads.append(thread)
            thread.start()

    def run(self, worker: int, task: SiteTask) -> None:
        self._queues[worker].put(task)

    def stop(self, grace_s: float) -> None:
        self._stopping = True  # a task still queued at a worker is not started: the job has ended
        for inbox in self._queues:
            inbox.put(None)
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # a thread cannot be killed: it goes with the process
                log.warning("%s is still running a site's script %.0f s after the job ended", thread.name, grace_s)

    def _work(self, worker: int, inbox: queue.SimpleQueue[SiteTask | None]) -> None:
        transport: Transport | None = None  # one per worker: site-tasks run one after another here
        while (task := inbox.get()) is not None and not self._stopping:
            try:
                if transport is None:
                    transport = make_transport(SiteSettings(**task.settings))
                error, released = run_site_task(task, transport, isolate=False)
            except Exception as exc:  # the pool must hear of every task, or the site waits for good
                log.exception("worker %d: site %s", worker, task.site)
                error, released = f"the worker failed: {type(exc).__name__}: {exc}", []
            self._on_done(TaskDone(worker, task.site, error, released))
        if transport is not None:
            transport.close()
