"""Who is in the job: joins, tokens, liveness, and the task each site holds.

The gRPC handlers and the Controller's round loop meet here. Everything is
guarded by one Condition so the round loop can sleep until something happens
(a result, a failure, a join) instead of polling fast.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from flkit.messages import ErrorCode, JobEnd, ServiceError, Task

# A site's task outcome while its accepted result is being folded in (outside the registry lock):
# the round waits for it, and neither a timeout, a failure report nor a re-join closes it half-way.
ACCEPTING = "accepting"


class SiteStatus(str, Enum):
    EXPECTED = "expected"  # listed in the job, not joined yet
    JOINED = "joined"
    LEFT = "left"  # its script finished
    FAILED = "failed"


@dataclass
class SiteState:
    name: str
    status: SiteStatus = SiteStatus.EXPECTED
    session_id: str | None = None
    last_seen: float = 0.0
    task: Task | None = None
    task_outcome: str | None = None  # None while pending, ACCEPTING, "done" or a failure message
    fetched: bool = False  # the site has taken its task (it holds one of the concurrency slots)
    failure: str | None = None


class SiteRegistry:
    """Tracks the sites of one job and hands out their tasks.

    Refusals are ``ServiceError``s with a typed ``ErrorCode``.
    """

    def __init__(
        self,
        job_id: str,
        sites: list[str],
        token: str,
        heartbeat_timeout_s: float,
        client_config: dict[str, Any],
        max_active_tasks: int | None = None,
    ) -> None:
        """``max_active_tasks``: at most this many sites hold a task at once (the simulator's
        ``threads``); the others wait for a slot with their scripts alive, as in NVFlare."""
        if max_active_tasks is not None and max_active_tasks < 1:
            raise ValueError(f"max_active_tasks must be >= 1, got {max_active_tasks}")
        self.max_active_tasks = max_active_tasks
        self.job_id = job_id
        self.token = token
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.client_config = client_config
        self.cond = threading.Condition()
        self.sites: dict[str, SiteState] = {name: SiteState(name) for name in sites}
        self._sessions: dict[str, str] = {}
        self.end: JobEnd | None = None
        # Told about every site failure (the Controller reports it as a progress event).
        self.on_site_failed: Callable[[str, str], None] | None = None

    # -- requests from sites -------------------------------------------------

    def _check_identity(self, site: str, job_id: str, token: str) -> SiteState:
        if job_id != self.job_id:
            raise ServiceError(ErrorCode.WRONG_JOB, f"this server runs job '{self.job_id}', not '{job_id}'")
        if not hmac.compare_digest(token.encode(), self.token.encode()):
            raise ServiceError(ErrorCode.BAD_TOKEN, f"site '{site}': bad job token")
        state = self.sites.get(site)
        if state is None:
            raise ServiceError(
                ErrorCode.UNKNOWN_SITE, f"site '{site}' is not part of job '{self.job_id}' (sites: {', '.join(self.sites)})"
            )
        return state

    def join(self, site: str, job_id: str, token: str) -> str:
        """Admit a site (again, after a restart) and return its new session id."""
        with self.cond:
            state = self._check_identity(site, job_id, token)
            if self.end is not None:
                raise ServiceError(ErrorCode.JOB_ENDED, f"job '{self.job_id}' has ended: {self.end.reason}")
            if state.session_id:
                self._sessions.pop(state.session_id, None)
            session_id = secrets.token_hex(16)
            self._sessions[session_id] = site
            state.session_id = session_id
            state.status = SiteStatus.JOINED
            state.failure = None
            state.last_seen = time.monotonic()
            if state.task is not None and state.task_outcome not in (None, "done", ACCEPTING):
                state.task = None  # a failed task is not handed out again (one being folded in stays)
            self.cond.notify_all()
            return session_id

    def touch_locked(self, session_id: str) -> SiteState:
        """The site of a session, marked as just seen. Caller holds ``cond``."""
        site = self._sessions.get(session_id)
        if site is None:
            raise ServiceError(ErrorCode.UNKNOWN_SESSION, "unknown session (the server restarted or the site re-joined); join again")
        state = self.sites[site]
        state.last_seen = time.monotonic()
        return state

    def site_of(self, session_id: str) -> str:
        """The name of the site holding ``session_id`` (marked as just seen)."""
        with self.cond:
            return self.touch_locked(session_id).name

    def heartbeat(self, session_id: str) -> bool:
        with self.cond:
            self.touch_locked(session_id)
            return self.end is None

    def next_task(self, session_id: str, wait_s: float, header_only: bool = False) -> Task | JobEnd | None:
        """The site's pending task, or JobEnd, or None if nothing came within wait_s.

        ``header_only`` (a launcher asking whether a task waits) takes no concurrency slot.
        """
        deadline = time.monotonic() + max(0.0, wait_s)
        with self.cond:
            while True:
                state = self.touch_locked(session_id)
                if state.task is not None and state.task_outcome is None:
                    if header_only:
                        return state.task.for_site(state.name)
                    if state.fetched or self._slot_free_locked():
                        state.fetched = True
                        return state.task.for_site(state.name)
                if self.end is not None:
                    return self.end
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str) -> None:
        with self.cond:
            if session_id and session_id in self._sessions:
                state = self.touch_locked(session_id)
            else:
                state = self._check_identity(site, job_id, token)
            self._fail_locked(state, reason)

    def leave(self, session_id: str, reason: str) -> None:
        with self.cond:
            state = self.touch_locked(session_id)
            if state.task is not None and state.task_outcome is None and self.end is None:
                self._fail_locked(state, f"its script ended without answering task '{state.task.name}'"
                                  f" of round {state.task.round}" + (f": {reason}" if reason else ""))
            elif state.status == SiteStatus.JOINED:
                state.status = SiteStatus.LEFT
            self._sessions.pop(session_id, None)
            state.session_id = None
            self.cond.notify_all()

    # -- used by the Controller ---------------------------------------------

    def _fail_locked(self, state: SiteState, reason: str) -> None:
        if state.status == SiteStatus.FAILED:
            return
        state.status = SiteStatus.FAILED
        state.failure = reason
        if state.task is not None and state.task_outcome is None:
            state.task_outcome = reason
        if state.session_id:
            # Its next call must re-join, so a site wrongly declared dead can come back.
            self._sessions.pop(state.session_id, None)
            state.session_id = None
        self.cond.notify_all()
        if self.on_site_failed is not None:
            self.on_site_failed(state.name, reason)

    def fail_site(self, site: str, reason: str) -> None:
        with self.cond:
            self._fail_locked(self.sites[site], reason)

    def reap_dead_locked(self) -> None:
        """Fail joined sites whose heartbeat lapsed. Caller holds ``cond``."""
        now = time.monotonic()
        for state in self.sites.values():
            if state.status == SiteStatus.JOINED and now - state.last_seen > self.heartbeat_timeout_s:
                self._fail_locked(
                    state, f"no heartbeat for {now - state.last_seen:.0f} s (limit {self.heartbeat_timeout_s:g} s)"
                )

    def _slot_free_locked(self) -> bool:
        if self.max_active_tasks is None:
            return True
        holding = sum(1 for s in self.sites.values() if s.task is not None and s.task_outcome is None and s.fetched)
        return holding < self.max_active_tasks

    def active_sites_locked(self) -> list[str]:
        return [s.name for s in self.sites.values() if s.status == SiteStatus.JOINED]

    def assign_locked(self, task: Task, sites: list[str]) -> None:
        for name in sites:
            state = self.sites[name]
            state.task = task
            state.task_outcome = None
            state.fetched = False
        self.cond.notify_all()

    def finish(self, failed: bool, reason: str) -> None:
        with self.cond:
            if self.end is None:
                self.end = JobEnd(failed=failed, reason=reason)
            self.cond.notify_all()

    def wait_all_gone(self, timeout: float) -> bool:
        """Wait until no site holds a session (each has left or failed); True if that happened."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self._sessions:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True
