"""The job service: what a site can ask of the server, independent of any transport.

Join, next task, submit, heartbeat, leave, report failure and tracking records. Every
transport (gRPC, shared memory's control channel, in-process memory) calls these methods;
the gRPC servicer only maps protobuf to and from them. Refusals are ``ServiceError``s with
a typed ``ErrorCode``; a refused result is a ``SubmitReply`` that says why.

Everything a site sends is bounded here, whatever the transport, before any of it is logged,
stored or quoted in a refusal: site names (``check_site_name``), job ids, tokens, session and task
ids, params types and free text (a failure report is kept to ``MAX_REASON_CHARS``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from flkit.errors import ConfigError, ValidationError
from flkit.messages import ErrorCode, JoinReply, Result, ServiceError, SubmitReply, TaskOrEnd
from flkit.report.tracking import TrackingHub
from flkit.server.config import check_site_name
from flkit.server.controller import Controller, JobEndedError, StreamedResult
from flkit.server.sites import SiteRegistry
from flkit.server.streamed_upload import UploadRefused
from flkit.server.validation import (
    MAX_TOKEN_CHARS,
    check_job_id,
    check_params_type,
    check_task_id,
    is_id,
    short_reason,
)
from flkit.strategy.base import RoundClosed
from flkit.wire.tracking_records import check_records

log = logging.getLogger("flkit.server")

# The server holds a next-task call open at most this long; sites ask again.
MAX_TASK_WAIT_S = 30.0


def checked_session(session_id: str) -> str:
    """``session_id`` if it could be one the server handed out (bounded, plain characters); else the
    refusal of an unknown session, before the id is looked up, logged or quoted anywhere."""
    if not is_id(session_id):
        raise ServiceError(ErrorCode.UNKNOWN_SESSION, "malformed session id (not one this server hands out); "
                                                      "join again")
    return session_id


def checked_site(site: str) -> str:
    """``site`` if it is a well-formed site name (``check_site_name``), else an INVALID refusal."""
    try:
        return check_site_name(site)
    except ConfigError as exc:
        raise ServiceError(ErrorCode.INVALID, str(exc)) from None


def _checked_identity(site: str, job_id: str, token: str) -> None:
    """Bounds on what a site claims to be, checked before the registry compares it with the job's."""
    checked_site(site)
    try:
        check_job_id(job_id)
    except ValidationError as exc:
        raise ServiceError(ErrorCode.INVALID, str(exc)) from None
    if len(token) > MAX_TOKEN_CHARS:
        raise ServiceError(ErrorCode.BAD_TOKEN, f"site '{site}': bad job token")


