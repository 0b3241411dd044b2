"""Params as safetensors files in a shared-memory folder (/dev/shm), for sites on the server's host.

Why files in /dev/shm: a tmpfs file is plain memory that another process of the same user can
map without any serialisation, and it has a name, so both sides agree on it through a short
control message. Not torch's shared-memory tensors (they travel through a pickler) and not
``multiprocessing.shared_memory`` (its resource tracker deletes segments other processes still
use). Files are created with mode 0600 in a folder of mode 0700; a reader maps a file
copy-on-write, so its tensors are views of the shared pages that it may change privately.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
from pathlib import Path

from flkit.errors import ValidationError
from flkit.wire.codec import Params, to_cpu_params
from flkit.wire.tensor_stream import Encoded, parse

SHM_ROOT = Path("/dev/shm")
FOLDER_PREFIX = "flkit-"
PROBE_FILE = "probe"
_NAME = re.compile(r"(task|result)-[0-9a-f]{1,64}(-[0-9a-f]{1,64})?\.safetensors")


def task_file_name(task_id: str) -> str:
    return f"task-{task_id}.safetensors"


def result_file_name(session_id: str, task_id: str) -> str:
    return f"result-{session_id}-{task_id}.safetensors"


def check_name(name: str) -> str:
    """A file name of this protocol (no path, no link tricks), or ValidationError."""
    if not _NAME.fullmatch(name):
        raise ValidationError(f"shared-memory file name {name[:80]!r} is not one flkit writes")
    return name


def create_private(path: Path) -> None:
    """An empty file only this user can read (safetensors then writes into it, keeping the mode)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    os.close(fd)


def write_params_file(folder: Path, name: str, params: Params, reuse: Path | None = None) -> int:
    """Write params as safetensors to ``folder/name`` (atomically: a reader never sees half a file);
    its size.

    ``reuse``: a file of this writer in ``folder`` that nobody maps any more (its last reader said
    so), whose memory is written over instead of allocated again. Why: tmpfs gives a new file
    fresh pages, which the kernel zeroes on first write; for a 100 MB model that costs about three
    times the copy itself. The file is renamed to a temporary name, written in place, cut to size
    and renamed into place.
    """
    final = folder / check_name(name)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    if reuse is not None:
        try:
            os.rename(folder / check_name(reuse.name), tmp)
        except OSError:
            reuse = None
    if reuse is None:
        create_private(tmp)
    try:
        encoded = Encoded(to_cpu_params(params))
        fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            pos = 0
            for piece in [memoryview(encoded.header), *encoded.views]:
                while len(piece):
                    written = os.pwrite(fd, piece, pos)
                    pos += written
                    piece = piece[written:]
            os.ftruncate(fd, encoded.size)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full /dev/shm, a file-size limit: name the file
            raise OSError(exc.errno, f"cannot write {final}: {exc.strerror or exc}") from exc
        raise
    return encoded.size


def map_params_file(path: Path, expected_size: int | None = None) -> Params:
    """Tensors that are copy-on-write views of the file: no copy, and changing them changes
    nothing in the file. The file must be a regular file of this user (not a link)."""
    return parse(map_file(path, expected_size))


def map_file(path: Path, expected_size: int | None = None) -> mmap.mmap:
    """The file mapped copy-on-write (for ``parse``: its tensors keep the mapping alive, so a weak
    reference to it tells when nothing reads the file any more). The file must be a regular file
    of this user (not a link) and, if given, of ``expected_size`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValidationError(f"cannot open shared-memory params {path.name}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            raise ValidationError(f"shared-memory params {path.name} is not a regular file of this user")
        if expected_size is not None and info.st_size != expected_size:
            raise ValidationError(f"shared-memory params {path.name} has {info.st_size} bytes, "
                                  f"expected {expected_size}")
        if info.st_size < 8:
            raise ValidationError(f"shared-memory params {path.name} is too short ({info.st_size} bytes)")
        return mmap.mmap(fd, info.st_size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize
