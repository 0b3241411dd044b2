"""The ``processes`` backend (the simulator's default): a pool of worker processes.

Each worker (``flkit.sim.worker``) imports torch once and runs many site-tasks, each isolated as
if on its own machine (``flkit.sim.site_task``). Tasks go to a worker as JSON lines on a pipe and
come back as JSON lines on another; a worker that dies (SIGKILL, a crash in native code, a script
calling ``os._exit``) fails only the site-task it was running, and a new worker takes its place.
Workers run in their own process group (Ctrl-C reaches the simulator, which stops them) and end by
themselves if the simulator dies.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TextIO

from flkit.client import supervision
from flkit.runner import processes
from flkit.sim.backend import Backend, SiteTask, TaskDone, torch_threads_per_worker

log = logging.getLogger("flkit.sim")

# A worker that dies this many times in a row before it is ready is not started again.
MAX_START_FAILURES = 3


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes]
    tasks: TextIO  # the writing end of the task pipe
    sites: deque[str] = field(default_factory=deque)  # the sites whose tasks it holds, in order
    ready: bool = False
    reader: threading.Thread | None = field(default=None, repr=False)
    pumps: list[threading.Thread] = field(default_factory=list, repr=False)  # its output's copiers (pipe_output)


class ProcessBackend(Backend):
    name = "processes"
    isolated = True

    def __init__(self, threads_per_worker: int | None = None, pipe_output: bool = False) -> None:
        """``threads_per_worker``: torch's intra-op threads in each worker (default: the cores
        shared out between the workers, at least one). ``pipe_output``: the workers' stdout and
        stderr are pipes, copied as they come to this process's ``sys.stdout`` and ``sys.stderr``
        (the simulator's progress bar prints them above itself), instead of being this process's
        own stdout and stderr."""
        self.threads_per_worker = threads_per_worker
        self.pipe_output = pipe_output
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._start_failures: dict[int, int] = {}
        self._broken: dict[int, str] = {}  # workers not started again, and why
        self._on_done: Callable[[TaskDone], None] = lambda done: None

    def start(self, workers: int, on_done: Callable[[TaskDone], None]) -> None:
        self._on_done = on_done
        if self.threads_per_worker is None:
            self.threads_per_worker = torch_threads_per_worker(workers)
        with self._lock:
            self._workers = [self._spawn(i) for i in range(workers)]

    def _spawn(self, index: int) -> _Worker:
        tasks_r, tasks_w = os.pipe()
        done_r, done_w = os.pipe()
        env = dict(os.environ, **{supervision.ENV_LAUNCHER_PID: str(os.getpid()), "PYTHONUNBUFFERED": "1"})
        output = subprocess.PIPE if self.pipe_output else None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flkit.sim.worker", str(tasks_r), str(done_w), str(self.threads_per_worker)],
                pass_fds=(tasks_r, done_w), stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                stdout=output, stderr=output,
            )
        finally:
            os.close(tasks_r)
            os.close(done_w)
        worker = _Worker(index, proc, os.fdopen(tasks_w, "w", encoding="utf-8"))
        if proc.stdout is not None and proc.stderr is not None:
            for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
                pump = threading.Thread(target=_copy_output, args=(pipe, name), name=f"flkit-worker-{index}-{name}",
                                        daemon=True)
                pump.start()
                worker.pumps.append(pump)
        worker.reader = threading.Thread(target=self._read, args=(worker, os.fdopen(done_r, "r", encoding="utf-8")),
                                         name=f"flkit-worker-{index}-pid{proc.pid}", daemon=True)
        worker.reader.start()
        return worker

    def run(self, worker: int, task: SiteTask) -> None:
        with self._lock:
            current = self._workers[worker]
            if worker in self._broken:
                failed: str | None = self._broken[worker]
            else:
                failed = None
                current.sites.append(task.site)  # first: if the write fails, the reader reports this task
                try:
                    current.tasks.write(task.to_json() + "\n")
                    current.tasks.flush()
                except OSError:
                    pass  # the worker died; its reader fails the task
        if failed is not None:
            self._on_done(TaskDone(worker, task.site, failed))

    def _read(self, worker: _Worker, done: TextIO) -> None:
        try:
            with done:
                for line in done:
                    self._answer(worker, line)
        except (OSError, ValueError) as exc:  # the pipe broke: the worker is ended below and replaced
            log.error("worker %d: unreadable answer (%s); ending it", worker.index, exc)
            processes.end_process_tree(worker.proc, 5.0)
        finally:
            self._lost(worker)

    def _answer(self, worker: _Worker, line: str) -> None:
        message = json.loads(line)
        if "ready" in message:
            worker.ready = True
            self._start_failures.pop(worker.index, None)
            return
        with self._lock:
            if worker.sites:
                worker.sites.popleft()
        self._on_done(TaskDone(worker.index, str(message["site"]), message.get("error"),
                               [str(name) for name in message.get("released", [])]))

    def _lost(self, worker: _Worker) -> None:
        """The worker's process ended: fail the task it ran, hand back the ones queued behind it, and
        start another worker (unless it keeps dying before it is ready, or the backend stops)."""
        status = worker.proc.wait()
        with self._lock:
            sites = list(worker.sites)
            worker.sites.clear()
            if self._stopping:
                return
            why = f"the worker process (pid {worker.proc.pid}) {processes.describe_exit(status)}"
            if not worker.ready:
                self._start_failures[worker.index] = self._start_failures.get(worker.index, 0) + 1
            if self._start_failures.get(worker.index, 0) >= MAX_START_FAILURES:
                self._broken[worker.index] = (f"{why} before it was ready, {MAX_START_FAILURES} times in a row "
                                              "(its error is in the output above)")
                log.error("worker %d: %s", worker.index, self._broken[worker.index])
            else:
                log.warning("worker %d: %s%s; starting another", worker.index, why,
                            f" while running site {sites[0]}'s script" if sites and worker.ready else "")
                try:
                    self._workers[worker.index] = self._spawn(worker.index)
                except OSError as exc:
                    self._broken[worker.index] = f"{why}, and another could not start: {exc}"
                    log.error("worker %d: %s", worker.index, self._broken[worker.index])
        for i, site in enumerate(sites):
            ran = i == 0 and worker.ready  # the others (or all, before it was ready) never started
            reason = f"{why} while running this site's script" if ran else f"{why} before it ran this site's script"
            self._on_done(TaskDone(worker.index, site, reason, ran=ran))

    def stop(self, grace_s: float) -> None:
        with self._lock:
            self._stopping = True
            workers = list(self._workers)
        for worker in workers:
            try:
                worker.tasks.close()
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for worker in workers:
            try:
                worker.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d (pid %d) still runs a site's script %.0f s after the job ended; stopping it",
                            worker.index, worker.proc.pid, grace_s)
                processes.end_process_tree(worker.proc, 5.0)
            processes.reap_group(worker.proc.pid)
            if worker.reader is not None:
                worker.reader.join(5)
            for pump in worker.pumps:  # the worker's last lines are out before the job's summary
                pump.join(5)


def _copy_output(pipe: IO[bytes], name: str) -> None:
    """Copy a worker's output to ``sys.<name>`` as it comes (not line by line: a site's progress
    bar rewrites its line with carriage returns), until the worker closes it."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = pipe.fileno()
    with pipe:
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except OSError:
                return
            text = decoder.decode(data, final=not data)
            if text:
                try:
                    stream: TextIO = getattr(sys, name)
                    stream.write(text)
                    stream.flush()
                except (OSError, ValueError):  # our stream was closed: keep draining the pipe
                    pass
            if not data:
                return
