"""The memory transport: for sites that live in the server's process (the simulator's threads).

Nothing is serialised. A site gets params of its own (it may change them; neither the global
model nor another site sees it), and its result's tensors are handed to the job service as they
are: the service checks them and folds them into the aggregate before ``submit`` returns, so no
copy is needed and none is kept.

When the server keeps the global model in shared memory (FedAvg does, flkit.shared_model), a
site's params are a private copy-on-write mapping of it: the site reads the server's pages, and a
page is copied only if the site writes to it, for that site alone. Otherwise (models read back
for cross-site evaluation, a system without memfd) the site gets a copy, in the buffers of its
previous task when the script no longer holds any of them: memory that was touched before costs
one ``copy_``, a fresh allocation about five (flkit.tensor_reuse).

Servers in this process register here under their address, so a site whose settings name that
address finds it without any network.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from flkit.messages import ErrorCode, JoinReply, Result, ServiceError, SubmitReply, Task, TaskOrEnd
from flkit.shared_model import shared_model_of
from flkit.tensor_reuse import BufferPool, copy_into_pool
from flkit.transport.base import NoServerFiles

if TYPE_CHECKING:
    from flkit.server.job_service import JobService

log = logging.getLogger("flkit.client")

_lock = threading.Lock()
_services: dict[str, JobService] = {}


def register(address: str, service: JobService) -> None:
    """Make ``service`` reachable in this process under ``address`` (its gRPC "host:port")."""
    with _lock:
        _services[address] = service


def unregister(address: str, service: JobService) -> None:
    with _lock:
        if _services.get(address) is service:
            del _services[address]


def lookup(address: str) -> JobService | None:
    """The job service of this process listening on ``address``, if any."""
    with _lock:
        return _services.get(address)


# Below this size a site's copy of the global model costs less than a copy-on-write mapping of it
# (an mmap, then a tensor on it per parameter, for every task).
PRIVATE_VIEW_MIN_BYTES = 1 << 20


def _own_copy(task: Task, pool: BufferPool) -> Task:
    params = None
    if task.params is not None:
        shared = shared_model_of(task.params)
        # A small model is copied into reused buffers: cheaper than mapping a view for it.
        if shared is not None and shared.size >= PRIVATE_VIEW_MIN_BYTES:
            try:
                params = shared.private_view()
                pool.clear()  # the copies of earlier rounds are not needed any more
            except OSError as exc:  # no memory or map count left for a mapping: a copy will do
                log.warning("copy-on-write view of the global model failed (%s); the site gets a copy", exc)
        if params is None:
            params = copy_into_pool(pool, task.params)
    return Task(task.task_id, task.name, task.round, task.total_rounds, task.params_type, dict(task.meta), params)


class MemoryTransport(NoServerFiles):
    """Direct calls into a JobService of this process."""

    name = "memory"

    def __init__(self, service: JobService, address: str) -> None:
        self._service = service
        self.address = address
        self._buffers = BufferPool(depth=1)  # get_task is called by the site's own thread only

    def _live(self) -> JobService:
        if lookup(self.address) is not self._service:
            raise ServiceError(ErrorCode.UNAVAILABLE, f"the server at {self.address} in this process has stopped")
        return self._service

    def join(self, site: str, job_id: str, token: str, timeout: float) -> JoinReply:
        return self._live().join(site, job_id, token, self._service.protocol_version, local=True)

    def get_task(self, session_id: str, wait_s: float, timeout: float, header_only: bool = False) -> TaskOrEnd:
        outcome = self._live().next_task(session_id, wait_s, header_only=header_only)
        if isinstance(outcome, Task):
            if header_only:
                return Task(outcome.task_id, outcome.name, outcome.round, outcome.total_rounds)
            return _own_copy(outcome, self._buffers)
        return outcome

    def submit(self, session_id: str, result: Result, timeout: float) -> SubmitReply:
        return self._live().submit(session_id, result)

    def heartbeat(self, session_id: str, timeout: float) -> bool:
        return self._live().heartbeat(session_id)

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str,
                       timeout: float) -> None:
        self._live().report_failure(site, job_id, token, session_id, reason)

    def leave(self, session_id: str, reason: str, timeout: float) -> None:
        self._live().leave(session_id, reason)

    def log_metrics(self, session_id: str, records_json: str, timeout: float) -> None:
        self._live().log_metrics(session_id, records_json)

    def close(self) -> None:
        """Let go of the site's buffers (the script keeps what it still holds)."""
        self._buffers.clear()


__all__ = ["MemoryTransport", "lookup", "register", "unregister"]
