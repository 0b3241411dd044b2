"""SitePool: the simulator's sites as records, run on a backend's bounded set of workers.

The pool opens one session per site when the job starts (the server needs no heartbeat from it:
the pool vouches for its sites, and watches the workers that run them). When the server gives
sites a task (``SiteRegistry.on_assigned``), the pool queues them, and each idle worker runs one
queued site's script, which answers its task and ends (``max_tasks=1``: the script's
``while flare.is_running()`` loop runs once). A site-task that fails (the script raised, ended
without answering, or its worker died) fails that task only: the site stays in the job for
later rounds, and the round goes on with the others if ``min_clients`` allows.

With no more sites than workers, each site keeps a worker for the whole job and its script runs
once, as on a machine of its own; a failure then fails the site, as it would there.

The loop is one thread fed by one queue: a task given, a task done, or stop. Its cost per round
grows with the sites in that round, not with the sites in the job.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flkit.client.settings import SiteSettings
from flkit.messages import SUBMIT_MODEL, JoinReply, ServiceError, Task
from flkit.server.job_service import JobService
from flkit.server.shm_exchange import ShmExchange
from flkit.sim.backend import TASKS_PER_WORKER, Backend, SiteTask, TaskDone
from flkit.sim.site_task import task_seed

log = logging.getLogger("flkit.sim")

_STOP = object()


@dataclass(frozen=True)
class SiteSpec:
    """What the pool needs to run one site's script."""

    settings: SiteSettings
    script: Path
    argv: list[str]
    gpu: str | None = None
    # Folders of the job's own code (modules imported from them are dropped after an isolated site-task).
    code_roots: tuple[str, ...] = ()


