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
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from flkit.messages import ErrorCode, JobEnd, ServiceError, Task
from flkit.server.listing import site_list
from flkit.server.peer import WORKER, current_peer

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
    failure: str | None = None
    last_done: str | None = None  # the id of the last task this site answered (a resend is acknowledged)
    # Woken when something this site waits for changes (its task, its session, the job's end);
    # shares the registry's lock. None until the registry sets it.
    wake: threading.Condition | None = field(default=None, repr=False, compare=False)


def _check_acts_for(site: str, vouched: bool = False) -> None:
    """Refuse a gRPC caller whose certificate names another site (the memory transport's
    in-process sites and servers without a kit have no certificate: nothing to compare). A pool
    worker's certificate acts for ``vouched`` sessions: those the simulator's pool opened, which
    need no heartbeat."""
    peer = current_peer()
    if peer is not None and peer.name != site and not (vouched and peer.role == WORKER):
        raise ServiceError(ErrorCode.FORBIDDEN,
                           f"the certificate of {peer.name!r} does not allow acting for site {site[:64]!r}")


class SiteRegistry:
    """Tracks the sites of one job and hands out their tasks.

    One lock guards everything. The Controller waits on ``cond`` (woken by answers, failures,
    joins and the job's end); each site waits for its next task on its own condition
    (``SiteState.wake``, the same lock), woken only by what concerns it: giving a round's task to
    a thousand sites wakes a thousand waits once, not every wait for every answer.

    Refusals are ``ServiceError``s with a typed ``ErrorCode``.
    """

    def __init__(
        self,
        job_id: str,
        sites: list[str],
        token: str | None,
        heartbeat_timeout_s: float,
        client_config: dict[str, Any],
    ) -> None:
        self.job_id = job_id
        self.token = token
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.client_config = client_config
        self._lock = threading.RLock()
        self.cond = threading.Condition(self._lock)
        self.sites: dict[str, SiteState] = {name: SiteState(name, wake=threading.Condition(self._lock))
                                            for name in sites}
        # Counts of tasks settled (answered or failed) and of failures, so that a waiter for a
        # round's answers can tell cheaply whether anything it counts has changed.
        self.settled = 0
        self.failures = 0
        self._sessions: dict[str, str] = {}
        # Sites that joined with a session that must heartbeat: the only ones a look for lapsed
        # heartbeats visits, so a simulation of 10,000 pooled sites costs it nothing. A local session
        # needs none: its liveness is vouched for in the server's own process (the memory transport:
        # it cannot vanish without the server; or the simulator's worker pool, which opened it and
        # watches the workers that run its tasks).
        self._beating: set[str] = set()
        self.revoked: set[str] = set()  # sites whose certificates were revoked while the job ran
        self.end: JobEnd | None = None
        # Told about every site failure (the Controller reports it as a progress event).
        self.on_site_failed: Callable[[str, str], None] | None = None
        # Told (under the lock: keep it cheap) which sites were just given a task: the simulator's
        # worker pool runs a site's script only when it has one.
        self.on_assigned: Callable[[Task, list[str]], None] | None = None

    # -- requests from sites -------------------------------------------------

    def _check_identity(self, site: str, job_id: str, token: str) -> SiteState:
        """The site a request names, if the caller may act for it: the name in its certificate
        (servers with a kit; ``token`` is None then) or the job's token."""
        _check_acts_for(site)
        if job_id != self.job_id:
            raise ServiceError(ErrorCode.WRONG_JOB, f"this server runs job {self.job_id[:40]!r}, not {job_id[:40]!r}")
        if self.token is not None and not hmac.compare_digest(token.encode(), self.token.encode()):
            raise ServiceError(ErrorCode.BAD_TOKEN, f"site {site[:40]!r}: bad job token")
        state = self.sites.get(site)
        if state is None:
            raise ServiceError(
                ErrorCode.UNKNOWN_SITE,
                f"site '{site[:100]}' is not part of job '{self.job_id}' ({len(self.sites)} sites: "
                f"{site_list(list(self.sites))})"
            )
        return state

    def join(self, site: str, job_id: str, token: str, local: bool = False) -> str:
        """Admit a site (again, after a restart) and return its new session id. ``local``: the site
        needs no heartbeats (see ``_beating``)."""
        with self.cond:
            state = self._check_identity(site, job_id, token)
            if site in self.revoked:
                raise ServiceError(ErrorCode.BAD_TOKEN, f"the certificate of {site!r} is revoked")
            if self.end is not None:
                raise ServiceError(ErrorCode.JOB_ENDED, f"job '{self.job_id}' has ended: {self.end.reason}")
            if state.session_id:
                self._sessions.pop(state.session_id, None)
            session_id = secrets.token_hex(16)
            self._sessions[session_id] = site
            state.session_id = session_id
            if local:
                self._beating.discard(site)
            else:
                self._beating.add(site)
            state.status = SiteStatus.JOINED
            state.failure = None
            state.last_seen = time.monotonic()
            if state.task is not None and state.task_outcome not in (None, "done", ACCEPTING):
                state.task = None  # a failed task is not handed out again (one being folded in stays)
            self.cond.notify_all()
            self._wake_locked(state)  # a wait of the old session learns it is gone
            return session_id

    def touch_locked(self, session_id: str) -> SiteState:
        """The site of a session, marked as just seen. Caller holds ``cond``."""
        site = self._sessions.get(session_id)
        if site is None:
            raise ServiceError(ErrorCode.UNKNOWN_SESSION, "unknown session (the server restarted or the site re-joined); join again")
        state = self.sites[site]
        _check_acts_for(site, vouched=site not in self._beating)
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

        ``header_only``: a launcher asks whether a task waits (the task is not taken).
        """
        deadline = time.monotonic() + max(0.0, wait_s)
        with self.cond:
            while True:
                state = self.touch_locked(session_id)
                if state.task is not None and state.task_outcome is None:
                    if header_only:
                        return state.task.for_site(state.name)
                    return state.task.for_site(state.name)
                if self.end is not None:
                    return self.end
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                assert state.wake is not None
                state.wake.wait(remaining)

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str) -> str:
        """Fail the reporting site; returns its name (the session's site, whatever name was given)."""
        with self.cond:
            if session_id and session_id in self._sessions:
                state = self.touch_locked(session_id)
            else:
                state = self._check_identity(site, job_id, token)
            self._fail_locked(state, reason)
            return state.name

    def fail_task(self, site: str, reason: str) -> bool:
        """Fail ``site``'s open task, not the site: a worker that ran it died or the script ended
        without answering, and the site may be given later tasks. True if a task was open."""
        with self.cond:
            state = self.sites[site]
            if state.task is None or state.task_outcome is not None:
                return False
            self.settle_locked(state, reason)
            self._wake_locked(state)
        if self.on_site_failed is not None:
            self.on_site_failed(site, reason)
        return True

    def task_open(self, site: str, task_id: str) -> bool:
        """Whether ``site`` still waits to answer task ``task_id`` (not answered, failed or timed out)."""
        with self.cond:
            state = self.sites[site]
            return (state.task is not None and state.task.task_id == task_id and state.task_outcome is None
                    and self.end is None)

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
            self._wake_locked(state)

    # -- changes to the project while the job runs (a server with a kit) ----

    def add_site(self, site: str) -> bool:
        """Admit a site provisioned after the job started (it joins and gets tasks from the next
        round on); False if it was already a site of the job."""
        with self.cond:
            if site in self.sites:
                return False
            self.sites[site] = SiteState(site, wake=threading.Condition(self._lock))
            self.cond.notify_all()
            return True

    def revoke(self, site: str) -> None:
        """The site's certificate was revoked: its session ends, its open task fails, and it may
        not join again (a join already past the certificate check when the revocation came in
        included)."""
        with self.cond:
            self.revoked.add(site)
            state = self.sites.get(site)
            if state is not None and state.status != SiteStatus.FAILED:
                self._fail_locked(state, "its certificate was revoked")

    # -- used by the Controller ---------------------------------------------

    def _wake_locked(self, state: SiteState) -> None:
        if state.wake is not None:
            state.wake.notify_all()

    def settle_locked(self, state: SiteState, outcome: str) -> None:
        """Record the outcome of ``state``'s task (ACCEPTING, "done", or why it failed); the Controller
        is told."""
        state.task_outcome = outcome
        self.settled += 1
        if outcome != "done":
            self.failures += 1
        self.cond.notify_all()

    def _fail_locked(self, state: SiteState, reason: str) -> None:
        if state.status == SiteStatus.FAILED:
            return
        state.status = SiteStatus.FAILED
        state.failure = reason
        self.failures += 1
        if state.task is not None and state.task_outcome is None:
            self.settle_locked(state, reason)
        if state.session_id:
            # Its next call must re-join, so a site wrongly declared dead can come back.
            self._sessions.pop(state.session_id, None)
            state.session_id = None
        self.cond.notify_all()
        self._wake_locked(state)
        if self.on_site_failed is not None:
            self.on_site_failed(state.name, reason)

    def fail_site(self, site: str, reason: str) -> None:
        with self.cond:
            self._fail_locked(self.sites[site], reason)

    def reap_dead_locked(self) -> None:
        """Fail joined sites whose heartbeat lapsed. Caller holds ``cond``."""
        now = time.monotonic()
        for name in list(self._beating):
            state = self.sites[name]
            if state.status != SiteStatus.JOINED:
                self._beating.discard(name)
                continue
            if now - state.last_seen > self.heartbeat_timeout_s:
                self._fail_locked(
                    state, f"no heartbeat for {now - state.last_seen:.0f} s (limit {self.heartbeat_timeout_s:g} s)"
                )

    def active_sites_locked(self) -> list[str]:
        return [s.name for s in self.sites.values() if s.status == SiteStatus.JOINED]

    def assign_locked(self, task: Task, sites: list[str]) -> None:
        for name in sites:
            state = self.sites[name]
            state.task = task
            state.task_outcome = None
            self._wake_locked(state)
        self.cond.notify_all()
        if self.on_assigned is not None and sites:
            self.on_assigned(task, sites)

    def finish(self, failed: bool, reason: str) -> None:
        with self.cond:
            if self.end is None:
                self.end = JobEnd(failed=failed, reason=reason)
            self.cond.notify_all()
            for state in self.sites.values():
                self._wake_locked(state)

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
