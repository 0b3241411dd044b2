"""Who is calling: the peer's identity, taken from its client certificate, never from a message.

On a server started with a startup kit every gRPC call passes through ``IdentityInterceptor``
before any handler (or byte of payload) runs. The TLS handshake has already proven that the
peer holds a certificate of this project's CA; the interceptor then checks what the handshake
cannot: that the certificate is not revoked (grpcio's Python server has no CRL option), that its
name is a participant of the project, and that its role may call the method (sites the job's
calls, admins the status call). The peer's name is then known to the handlers through
``flkit.server.peer.current_peer()``; the site registry compares it with the site a request acts for, so a site
can neither join as another site, nor submit for one, nor answer a task it was not given.

The server's kit folder is watched (``KitWatcher``): a site added with ``flkit provision
--add-site`` or revoked with ``--revoke`` takes effect without a restart, and a revoked site's
open calls are cancelled at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from flkit.deploy.kit import CRL, PARTICIPANTS, read_participant_lists, read_revoked_serials
from flkit.server.peer import ADMIN, PEER, SITE, WORKER, Peer

log = logging.getLogger("flkit.server")


class Participants:
    """The project's sites, admins and revoked certificates, as the server's kit says now."""

    def __init__(self, kit_dir: Path) -> None:
        self.kit_dir = Path(kit_dir)
        self._lock = threading.Lock()
        self.sites: frozenset[str] = frozenset()
        self.admins: frozenset[str] = frozenset()
        self.workers: frozenset[str] = frozenset()
        self.revoked_names: frozenset[str] = frozenset()
        self.revoked_serials: frozenset[int] = frozenset()
        self._stamp: tuple[float, ...] = ()
        self.reload()

    def _files(self) -> tuple[Path, Path]:
        return self.kit_dir / PARTICIPANTS, self.kit_dir / CRL

    def stamp(self) -> tuple[float, ...]:
        """The files' modification times and sizes: a change means a reload."""
        out: list[float] = []
        for path in self._files():
            try:
                st = path.stat()
            except FileNotFoundError:
                out += [0.0, -1.0]
                continue
            out += [st.st_mtime_ns, st.st_size]
        return tuple(out)

    def reload(self) -> tuple[set[str], set[str]]:
        """Read the files again; returns (sites added, names revoked) since the last read."""
        stamp = self.stamp()
        lists = read_participant_lists(self.kit_dir)
        serials = read_revoked_serials(self.kit_dir)
        with self._lock:
            added = set(lists["sites"]) - self.sites
            newly_revoked = set(lists["revoked"]) - self.revoked_names
            self.sites, self.admins = frozenset(lists["sites"]), frozenset(lists["admins"])
            self.workers, self.revoked_names = frozenset(lists["workers"]), frozenset(lists["revoked"])
            self.revoked_serials = frozenset(serials)
            self._stamp = stamp
        return added, newly_revoked

    def changed(self) -> bool:
        return self.stamp() != self._stamp


def _serial_of(pem: bytes, cache: dict[bytes, int]) -> int:
    serial = cache.get(pem)
    if serial is None:
        serial = x509.load_pem_x509_certificate(pem).serial_number
        if len(cache) > 10_000:  # bounded: one entry per certificate seen
            cache.clear()
        cache[pem] = serial
    return serial


# Which roles may call which methods of the service (by the method's last path element): admins
# only these; workers only the calls of a session the simulator's pool opened; sites all but ADMIN's.
ADMIN_METHODS = frozenset({"Status", "Abort"})
WORKER_METHODS = frozenset({"GetTask", "SubmitResult", "LogMetrics"})


