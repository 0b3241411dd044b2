"""The ``ray`` backend: workers are Ray actors, on this machine or on every node of a Ray cluster.

Each actor imports torch once and runs site-tasks one after another, isolated as in the
``processes`` backend (``flkit.sim.site_task``), and talks to the simulator's server itself, over
gRPC (through shared memory when it runs on the server's host). Ray carries only the JSON text of
a ``SiteTask`` and of its outcome: params and results never go through Ray's object store or any
pickler. A dead actor fails the site-tasks it held, and a new one takes its place.

Cluster: ``ray.init()`` here connects to the cluster named by ``RAY_ADDRESS`` (or the
``address`` given), else starts a local one. On a multi-node cluster, give the simulator an
address the other nodes can reach (``flkit simulate --address 0.0.0.0:8002``). Needs the
``flkit[ray]`` extra; nothing else in flkit imports Ray.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from flkit.errors import ConfigError
from flkit.sim.backend import Backend, SiteTask, TaskDone, torch_threads_per_worker

log = logging.getLogger("flkit.sim")

WAIT_S = 0.5  # how long one ray.wait blocks before the waiter looks for new tasks


class SiteWorker:
    """The actor: one worker's transport, kept across the site-tasks it runs."""

    def __init__(self, threads: int) -> None:
        import torch

        import flkit.api  # noqa: F401  (warm: every script imports it)

        torch.set_num_threads(max(1, threads))
        self._transport: Any = None

    def run(self, task_json: str) -> str:
        from flkit.client.settings import SiteSettings
        from flkit.sim.site_task import run_site_task
        from flkit.transport import make_transport

        task = SiteTask.from_json(task_json)
        try:
            if self._transport is None:
                self._transport = make_transport(SiteSettings(**task.settings))
            error, released = run_site_task(task, self._transport, isolate=True)
        except Exception as exc:  # the simulator must hear of every task
            error, released = f"the worker failed: {type(exc).__name__}: {exc}", []
        return json.dumps({"error": error, "released": released})


class RayBackend(Backend):
    name = "ray"
    isolated = True

    def __init__(self, address: str | None = None, threads_per_worker: int | None = None) -> None:
        """``address``: the Ray cluster to join (default: ``RAY_ADDRESS``, else a local one)."""
        self.address = address
        self.threads_per_worker = threads_per_worker
        self._ray: Any = None
        self._actor_class: Any = None
        self._actors: list[Any] = []
        # object ref -> (worker, site, actor, number): calls are numbered as given, and an actor runs
        # its calls in that order
        self._pending: dict[Any, tuple[int, str, Any, int]] = {}
        self._given = 0
        # Dead actors -> the number of the call each was running (the earliest it had not answered).
        self._died_running: dict[Any, int] = {}
        self._lock = threading.Lock()
        self._more = threading.Event()
        self._stopping = threading.Event()
        self._started_ray = False
        self._waiter: threading.Thread | None = None
        self._on_done: Callable[[TaskDone], None] = lambda done: None

    def start(self, workers: int, on_done: Callable[[TaskDone], None]) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError('backend "ray" needs Ray: pip install "flkit[ray]"') from None
        self._ray = ray
        self._on_done = on_done
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=True)
            self._started_ray = True
        cpus = float(self._ray.cluster_resources().get("CPU", 1.0))
        threads = self.threads_per_worker or torch_threads_per_worker(workers)
        # Every worker must be placed, even with more workers than the cluster's CPUs.
        self._actor_class = ray.remote(num_cpus=min(1.0, cpus / workers), max_restarts=0)(SiteWorker)
        self._actors = [self._actor_class.remote(threads) for _ in range(workers)]
        self._threads = threads
        self._waiter = threading.Thread(target=self._wait, name="flkit-ray-waiter", daemon=True)
        self._waiter.start()

    def run(self, worker: int, task: SiteTask) -> None:
        with self._lock:
            actor = self._actors[worker]
            ref = actor.run.remote(task.to_json())
            self._given += 1
            self._pending[ref] = (worker, task.site, actor, self._given)
        self._more.set()

    def _wait(self) -> None:
        try:
            self._wait_loop()
        except Exception as exc:  # e.g. the cluster went away: every task held fails, none is lost
            log.exception("the Ray backend's waiter failed")
            with self._lock:
                held, self._pending = list(self._pending.values()), {}
            for worker, site, _, _ in held:
                self._on_done(TaskDone(worker, site, f"the Ray backend failed: {type(exc).__name__}: {exc}"))

    def _wait_loop(self) -> None:
        ray = self._ray
        while not self._stopping.is_set():
            with self._lock:
                refs = list(self._pending)
            if not refs:
                self._more.wait(WAIT_S)
                self._more.clear()
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=WAIT_S)
            for ref in ready:
                self._on_done(self._outcome(ref))

    def _outcome(self, ref: Any) -> TaskDone:
        ray = self._ray
        with self._lock:
            worker, site, actor, number = self._pending.pop(ref)
        try:
            outcome = json.loads(ray.get(ref))
            return TaskDone(worker, site, outcome.get("error"), list(outcome.get("released", [])))
        except ray.exceptions.RayActorError as exc:
            with self._lock:
                first = actor not in self._died_running
                if first:  # it was running its earliest unanswered call; the later ones never started
                    others = [n for _, _, a, n in self._pending.values() if a is actor]
                    self._died_running[actor] = min([number, *others])
                    if self._actors[worker] is actor:
                        self._actors[worker] = self._actor_class.remote(self._threads)
                ran = self._died_running[actor] == number
            if first:
                try:
                    ray.kill(actor)
                except Exception:  # already gone
                    pass
            if not ran:
                return TaskDone(worker, site, f"the Ray worker died before it ran this site's script: {exc}",
                                ran=False)
            return TaskDone(worker, site, f"the Ray worker running this site's script died: {exc}")
        except ray.exceptions.RayError as exc:
            return TaskDone(worker, site, f"Ray could not run this site's script: {exc}")

    def stop(self, grace_s: float) -> None:
        ray = self._ray
        if ray is None:
            return
        with self._lock:
            refs = list(self._pending)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=grace_s)
        self._stopping.set()
        self._more.set()
        if self._waiter is not None:
            self._waiter.join(WAIT_S * 4)
        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        if self._started_ray:
            ray.shutdown()
