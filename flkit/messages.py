"""The protocol's domain types, shared by the server's JobService, the site's Session and every
transport between them.

Params travel here as tensors; bytes exist only inside a transport (gRPC streams, shared-memory
files). Errors carry a typed ``ErrorCode`` so a site decides what to do (join again, stop, retry)
from the code, never from the text of a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from flkit.errors import FLKitError

if TYPE_CHECKING:
    # One alias for params everywhere (``dict[str, torch.Tensor]``); imported for type checking
    # only, so ``import flkit.messages`` loads neither torch nor the codec.
    from flkit.wire.codec import Params
else:
    Params = dict

TRAIN = "train"
VALIDATE = "validate"
SUBMIT_MODEL = "submit_model"


class ErrorCode(str, Enum):
    """Why the job service refused a request. Each code says what the site should do."""

    UNKNOWN_SESSION = "unknown_session"  # the server restarted or declared the site dead: join again
    JOB_ENDED = "job_ended"  # the job is over: stop
    WRONG_JOB = "wrong_job"  # this server runs another job: a setup error
    UNKNOWN_SITE = "unknown_site"  # the site is not part of the job: a setup error
    BAD_TOKEN = "bad_token"  # authentication failed
    FORBIDDEN = "forbidden"  # the caller's certificate names another site than the one it acts for
    PROTOCOL = "protocol"  # the two sides speak different protocol versions
    INVALID = "invalid"  # a malformed request
    UNAVAILABLE = "unavailable"  # the server did not answer (not up yet, restarting, network): retry


class ServiceError(FLKitError):
    """A request the job service refused (or a transport could not deliver), with the code that
    says why: sites act on ``code``, people read the message."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Task:
    """A unit of work for one or more sites.

    On the server one Task is shared by every site it is assigned to and its ``params`` are
    the global model itself: nothing may change them. A transport gives each site its own
    copy (or bytes), so a site can never change the global model or another site's params.
    """

    task_id: str
    name: str
    round: int
    total_rounds: int
    params_type: str = ""  # "FULL" or "DIFF"; empty when the task carries no params
    meta: dict[str, Any] = field(default_factory=dict)
    params: Params | None = None
    # Server side only: per-site config the strategy planned (the site sees it merged into meta).
    site_meta: dict[str, dict[str, Any]] = field(default_factory=dict)

    def for_site(self, site: str) -> Task:
        """The task as ``site`` gets it: its own config merged into ``meta`` (the same task when it
        has none; the params are shared either way)."""
        extra = self.site_meta.get(site)
        if not extra:
            return self
        return replace(self, meta={**self.meta, **extra}, site_meta={})


@dataclass(frozen=True)
class JobEnd:
    """The job is over: completed or failed, and why."""

    failed: bool
    reason: str


# What asking for the next task gives: the task, the end of the job, or None (nothing yet).
TaskOrEnd = Task | JobEnd | None


@dataclass
class Result:
    """A site's answer to a task. ``params`` belong to the server once submitted: the service
    folds them into the aggregate (or stores them) before ``submit`` returns and keeps no
    reference, so a site's later changes to its own tensors cannot reach the aggregate."""

    task_id: str
    params_type: str = ""  # "FULL", "DIFF", or empty for metrics only
    params: Params | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SubmitReply:
    """The service's answer to a result: accepted, or the reason it was not (and whether the job ended)."""

    accepted: bool
    error: str = ""
    job_ended: bool = False


@dataclass(frozen=True)
class JoinReply:
    session_id: str
    job_config: dict[str, Any]
    heartbeat_interval_s: float
    # Transports the server offers beyond its gRPC endpoint, e.g. {"shm": "/dev/shm/flkit-<job>"}.
    offers: dict[str, str] = field(default_factory=dict)
