"""FollowerSession: the Client API on ranks > 0 of a torch.distributed job.

These ranks never talk to the server. They take every task state from rank 0 over the
script's process group (``flkit.client.ranks``), so ``receive()``, ``is_running()``,
``get_task_name()`` and ``system_info()`` answer the same on every rank. ``send()`` is a
no-op: rank 0 sends the site's result.

Staying in step with rank 0 (each state is one collective that every rank must join):
- ``is_running()`` always takes the next state from rank 0. Rank 0 fetches one in its
  ``is_running()`` too, since it has sent the previous task by then.
- ``receive()`` returns the task taken by the last ``is_running()`` (or by an earlier
  ``receive()`` of the same task); with none open, it takes the next state, as rank 0 does
  after ``send()``.
- ``send()`` closes the open task, like rank 0's ``send()``.
The ``timeout`` of ``receive()`` is rank 0's to apply; here the call returns when rank 0
shares what it got, which is within rank 0's timeout.
"""

from __future__ import annotations

import logging
from typing import Any

from flkit.client import ranks
from flkit.client.records import RecordQueue
from flkit.client.session import task_model
from flkit.client.settings import SiteSettings
from flkit.client.task_state import TaskState
from flkit.errors import CommunicationError, ConfigError, FLKitError
from flkit.messages import Task
from flkit.model import FLModel
from flkit.wire.codec import decode_params

log = logging.getLogger("flkit.client")


class FollowerSession:
    """The session of a rank > 0. Create through ``flkit.init()``."""

    def __init__(self, settings: SiteSettings, rank: int, world_size: int) -> None:
        self.settings = settings
        self.rank = rank
        self.world_size = world_size
        self.job_config: dict[str, Any] = {}
        self._link: ranks.RankLink | None = None
        # Rank 0's task state, mirrored: the same machine, moved by what rank 0 shares.
        self.state = TaskState()
        self.records = RecordQueue(settings.site_name, settings.workspace, settings.job_id,
                                   file_name=f"tracking.rank{rank}.jsonl")
        self.records.configure({})  # only the file: rank 0 sends the site's records

    def _require_link(self) -> ranks.RankLink:
        if self._link is None:
            self._link = ranks.RankLink.current()
            if self._link is None:
                raise ConfigError(
                    f"site {self.settings.site_name}, rank {self.rank} of {self.world_size}: no torch.distributed "
                    "process group is initialised, so this rank cannot get the task from rank 0. Call "
                    "torch.distributed.init_process_group() before flare.receive()/is_running() on every rank, "
                    "or call them on rank 0 only"
                )
        return self._link

    def _next_state(self) -> ranks.SharedState:
        link = self._require_link()
        state = link.receive()
        while state.kind == ranks.WAITING:  # rank 0 still waits for a task: keep waiting with it
            state = link.receive()
        if state.kind == ranks.ERROR:
            raise CommunicationError(f"rank 0 of site {self.settings.site_name} failed: {state.header.get('error')}")
        return state

    def connect(self, timeout: float | None = None) -> None:
        """Take the job settings from rank 0 (once; rank 0 joins the job for the site)."""
        link = self._require_link()
        if link.shared_config:
            return
        link.shared_config = True
        state = self._next_state()
        if state.kind != ranks.CONFIG:
            raise FLKitError(f"rank {self.rank}: expected the job settings from rank 0, got {state.kind!r}")
        self.job_config = dict(state.header.get("job_config") or {})

    def _fetch(self) -> None:
        self.connect()
        state = self._next_state()
        self.state.drop()  # rank 0 moved on: a task this rank held (it need not send) is closed
        if state.kind == ranks.TASK:
            h = state.header
            self.state.fetched(Task(
                task_id=h["task_id"], name=h["task_name"], round=h["current_round"],
                total_rounds=h["total_rounds"], params_type=h.get("params_type", ""),
                meta=dict(h.get("meta") or {}),
                params=decode_params(state.payload) if state.payload else None,
            ))
            self.state.take()
        elif state.kind == ranks.END:
            self.state.end(state.header.get("end_reason", ""), bool(state.header.get("job_failed")))
        elif state.kind != ranks.NO_TASK:
            raise FLKitError(f"rank {self.rank}: unexpected state {state.kind!r} from rank 0")

    def is_running(self) -> bool:
        if self.state.ended:
            return False
        self._fetch()
        return not self.state.ended

    def receive(self, timeout: float | None = None) -> FLModel | None:
        state = self.state
        if state.task is None and not state.ended:
            self._fetch()
        if state.task is None:
            return None
        return task_model(state.task, self.settings)

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        """A no-op on ranks > 0 (rank 0 sends the site's result); closes the open task."""
        if not isinstance(model, FLModel):
            raise TypeError(f"send() takes an FLModel, got {type(model).__name__}")
        log.debug("site %s rank %d: send() is a no-op on ranks > 0", self.settings.site_name, self.rank)
        if self.state.task is not None:
            self.state.answer(keep=not clear_cache)

    @property
    def task_name(self) -> str:
        return self.state.last_task_name

    @property
    def holds_unanswered_task(self) -> bool:
        return False

    def queue_record(self, record: dict[str, Any]) -> None:
        """Tracking records of ranks > 0 stay in their own file; rank 0 speaks for the site."""
        self.records.add(record)

    def close(self, failure: str | None = None, silent: bool = False) -> None:
        """Nothing to tell the server (rank 0 speaks for the site); the record file is closed."""
        self.records.close()
