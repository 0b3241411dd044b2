"""Which Session is "current": the registry behind ``flkit.init()`` and every Client API call.

Each in-process site thread has its own Session (a ContextVar: the runner runs each site's
script in its own context). A standalone process (external launch, ``flkit client``) has one
Session for the whole process, so threads the script starts, which do not inherit
ContextVars, still find it.

This module imports neither the Session classes nor gRPC, so ``flkit.api`` and
``flkit.tracking`` can both import it at their top.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from flkit.client.settings import in_runner_context
from flkit.errors import FLKitError

if TYPE_CHECKING:
    from flkit.client.follower import FollowerSession
    from flkit.client.session import Session
    from flkit.messages import JoinReply, Task
    from flkit.transport.base import Transport

__all__ = ["AnySession", "Handover", "clear_session", "current_session", "handover", "require_session",
           "set_handover", "set_session"]

# Rank 0 (or a single-process site) has a Session; ranks > 0 of a torch.distributed job a FollowerSession.
AnySession: TypeAlias = "Session | FollowerSession"

_session_var: ContextVar[AnySession | None] = ContextVar("flkit_session", default=None)
# The process's one session outside the runner's in-process site threads.
_process_session: AnySession | None = None


def current_session() -> AnySession | None:
    """This site's Session, or None before ``init()`` (used by the runner to close it)."""
    return _session_var.get() or (None if in_runner_context() else _process_session)


def require_session() -> AnySession:
    """This site's Session; a clear error if ``init()`` was not called."""
    session = current_session()
    if session is None:
        raise FLKitError("flkit.init() has not been called in this site")
    return session


def set_session(session: AnySession) -> None:
    """Make ``session`` the current one: for this context, and for the whole process outside
    the runner's in-process site threads."""
    global _process_session
    _session_var.set(session)
    if not in_runner_context():
        _process_session = session


def clear_session(session: AnySession) -> None:
    """Forget ``session`` (closed by ``shutdown()``): this context has none until the next ``init()``."""
    global _process_session
    _session_var.set(None)
    if _process_session is session:
        _process_session = None


@dataclass(frozen=True)
class Handover:
    """A session the simulator's worker pool opened for the site a worker runs now, and the
    worker's transport: ``flkit.init()`` uses them instead of joining (``Session(handed=...)``)."""

    reply: JoinReply
    transport: Transport
    # The site's task, already taken for it by the pool (None: the session asks the server).
    task: Task | None = None
    # The sessions ``flkit.init()`` made from this handover (one), for the pool to close.
    sessions: list[AnySession] = field(default_factory=list)


_handover_var: ContextVar[Handover | None] = ContextVar("flkit_handover", default=None)


def handover() -> Handover | None:
    """The pool's session for this site-task, if a pool runs it."""
    return _handover_var.get()


def set_handover(value: Handover | None) -> None:
    """Used by a pool worker inside the site-task's own context."""
    _handover_var.set(value)
