"""The ``Transport`` protocol: what a site's Session needs from the link to its server.

Each method mirrors one JobService call. Failures are ``ServiceError``s with a typed
``ErrorCode``: ``UNAVAILABLE`` (the server did not answer: retry), ``UNKNOWN_SESSION`` (join
again), ``JOB_ENDED`` (stop), or a setup error. Params cross as tensors: a transport may
serialise them (gRPC, shared memory) or hand them over (memory), but the task params a site
gets are always its own, and a result's params must not be used by the transport after
``submit`` returns.
"""

from __future__ import annotations

from typing import Any, Protocol

from flkit.messages import JoinReply, Result, SubmitReply, Task, TaskOrEnd


class Transport(Protocol):
    """One site's link to one server. Implementations are thread-safe."""

    name: str

    def join(self, site: str, job_id: str, token: str, timeout: float) -> JoinReply:
        """Join the job (again); the reply carries the session id and the job settings."""
        ...

    def use_offers(self, offers: dict[str, str]) -> None:
        """Use what the server offers beyond its endpoint (``JoinReply.offers``) for a session this
        transport did not open itself (one a worker pool opened and handed over)."""
        ...

    def task_from_file(self, session_id: str, header: dict[str, Any]) -> Task | None:
        """The task a worker pool took for ``session_id``, its params mapped from the file of the
        server's shared-memory folder that ``header`` names (``SiteTask.task``); None where this
        transport maps no such file (the session then asks the server for it)."""
        ...

    def holds_files(self, session_id: str) -> bool:
        """Whether ``session_id`` still maps a file of the server through this transport."""
        ...

    def take_released(self, session_id: str) -> list[str]:
        """The server's files ``session_id`` mapped through this transport and no longer maps (each
        named once), for a worker pool to tell the server at the end of a site-task."""
        ...

    def get_task(self, session_id: str, wait_s: float, timeout: float, header_only: bool = False) -> TaskOrEnd:
        """The next task (with the site's own copy of its params), the job's end, or None after ``wait_s``.
        ``header_only``: the task's name, round and id, without params and without taking it."""
        ...

    def submit(self, session_id: str, result: Result, timeout: float) -> SubmitReply:
        """Hand a result over; returns whether it was accepted (and if not, why)."""
        ...

    def heartbeat(self, session_id: str, timeout: float) -> bool:
        """Tell the server this site is alive; False once the job has ended."""
        ...

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str,
                       timeout: float) -> None:
        """The site failed (its script raised or exited): fail its task now."""
        ...

    def leave(self, session_id: str, reason: str, timeout: float) -> None:
        """The site is done with the job."""
        ...

    def log_metrics(self, session_id: str, records_json: str, timeout: float) -> None:
        """A batch of tracking records (a JSON array)."""
        ...

    def close(self) -> None:
        """Release the link (channels, files)."""
        ...


class NoServerFiles:
    """The pool-facing methods of a transport that maps no file of the server (gRPC, memory); the
    shared-memory transport has its own."""

    def use_offers(self, offers: dict[str, str]) -> None:
        """Nothing to take up: this transport uses no offer."""

    def take_released(self, session_id: str) -> list[str]:
        """Nothing: this transport maps no file of the server."""
        return []

    def holds_files(self, session_id: str) -> bool:
        """Never: this transport maps no file of the server."""
        return False

    def task_from_file(self, session_id: str, header: dict[str, Any]) -> Task | None:
        """None: this transport maps no file of the server (the session asks for its task)."""
        return None
