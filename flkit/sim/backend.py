"""The simulator's worker backends: where a site's script runs for one task (or for the whole job).

A site is a record (``SiteTask``), not a thread: the pool (``flkit.sim.pool``) opens a session for
every site, and when a site is given a task, an idle worker runs the site's script with that
session until the script ends. A ``Backend`` owns the workers; it knows nothing of rounds or
strategies. Three exist, chosen by name (``make_backend``):

- ``threads``: workers are threads of the simulator's process (sites share its globals, its
  working directory and its RNG; fast, for scripts known to be safe together);
- ``processes``: workers are processes that import torch once and run many site-tasks, each with
  its own working directory, fresh module globals and a seeded RNG (the simulator's default);
- ``ray``: workers are Ray actors, on this machine or a Ray cluster (the ``flkit[ray]`` extra).

A ``SiteTask`` is plain JSON: it is all that crosses to a worker (Ray pickles only its own call
with this text); params and results go through the site's transport, never through a backend.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from flkit.errors import ConfigError

BACKENDS = ("processes", "threads", "ray")
# Site-tasks a worker holds at once: the one it runs and the next.
TASKS_PER_WORKER = 2
DEFAULT_BACKEND = "processes"


@dataclass(frozen=True)
class SiteTask:
    """One run of a site's script, as a worker gets it."""

    site: str
    script: str  # absolute path
    argv: list[str]
    settings: dict[str, Any]  # SiteSettings' fields
    session_id: str  # the session the pool opened for the site (JoinReply's)
    job_config: dict[str, Any]
    offers: dict[str, str]
    # Folders whose modules are the job's own code: dropped after an isolated site-task.
    code_roots: list[str] = field(default_factory=list)
    # Seeds random, numpy and torch before an isolated site-task runs (from the job's seed, the
    # site, the round and the task).
    seed: int | None = None
    gpu: str | None = None
    # The task itself, fetched by the pool, with its params in a file of the job's shared-memory
    # folder (a worker that cannot map it asks the server, as any site does): the header's fields
    # (task_id, name, round, total_rounds, params_type, meta) and params_file, payload_size.
    task: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SiteTask:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class TaskDone:
    """A site-task's end: ``error`` is why the script failed (or the worker died), None if it ended well."""

    worker: int
    site: str
    error: str | None = None
    # The server's files the site no longer maps (shared-memory transport), for the pool to tell.
    released: list[str] = field(default_factory=list)
    # False: the worker died before it started this task (it was queued behind the one it ran); the
    # pool gives the task to another worker.
    ran: bool = True


class Backend(ABC):
    """A bounded set of workers that run site-tasks. A worker runs its tasks one after another, in
    the order given; the pool gives a worker at most ``TASKS_PER_WORKER`` tasks at once, so that the
    next one waits at the worker, not at the pool. The backend calls ``on_done`` exactly once per
    task, from any thread, also when the worker died."""

    name: str = ""
    # Whether site-tasks are isolated from each other (own working directory, module globals, RNG).
    isolated: bool = False

    @abstractmethod
    def start(self, workers: int, on_done: Callable[[TaskDone], None]) -> None:
        """Make ``workers`` workers ready (they may still be starting when this returns)."""

    @abstractmethod
    def run(self, worker: int, task: SiteTask) -> None:
        """Queue ``task`` at worker ``worker`` (after those it holds); returns at once."""

    @abstractmethod
    def stop(self, grace_s: float) -> None:
        """Let running site-tasks end within ``grace_s`` seconds, then end every worker."""


def default_workers() -> int:
    """The number of cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torch_threads_per_worker(workers: int) -> int:
    """Torch's intra-op threads in each of ``workers`` workers: the cores shared out, at least one."""
    return max(1, default_workers() // workers)


def check_backend(name: str) -> str:
    """The backend's name, checked (a clear error naming the choices)."""
    if name not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def make_backend(name: str, **options: Any) -> Backend:
    """A new backend of this name (imported only when chosen: Ray is an optional extra)."""
    check_backend(name)
    if name == "threads":
        from flkit.sim.thread_backend import ThreadBackend

        return ThreadBackend(**options)
    if name == "processes":
        from flkit.sim.process_backend import ProcessBackend

        return ProcessBackend(**options)
    from flkit.sim.ray_backend import RayBackend

    return RayBackend(**options)