class SitePool:
    """Runs the sites ``specs`` on ``backend``'s workers for the job ``service`` serves."""

    def __init__(self, service: JobService, backend: Backend, specs: list[SiteSpec], workers: int,
                 seed: object = 0, shm: ShmExchange | None = None) -> None:
        """``shm``: the job's shared-memory folder. The pool then takes each task for the site (the
        site-task starts with its params mapped, no request for it), and tells the server which of
        its files a site no longer maps."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.service = service
        self.registry = service.registry
        self.backend = backend
        self.specs = {spec.settings.site_name: spec for spec in specs}
        self.workers = min(workers, len(specs)) if specs else 0
        self.dedicated = len(specs) <= workers  # each site keeps a worker; its script runs once
        self.seed = seed
        self.shm = shm
        self.errors: dict[str, str] = {}  # the last failure of each site's script
        self._joined: dict[str, JoinReply] = {}  # each site's session, opened by the pool
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flkit-site-pool", daemon=True)
        self._stopped = False
        self._warned_submit = False

    # -- start and stop --------------------------------------------------------

    def start(self) -> None:
        """Open every site's session and start the workers (dedicated: each site's script too)."""
        reg = self.registry
        if not self.specs:
            return
        if not self.dedicated:
            # Before the joins: the round loop may hand out round 0 as soon as the last site joined.
            reg.on_assigned = self._assigned
        for site in self.specs:
            self._joined[site] = self.service.join(site, reg.job_id, reg.token or "", local=True)
        self.backend.start(self.workers, self._done)
        self._thread.start()
        if self.dedicated:
            for worker, site in enumerate(self.specs):
                self._events.put(("run", worker, site))

    def stop(self, grace_s: float) -> None:
        """After the job ended: let the scripts still running end within ``grace_s``, then stop the
        workers. Once; later calls do nothing."""
        if self._stopped:
            return
        self._stopped = True
        self.registry.on_assigned = None
        if self._thread.is_alive():
            self._events.put(_STOP)
            self._thread.join()
        if self.specs:
            self.backend.stop(grace_s)

    # -- events (from the registry's and the backend's threads) ----------------

    def _assigned(self, task: Task, sites: list[str]) -> None:
        """Under the registry's lock: only queue, never call back into the registry."""
        self._events.put(("task", task, sites))

    def _done(self, done: TaskDone) -> None:
        self._events.put(("done", done))

    # -- the loop --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # no site would get a task again: the job cannot go on
            log.exception("the site pool failed")
            self.registry.finish(True, f"the simulator's site pool failed: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        pending: dict[str, Task] = {}  # sites with a task to run, in order (a newer task replaces an older one)
        running: dict[str, Task | None] = {}  # site -> the task its script was started for (None: the whole job)
        # A worker's free places (it holds up to TASKS_PER_WORKER tasks), spread over the workers.
        idle: deque[int] = deque() if self.dedicated else deque(list(range(self.workers)) * TASKS_PER_WORKER)
        while True:
            event = self._events.get()
            if event is _STOP:
                return
            kind = event[0]
            if kind == "task":
                _, task, sites = event
                for site in sites:
                    pending.pop(site, None)
                    pending[site] = task
            elif kind == "run":  # dedicated: a site's script for the whole job
                _, worker, site = event
                running[site] = None
                self.backend.run(worker, self._site_task(site, None))
            elif kind == "done":
                done: TaskDone = event[1]
                if not self.dedicated:
                    idle.append(done.worker)
                if done.released and self.shm is not None:
                    self.shm.release(self._joined[done.site].session_id, done.released)
                task = running.pop(done.site, None)
                if not done.ran and task is not None and done.site not in pending:
                    pending[done.site] = task  # queued at a worker that died first: another one runs it
                else:
                    self._settle(done, task)
            while idle and pending:
                site = next((s for s in pending if s not in running), None)
                if site is None:
                    break
                task = pending.pop(site)
                if not self.registry.task_open(site, task.task_id):
                    continue  # it timed out or the job ended while it waited for a worker
                running[site] = task
                if task.name == SUBMIT_MODEL and not self._warned_submit:
                    self._warned_submit = True
                    log.warning("cross-site evaluation asks each site for its own model; with more sites than "
                                "workers a site's script runs afresh for this task, so it must load the model it "
                                "saved in its folder (flare.get_config()['workspace']), or it sends a new one")
                self.backend.run(idle.popleft(), self._site_task(site, task))

    def _settle(self, done: TaskDone, task: Task | None) -> None:
        """What a site-task's end means for its site."""
        spec = self.specs[done.site]
        if done.error:
            self.errors[done.site] = done.error
        if self.registry.end is not None:
            return
        if self.dedicated:
            if done.error:
                self.registry.fail_site(done.site, done.error)
            else:  # the script ended by itself while the job goes on: the site left
                try:
                    self.registry.leave(self._joined[done.site].session_id, "")
                except ServiceError:
                    pass  # its session is gone already (it failed)
            return
        if task is not None and self.registry.task_open(done.site, task.task_id):
            why = done.error or (f"script {spec.script.name} ended without answering task '{task.name}' "
                                 f"of round {task.round}")
            self.registry.fail_task(done.site, why)
        elif done.error:
            log.warning("site %s: its script failed after its task was settled: %s", done.site,
                        done.error.splitlines()[0])

    def _site_task(self, site: str, task: Task | None) -> SiteTask:
        spec = self.specs[site]
        joined = self._joined[site]
        settings = dataclasses.replace(spec.settings, max_tasks=0 if task is None else 1)
        seed = None
        if self.backend.isolated:
            seed = task_seed(self.seed, site, 0, "job") if task is None else task_seed(self.seed, site, task.round,
                                                                                        task.name)
        return SiteTask(site=site, script=str(spec.script), argv=list(spec.argv),
                        settings=dataclasses.asdict(settings), session_id=joined.session_id,
                        job_config=joined.job_config, offers=joined.offers, code_roots=list(spec.code_roots), seed=seed, gpu=spec.gpu,
                        task=None if task is None else self._prefetch(joined.session_id))

    def _prefetch(self, session_id: str) -> dict[str, Any] | None:
        """The site's task with its params as a file of the shared-memory folder, taken for the site
        now (None: the worker asks the server itself, e.g. on the threads backend)."""
        if self.shm is None or not self.backend.isolated:
            return None
        try:
            task = self.service.next_task(session_id, 0.0)
            if not isinstance(task, Task) or task.params is None:
                return None
            params_file, size = self.shm.task_file(task, session_id)
        except (ServiceError, OSError, ValueError):
            return None  # the worker's own request says what happened
        return {"task_id": task.task_id, "name": task.name, "round": task.round, "total_rounds": task.total_rounds,
                "params_type": task.params_type, "meta": task.meta, "params_file": params_file, "payload_size": size}
