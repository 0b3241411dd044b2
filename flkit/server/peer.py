"""The authenticated caller of the gRPC call a thread serves (set by ``flkit.server.identity``).

A module of its own, importing nothing heavy, because the site registry consults it on every
call while only servers with a startup kit load the certificate machinery.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

SITE = "site"
ADMIN = "admin"
# A simulator pool worker: it runs the tasks of sites the pool opened sessions for (never joins).
WORKER = "worker"


@dataclass(frozen=True)
class Peer:
    """The certificate's holder: its common name and its role (the certificate's OU)."""

    name: str
    role: str


PEER: ContextVar[Peer | None] = ContextVar("flkit_peer", default=None)


def current_peer() -> Peer | None:
    """The authenticated caller of the gRPC call this thread serves; None outside of one (the
    memory transport's in-process sites, or a server without a kit)."""
    return PEER.get()