class IdentityInterceptor(grpc.ServerInterceptor):
    """Authenticates every call by its client certificate (see the module's docstring)."""

    def __init__(self, participants: Participants) -> None:
        self.participants = participants
        self._serials: dict[bytes, int] = {}
        self._active: dict[str, set[grpc.ServicerContext]] = {}
        self._lock = threading.Lock()

    def _peer(self, context: grpc.ServicerContext, method: str) -> Peer:
        auth = context.auth_context()
        names = auth.get("x509_common_name") or []
        pems = auth.get("x509_pem_cert") or []
        if not names or not pems:  # the handshake requires a certificate; this is a safety net
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        name = names[0].decode(errors="replace")
        subject = (auth.get("x509_subject") or [b""])[0].decode(errors="replace")
        units = subject.split(",")
        role = ADMIN if "OU=admin" in units else WORKER if "OU=worker" in units else SITE
        p = self.participants
        if _serial_of(pems[0], self._serials) in p.revoked_serials or name in p.revoked_names:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"the certificate of {name[:64]!r} is revoked (flkit provision --revoke)")
        known = {ADMIN: p.admins, WORKER: p.workers}.get(role, p.sites)
        if name not in known:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{name[:64]!r} is not a {role} of this project (its server kit lists no such {role})")
        if role == WORKER:
            allowed = method in WORKER_METHODS
        else:
            allowed = (role == ADMIN) == (method in ADMIN_METHODS)
        if not allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{role} {name!r} may not call {method}")
        return Peer(name, role)

    def _enter(self, peer: Peer, context: grpc.ServicerContext) -> None:
        with self._lock:
            self._active.setdefault(peer.name, set()).add(context)

    def _leave(self, peer: Peer, context: grpc.ServicerContext) -> None:
        with self._lock:
            calls = self._active.get(peer.name)
            if calls is not None:
                calls.discard(context)
                if not calls:
                    del self._active[peer.name]

    def cancel_calls_of(self, name: str) -> int:
        """Cancel every open call of ``name`` (its certificate was just revoked)."""
        with self._lock:
            calls = list(self._active.pop(name, ()))
        for context in calls:
            context.cancel()
        return len(calls)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))  # type: ignore[attr-defined]
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))  # type: ignore[attr-defined]
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))  # type: ignore[attr-defined]
        return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))  # type: ignore[attr-defined]

    def _wrap_unary(self, behaviour: Callable[[Any, grpc.ServicerContext], Any],
                    method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            peer = self._peer(context, method)
            self._enter(peer, context)
            token = PEER.set(peer)
            try:
                return behaviour(request, context)
            finally:
                PEER.reset(token)
                self._leave(peer, context)

        return authenticated

    def _wrap_stream(self, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                     method: str) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def authenticated(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            peer = self._peer(context, method)
            self._enter(peer, context)
            try:
                responses = behaviour(request, context)
                while True:  # the peer is set while the handler computes each response
                    token = PEER.set(peer)
                    try:
                        item = next(responses)
                    except StopIteration:
                        return
                    finally:
                        PEER.reset(token)
                    yield item
            finally:
                self._leave(peer, context)

        return authenticated


class KitWatcher:
    """Re-reads the server kit's participants.json and crl.pem when they change (every
    ``interval_s``): added sites are admitted, revoked ones lose their open calls and fail."""

    def __init__(self, participants: Participants, interceptor: IdentityInterceptor,
                 on_added: Callable[[str], None], on_revoked: Callable[[str], None],
                 interval_s: float = 1.0) -> None:
        self.participants = participants
        self.interceptor = interceptor
        self.on_added = on_added
        self.on_revoked = on_revoked
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flkit-kit-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def check(self) -> None:
        """One look at the files (the thread calls this; tests may too)."""
        if not self.participants.changed():
            return
        try:
            added, revoked = self.participants.reload()
        except Exception as exc:  # a half-copied or bad file: keep the last good lists
            log.error("server kit %s: cannot read the participants or the revocation list: %s",
                      self.participants.kit_dir, exc)
            return
        for name in sorted(revoked):
            cancelled = self.interceptor.cancel_calls_of(name)
            log.warning("certificate of %s revoked: %d open call(s) closed", name, cancelled)
            self.on_revoked(name)
        for name in sorted(added):
            log.info("site %s added to the project", name)
            self.on_added(name)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
