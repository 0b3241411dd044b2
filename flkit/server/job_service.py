"""The job service: what a site can ask of the server, independent of any transport.

Join, next task, submit, heartbeat, leave, report failure and tracking records. Every
transport (gRPC, shared memory's control channel, in-process memory) calls these methods;
the gRPC servicer only maps protobuf to and from them. Refusals are ``ServiceError``s with
a typed ``ErrorCode``; a refused result is a ``SubmitReply`` that says why.
"""

from __future__ import annotations

import logging

from flkit.errors import ValidationError
from flkit.messages import ErrorCode, JoinReply, Result, ServiceError, SubmitReply, TaskOrEnd
from flkit.report.tracking import TrackingHub
from flkit.server.controller import Controller, JobEndedError
from flkit.server.sites import SiteRegistry
from flkit.wire.tracking_records import check_records

log = logging.getLogger("flkit.server")

# The server holds a next-task call open at most this long; sites ask again.
MAX_TASK_WAIT_S = 30.0


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

    def join(self, site: str, job_id: str, token: str, protocol_version: int | None = None,
             local: bool = False) -> JoinReply:
        """Admit a site (again, after a restart or a lost session); its job settings come back.
        ``local``: the site runs in this process (the memory transport): the reply's heartbeat
        interval is 0, since it needs none (one thread per site saved)."""
        if protocol_version is not None and protocol_version != self.protocol_version:
            raise ServiceError(ErrorCode.PROTOCOL, f"protocol version {protocol_version} not supported "
                                                   f"(server speaks {self.protocol_version})")
        try:
            session_id = self.registry.join(site, job_id, token, local=local)
        except ServiceError as exc:
            log.warning("refused join of site %r: %s", site[:100], exc)
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
        wait = min(max(wait_s, 0.0), MAX_TASK_WAIT_S)
        return self.registry.next_task(session_id, wait, header_only=header_only)

    def submit(self, session_id: str, result: Result) -> SubmitReply:
        """Check and fold in a result before returning; ``result.params`` are not kept."""
        try:
            self.controller.submit(session_id, result)
        except JobEndedError as exc:
            return SubmitReply(accepted=False, error=str(exc), job_ended=True)
        except ValidationError as exc:
            return SubmitReply(accepted=False, error=str(exc))
        return SubmitReply(accepted=True)

    def refuse_result(self, session_id: str, reason: str) -> None:
        """A transport could not read a result (malformed params): the site fails, as for a bad result."""
        site = self.registry.site_of(session_id)
        log.error("rejected result: site %s: %s", site, reason)
        self.registry.fail_site(site, f"result rejected: site {site}: {reason}")

    def max_result_bytes(self) -> int:
        """No valid result is larger (transports refuse bigger uploads before reading them)."""
        return self.controller.max_result_bytes()

    def heartbeat(self, session_id: str) -> bool:
        """Mark the site alive; False once the job has ended."""
        return self.registry.heartbeat(session_id)

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str) -> None:
        self.registry.report_failure(site, job_id, token, session_id, reason)
        log.error("site %s failed: %s", site, (reason or "?").splitlines()[0])
        log.debug("site %s failure details: %s", site, reason)

    def leave(self, session_id: str, reason: str = "") -> None:
        self.registry.leave(session_id, reason)

    def log_metrics(self, session_id: str, records_json: str) -> None:
        """A batch of tracking records (a JSON array) for the job's receivers."""
        site = self.registry.site_of(session_id)
        try:
            records = check_records(records_json)
        except ValidationError as exc:
            log.warning("site %s: tracking records refused: %s", site, exc)
            raise ServiceError(ErrorCode.INVALID, str(exc)) from None
        if self.tracking is not None and self.tracking.enabled:
            self.tracking.write(site, records)

    def site_of(self, session_id: str) -> str:
        return self.registry.site_of(session_id)