class JobService:
    """One job's service: the registry (who is in the job) and the controller (the rounds)."""

    def __init__(self, registry: SiteRegistry, controller: Controller, tracking: TrackingHub | None = None,
                 protocol_version: int = 0) -> None:
        self.registry = registry
        self.controller = controller
        self.tracking = tracking
        self.protocol_version = protocol_version
        # Transports the server offers at join beyond its own endpoint (name -> where).
        self.offers: dict[str, str] = {}

    def join(self, site: str, job_id: str, token: str | None, protocol_version: int | None = None,
             local: bool = False) -> JoinReply:
        """Admit a site (again, after a restart or a lost session); its job settings come back.
        ``local``: the site runs in this process (the memory transport): the reply's heartbeat
        interval is 0, since it needs none (one thread per site saved). ``token`` None: none (a
        server whose sites are who their certificates say has no job token)."""
        token = token or ""
        if protocol_version is not None and protocol_version != self.protocol_version:
            raise ServiceError(ErrorCode.PROTOCOL, f"protocol version {protocol_version!r:.20} not supported "
                                                   f"(server speaks {self.protocol_version})")
        _checked_identity(site, job_id, token)  # nothing of a malformed request is logged
        try:
            session_id = self.registry.join(site, job_id, token, local=local)
        except ServiceError as exc:
            log.warning("refused join of site %r: %s", site, exc)
            raise
        config = dict(self.registry.client_config, site_name=site,
                      client_tracking=self.controller.config.client_tracking_for(site))
        log.info("site %s joined", site)
        self.controller.emit({"type": "site_joined", "site": site})
        interval = 0.0 if local else self.controller.config.heartbeat_interval_s
        return JoinReply(session_id, config, interval, dict(self.offers))

    def next_task(self, session_id: str, wait_s: float, header_only: bool = False) -> TaskOrEnd:
        """The site's task (shared with other sites: transports copy it, never change it), the
        end of the job, or None when nothing came within ``wait_s`` (capped at MAX_TASK_WAIT_S)."""
        wait = min(max(wait_s, 0.0), MAX_TASK_WAIT_S) if math.isfinite(wait_s) else 0.0
        return self.registry.next_task(checked_session(session_id), wait, header_only=header_only)

    def submit(self, session_id: str, result: Result) -> SubmitReply:
        """Check and fold in a result before returning; ``result.params`` are not kept.

        A malformed task id or params type is refused (the site may send again); a result that
        does not fit the task (keys, shapes, dtypes, values, metrics) fails the site."""
        checked_session(session_id)
        try:
            self.check_result_header(result.task_id, result.params_type)
        except ValidationError as exc:
            return SubmitReply(accepted=False, error=str(exc))
        try:
            self.controller.submit(session_id, result)
        except JobEndedError as exc:
            return SubmitReply(accepted=False, error=str(exc), job_ended=True)
        except ValidationError as exc:
            return SubmitReply(accepted=False, error=str(exc))
        return SubmitReply(accepted=True)

    def begin_streamed(self, session_id: str, result: Result,
                       cancel: Callable[[], None] | None = None) -> StreamedResult | SubmitReply | None:
        """Open a result to be folded in while its params arrive (``result`` without params):
        a StreamedResult to feed; a SubmitReply when it is answered already (acknowledged as sent
        before, or refused on what its header says); None when the round's aggregator takes whole
        results only (receive it whole and ``submit`` it)."""
        checked_session(session_id)
        try:
            self.check_result_header(result.task_id, result.params_type)
            opened = self.controller.begin_result(session_id, result, cancel)
        except JobEndedError as exc:
            return SubmitReply(accepted=False, error=str(exc), job_ended=True)
        except (ValidationError, RoundClosed) as exc:
            return SubmitReply(accepted=False, error=str(exc))
        if opened is True:
            return SubmitReply(accepted=True)
        if opened is False:
            return None
        return opened

    def end_streamed(self, streamed: StreamedResult) -> None:
        """Every byte of ``streamed`` is in: it counts (Controller.end_result; raises as it does)."""
        self.controller.end_result(streamed)

    def drop_streamed(self, streamed: StreamedResult, problem: BaseException) -> SubmitReply:
        """``streamed`` does not count (Controller.drop_result): ``problem`` stopped it. The reply for
        the site: a ValidationError is the site's result being wrong (its task fails), anything known
        is a refusal it may retry, anything else is the server's own failure (logged with its
        traceback; the site may retry too)."""
        known = (ValidationError, UploadRefused, RoundClosed, JobEndedError, ServiceError)
        if not isinstance(problem, known):
            log.error("site %s: the server could not fold its result in", streamed.site, exc_info=problem)
        self.controller.drop_result(streamed, problem)
        if isinstance(problem, JobEndedError):
            return SubmitReply(accepted=False, error=str(problem), job_ended=True)
        return SubmitReply(accepted=False, error=short_reason(str(problem) or type(problem).__name__))

    @staticmethod
    def check_result_header(task_id: str, params_type: str) -> None:
        """The ids of a result, checked before its params are read (ValidationError says what is wrong)."""
        check_task_id(task_id)
        check_params_type(params_type)

    def refuse_result(self, session_id: str, reason: str) -> None:
        """A transport could not read a result (malformed params): the site fails, as for a bad result."""
        site = self.registry.site_of(checked_session(session_id))
        reason = short_reason(reason)
        log.error("rejected result: site %s: %s", site, reason)
        self.registry.fail_site(site, f"result rejected: site {site}: {reason}")

    def max_result_bytes(self) -> int:
        """No valid result is larger (transports refuse bigger uploads before reading them)."""
        return self.controller.max_result_bytes()

    def heartbeat(self, session_id: str) -> bool:
        """Mark the site alive; False once the job has ended."""
        return self.registry.heartbeat(checked_session(session_id))

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str) -> None:
        """The site's script failed. Its name is checked whenever it is given (a site always gives
        it); the session, when known, says which site it is; otherwise the name, job id and token.
        The reason is kept to MAX_REASON_CHARS characters, and only its first line is logged."""
        if site or not session_id:
            checked_site(site)
        if not is_id(session_id):
            session_id = ""  # no session of this server: the site is known by its name and token
            _checked_identity(site, job_id, token)
        reason = short_reason(reason)
        site = self.registry.report_failure(site, job_id, token, session_id, reason)
        log.error("site %s failed: %s", site, short_reason((reason or "?").splitlines()[0], 500))
        log.debug("site %s failure details: %s", site, reason)

    def leave(self, session_id: str, reason: str = "") -> None:
        self.registry.leave(checked_session(session_id), short_reason(reason))

    def log_metrics(self, session_id: str, records_json: str) -> None:
        """A batch of tracking records (a JSON array) for the job's receivers."""
        site = self.registry.site_of(checked_session(session_id))
        try:
            records = check_records(records_json)
        except ValidationError as exc:
            log.warning("site %s: tracking records refused: %s", site, exc)
            raise ServiceError(ErrorCode.INVALID, str(exc)) from None
        if self.tracking is not None and self.tracking.enabled:
            self.tracking.write(site, records)

    def site_of(self, session_id: str) -> str:
        return self.registry.site_of(checked_session(session_id))

    def status(self, last_rounds: int = 0) -> dict[str, Any]:
        """The job now, for its admins (``flkit status``): phase, round, sites, latest rounds."""
        from flkit.server.status import job_status

        return job_status(self.registry, self.controller, last_rounds,
                          extra={"output_dir": str(self.controller.persistor.directory)})

    def abort(self, reason: str) -> None:
        """End the job now: it fails with ``reason``; sites learn it from their next call."""
        reason = short_reason(reason)
        log.warning("job %s aborted: %s", self.registry.job_id, reason.splitlines()[0] if reason else "")
        self.registry.finish(True, reason if reason.startswith("aborted") else f"aborted: {reason}")
