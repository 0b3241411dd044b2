"""The shared-memory transport: for sites that are other processes on the server's host.

Control messages go over gRPC; params go through safetensors files in the job's /dev/shm
folder that the server offered at join. A site uses the folder only if it can read the probe
file the server wrote there (same host, same user) and the probe says what the offer said;
otherwise, and whenever a file cannot be written (``/dev/shm`` full), the bytes go over gRPC,
with one warning. Received params are copy-on-write views of the server's file (no copy); once
nothing of the site holds them any more (the mapping is gone), the site says so with its next
result or request for a task, and the server may write a later global model into that file. A
result is written once, into a file the server maps and folds in before it answers; the site then
writes its next result over the same memory (a fresh tmpfs file costs the kernel's zeroing of
every page) and removes the file when it leaves.
"""

from __future__ import annotations

import logging
import mmap
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flkit.errors import ValidationError
from flkit.messages import ErrorCode, JoinReply, Result, ServiceError, SubmitReply, Task, TaskOrEnd
from flkit.transport.grpc_transport import GrpcTransport
from flkit.wire import shm_files
from flkit.wire.tensor_stream import parse

if TYPE_CHECKING:  # only a site with a startup kit loads the certificate machinery
    from flkit.deploy.kit import Kit

log = logging.getLogger("flkit.client")

# Room left free in /dev/shm when writing a result.
MARGIN_BYTES = 8 * 1024 * 1024


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


class ShmTransport(GrpcTransport):
    """gRPC for control, files in the server's shared-memory folder for params."""

    name = "shm"

    def __init__(self, address: str, required: bool = False, kit: Kit | None = None) -> None:
        """``required``: the site asked for shm by name, so not getting it deserves a warning even
        when the server is on another host. ``kit``: mutual TLS for the control channel."""
        super().__init__(address, kit)
        self.required = required
        self.folder: Path | None = None
        self._warned = False
        self._spare: Path | None = None  # this site's last result file, read by the server already
        # The server's files this site mapped, by (session, name): told released, by the session that
        # was given them, once every mapping is gone. (A pool worker's transport serves many sessions.)
        self._mapped: dict[tuple[str, str], list[weakref.ref[mmap.mmap]]] = {}
        self._fetching_for = ""  # the session whose task is being fetched

    @property
    def active(self) -> bool:
        """True while params go through files."""
        return self.folder is not None

    def _fall_back(self, why: str) -> None:
        self.folder = None
        if not self._warned:
            self._warned = True
            log.warning("shared-memory transport not used (%s); params go over gRPC to %s", why, self.address)

    def join(self, site: str, job_id: str, token: str, timeout: float) -> JoinReply:
        reply = super().join(site, job_id, token, timeout)
        self.use_offers(reply.offers)
        return reply

    def use_offers(self, offers: dict[str, str]) -> None:
        """Take params through the offered folder if this process can use it (see the module doc)."""
        folder, probe = offers.get("shm"), offers.get("shm_probe")
        if not folder or not probe:
            if self.required:
                self._fall_back("the server offers no shared-memory folder")
            return
        path = Path(folder)
        if path == self.folder:
            return  # checked already (a pool worker adopts one session after another)
        if not path.exists() and not self.required:
            self.folder = None  # the server is on another host: gRPC it is, nothing to warn about
            return
        try:
            fd = os.open(path / shm_files.PROBE_FILE, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                seen = os.read(fd, 256).decode(errors="replace")
            finally:
                os.close(fd)
        except OSError as exc:
            self._fall_back(f"cannot read {path / shm_files.PROBE_FILE}: {exc.strerror}")
            return
        if seen != probe:
            self._fall_back(f"{path} belongs to another server")
            return
        self.folder = path

    def get_task(self, session_id: str, wait_s: float, timeout: float, header_only: bool = False) -> TaskOrEnd:
        self._fetching_for = session_id
        return self._get_task(session_id, wait_s, timeout, header_only, by_file=self.folder is not None,
                              released=self._released(session_id))

    def _released(self, session_id: str) -> list[str]:
        """Files this session mapped and no longer maps (each told once: a lost message only means the
        server never writes into that file again)."""
        gone = [key for key, refs in self._mapped.items()
                if key[0] == session_id and all(ref() is None for ref in refs)]
        for key in gone:
            del self._mapped[key]
        return [name for _, name in gone]

    def task_from_file(self, session_id: str, header: dict[str, Any]) -> Task | None:
        """The task a worker pool took for ``session_id`` (``SiteTask.task``), its params mapped from
        the file the header names; None when this process cannot map it (the session then asks)."""
        if self.folder is None:
            return None
        task = Task(str(header["task_id"]), str(header["name"]), int(header["round"]), int(header["total_rounds"]),
                    str(header["params_type"]), dict(header["meta"]))
        self._fetching_for = session_id
        try:
            self._params_from_file(task, str(header["params_file"]), int(header["payload_size"]))
        except (ValidationError, ServiceError) as exc:
            log.debug("session %s: the pool's task file cannot be used (%s); asking the server", session_id, exc)
            return None
        return task

    def holds_files(self, session_id: str) -> bool:
        """Whether ``session_id`` still maps a file of the server through this transport."""
        return any(key[0] == session_id for key in self._mapped)

    def take_released(self, session_id: str) -> list[str]:
        """The server's files ``session_id`` mapped and no longer maps, for a worker pool to tell the
        server itself (the session's next call may come from another worker, or never)."""
        return self._released(session_id)

    def _params_from_file(self, task: Task, name: str, size: int) -> None:
        if self.folder is None:
            raise ValidationError("the server sent a params file, but this site uses no shared-memory folder")
        try:
            mapping = shm_files.map_file(self.folder / shm_files.check_name(name), size)
            self._mapped.setdefault((self._fetching_for, name), []).append(weakref.ref(mapping))
            task.params = parse(mapping)
        except ValidationError as exc:
            if (self.folder / name).exists():
                raise
            # The task closed and its file went before this site opened it: ask again.
            raise ServiceError(ErrorCode.UNAVAILABLE, f"task params file {name} is gone ({exc})") from None

    def submit(self, session_id: str, result: Result, timeout: float) -> SubmitReply:
        folder = self.folder
        if folder is None or result.params is None:
            return super().submit(session_id, result, timeout)
        name = shm_files.result_file_name(session_id, result.task_id)
        reuse, self._spare = self._spare, None
        need = sum(t.numel() * t.element_size() for t in result.params.values()) + MARGIN_BYTES
        try:
            if shm_files.free_bytes(folder) + (_size_of(reuse) if reuse else 0) < need:
                raise OSError(f"{need / 2**20:.0f} MiB needed, less free")
            size = shm_files.write_params_file(folder, name, result.params, reuse=reuse)
        except OSError as exc:
            (folder / name).unlink(missing_ok=True)
            if reuse is not None:
                reuse.unlink(missing_ok=True)
            self._fall_back(f"cannot write the result to {folder}: {exc}")
            return super().submit(session_id, result, timeout)
        try:
            reply = self._submit_header(session_id, result, params_file=name, size=size, timeout=timeout,
                                        released=self._released(session_id))
        except BaseException:  # the server may still be reading it: never write into this file again
            (folder / name).unlink(missing_ok=True)
            raise
        # The server answers only after it has read the result (checked and folded in, or refused), so
        # the file's memory is free: the next result is written over it (flkit.wire.shm_files).
        self._spare = folder / name
        return reply

    def close(self) -> None:
        if self._spare is not None:
            self._spare.unlink(missing_ok=True)
            self._spare = None
        super().close()
