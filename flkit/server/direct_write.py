"""Writing a model file without the page cache (O_DIRECT), so saving does not slow the round.

Why: a buffered write of a 100 MB model costs 40-45 ms of CPU here (the kernel allocates page
cache pages and copies every byte into them), on a machine whose two cores are running the round
at the same time. With O_DIRECT the disk reads the data straight from memory (about 5 ms of CPU for
the writes themselves); with the copy into the bounce buffer below, a save costs 18-27 ms of CPU
(2-core VM, ext4 on virtio; bench/README.md).

O_DIRECT wants the memory, the file offset and the length aligned to the device's block size,
which tensors are not. So the file is written through one page-aligned bounce buffer
(BOUNCE_BYTES, reused): the safetensors bytes are copied into it (numpy, without the GIL) and
written in whole blocks; the last block is padded and the file is then cut to its exact size.

Where the file system refuses O_DIRECT (older tmpfs, some network and FUSE file systems) or an
aligned write, ``DirectWriter.write`` raises ``DirectWriteUnsupported`` and the caller writes the
usual way.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Mapping

import numpy as np
import torch

from flkit.wire.tensor_stream import Encoded

BOUNCE_BYTES = 8 << 20
# What file systems answer to an O_DIRECT open or write they do not take.
REFUSED_ERRNOS = {errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL), getattr(errno, "ENOTSUP", errno.EINVAL)}
ALIGN = 4096  # a multiple of every common logical block size (512, 4096)


class DirectWriteUnsupported(OSError):
    """This file system (or this file) does not take O_DIRECT writes; write it buffered."""


class DirectWriter:
    """Writes safetensors files with O_DIRECT through one reusable bounce buffer. One thread."""

    def __init__(self, bounce_bytes: int = BOUNCE_BYTES) -> None:
        if bounce_bytes <= 0 or bounce_bytes % ALIGN:
            raise ValueError(f"bounce_bytes must be a positive multiple of {ALIGN}")
        self._size = bounce_bytes
        self._bounce: mmap.mmap | None = None  # anonymous mappings are page aligned
        self.usable = hasattr(os, "O_DIRECT")  # the caller sets False after DirectWriteUnsupported

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def write(self, path: str, params: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
        """Write ``params`` as safetensors into the existing empty file ``path``; its size.

        Raises DirectWriteUnsupported when O_DIRECT cannot be used here (nothing useful is then
        in the file: the caller truncates it and writes it buffered), OSError for real I/O errors.
        """
        flag = getattr(os, "O_DIRECT", None)
        if flag is None:
            raise DirectWriteUnsupported(errno.EINVAL, "O_DIRECT is not available on this system")
        try:
            fd = os.open(path, os.O_WRONLY | flag)
        except OSError as exc:
            if exc.errno in REFUSED_ERRNOS:
                raise DirectWriteUnsupported(exc.errno, f"{path}: the file system refuses O_DIRECT") from exc
            raise
        try:
            encoded = Encoded(params, metadata)
            self._write_all(fd, encoded)
            os.ftruncate(fd, encoded.size)
            return encoded.size
        finally:
            os.close(fd)

    def _write_all(self, fd: int, encoded: Encoded) -> None:
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, self._size)
        bounce = np.frombuffer(self._bounce, dtype=np.uint8)
        filled = 0
        for view in [memoryview(encoded.header), *encoded.views]:
            source = np.frombuffer(view, dtype=np.uint8)
            pos = 0
            while pos < source.size:
                take = min(self._size - filled, source.size - pos)
                np.copyto(bounce[filled:filled + take], source[pos:pos + take])
                filled += take
                pos += take
                if filled == self._size:
                    self._flush(fd, filled)
                    filled = 0
        if filled:
            padded = -(-filled // ALIGN) * ALIGN
            bounce[filled:padded] = 0
            self._flush(fd, padded)

    def _flush(self, fd: int, length: int) -> None:
        assert self._bounce is not None  # made by _write_all
        view = memoryview(self._bounce)[:length]
        try:
            written = os.write(fd, view)
        except OSError as exc:
            if exc.errno in REFUSED_ERRNOS:
                raise DirectWriteUnsupported(exc.errno, "the file system refuses aligned O_DIRECT writes") from exc
            raise
        finally:
            view.release()
        if written != length:  # a short write would leave every later block misaligned
            raise DirectWriteUnsupported(errno.EIO, f"short O_DIRECT write ({written} of {length} bytes)")


__all__ = ["ALIGN", "REFUSED_ERRNOS", "DirectWriteUnsupported", "DirectWriter"]
