"""A result folded into the aggregate while its bytes arrive, and taken back out if it fails.

Why: receiving a result whole before folding it in costs the server one model size per upload
(a 2 GB model: 2 GB per site sending at once). Here the bytes go through one window buffer
(WINDOW_BYTES): once the safetensors header has been checked against the global model (keys,
shapes, dtypes: nothing is folded before), each full window's values are checked finite and then
folded into the aggregate's ``Contribution``.

A result can still fail after part of it was folded: a NaN in its last tensor, a site that dies
or stalls half-way, a round that closes first. So what was folded is kept outside memory, to be
replayed and taken back out (``take_back``): an upload over gRPC is journaled (``DiskJournal``: an
unlinked file in the server's workspace, written with O_DIRECT, so the journal costs disk
bandwidth, about 1 s per 2 GB here, and no page cache or process memory); a result a site wrote to
the shared-memory folder is its own journal (the site does not touch the file before it has its
answer).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from flkit.errors import ValidationError
from flkit.server.direct_write import ALIGN, REFUSED_ERRNOS
from flkit.server.validation import all_finite, check_layout
from flkit.strategy.base import Contribution
from flkit.wire.codec import Params
from flkit.wire.frames import copy_into
from flkit.wire.tensor_stream import MAX_HEADER_BYTES, Span, read_spans

# Bytes folded at a time: large enough that a window's few torch calls and its journal write cost
# little per byte, small enough that a few concurrent uploads cost nothing next to the model.
# A multiple of 4096 (O_DIRECT), hence of every element size: no element straddles two windows.
WINDOW_BYTES = 16 << 20
log = logging.getLogger("flkit.server")


class UploadRefused(Exception):
    """The upload does not deliver what its header announced (it broke off, bytes are missing or
    extra): refused, and the site may send again; not a sign that the result itself is wrong."""


class Journal:
    """Where the folded bytes of one upload can be read back from (``take_back``)."""

    def append(self, window: mmap.mmap, size: int) -> None:
        """The next ``size`` data bytes, at the start of ``window`` (page aligned; room to pad)."""

    def read_into(self, window: mmap.mmap, offset: int, size: int) -> None:
        """Data bytes ``offset...offset + size`` into the start of ``window``."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the journal holds (its file)."""


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(errno.EIO, f"short read at byte {offset + done}")
        done += got


_warned: set[str] = set()


def _warn_buffered(folder: Path, exc: OSError | None) -> None:
    """Once per folder: journals there go through the page cache (memory, on tmpfs)."""
    key = str(folder)
    if key in _warned:
        return
    _warned.add(key)
    log.warning("the file system of %s refuses O_DIRECT (%s): upload journals are written buffered there, "
                "through the page cache (memory, on tmpfs); give the server a workspace on a disk",
                folder, exc.strerror if exc is not None else "aligned writes refused")


class DiskJournal(Journal):
    """An unlinked file in ``folder``: written with O_DIRECT where the file system takes it (no
    page cache: the journal costs disk bandwidth, not memory), buffered where it does not."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._folder = folder
        fd, name = tempfile.mkstemp(dir=folder, prefix=".upload-")
        self._fd = fd  # read back (and written, where O_DIRECT is refused) through this one
        self._direct: int | None = None
        try:
            flag = getattr(os, "O_DIRECT", 0)
            if flag:
                try:
                    self._direct = os.open(name, os.O_WRONLY | flag)
                except OSError as exc:
                    if exc.errno not in REFUSED_ERRNOS:
                        raise
                    _warn_buffered(folder, exc)
        except BaseException:
            os.close(fd)
            raise
        finally:
            os.unlink(name)  # nothing of it outlives the process, whatever happens
        self.size = 0

    def append(self, window: mmap.mmap, size: int) -> None:
        view = memoryview(window)
        try:
            if self._direct is not None:
                padded = -(-size // ALIGN) * ALIGN  # only the last window is short; it is padded
                try:
                    written = os.pwrite(self._direct, view[:padded], self.size)
                    if written == padded:
                        self.size += size
                        return
                except OSError as exc:
                    if exc.errno not in REFUSED_ERRNOS:
                        raise
                os.close(self._direct)  # the file system took the open but not the write
                self._direct = None
                _warn_buffered(self._folder, None)
            done = 0
            while done < size:
                done += os.pwrite(self._fd, view[done:size], self.size + done)
            self.size += size
        finally:
            view.release()

    def read_into(self, window: mmap.mmap, offset: int, size: int) -> None:
        view = memoryview(window)
        try:
            _pread_all(self._fd, view[:size], offset)
        finally:
            view.release()

    def close(self) -> None:
        for fd in (self._direct, self._fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self._direct, self._fd = None, -1


class FileSource(Journal):
    """A result file a site wrote (the shared-memory folder): read window by window with ``pread``
    (never mapped, so the server's memory does not grow with it), and its own journal."""

    def __init__(self, path: Path, expected_size: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ValidationError(f"cannot open shared-memory params {path.name}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size != expected_size \
                or expected_size < 8:
            os.close(fd)
            raise ValidationError(f"shared-memory params {path.name} is not a regular file of this user "
                                  f"with {expected_size} bytes (at least 8)")
        self.fd = fd
        self.data_start = 0  # set once the header is read

    def read_into(self, window: mmap.mmap, offset: int, size: int) -> None:
        view = memoryview(window)
        try:
            _pread_all(self.fd, view[:size], self.data_start + offset)
        finally:
            view.release()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Windows:
    """Page-aligned window buffers, reused across uploads (at most ``keep`` kept)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, WINDOW_BYTES)

    def give_back(self, window: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(window)


class StreamedUpload:
    """Feeds one result's payload (safetensors bytes) into ``contribution``, window by window.

    ``feed`` (gRPC: payload messages as they come) or ``read_file`` (a shared-memory result),
    then ``end``; if anything fails after the header, ``take_back`` unfolds what was folded.
    Raises ValidationError for what is wrong with the result (the site's fault: a bad header, a
    layout that does not match the global model, a non-finite value), UploadRefused when bytes are
    missing, and RoundClosed (from the contribution) when the round no longer takes the result.
    """

    def __init__(self, site: str, expected: Params, contribution: Contribution, payload_size: int,
                 window: mmap.mmap, journal: Journal) -> None:
        self.site = site
        self.expected = expected
        self.contribution = contribution
        self.payload_size = payload_size
        self.journal = journal
        self._window = window
        self._bytes = np.frombuffer(window, dtype=np.uint8)
        self._header = bytearray()
        self._spans: list[Span] | None = None
        self._data_len = 0
        self.received = 0  # payload bytes so far, header included
        self._filled = 0  # data bytes in the window
        self._window_at = 0  # data offset of the window's first byte
        self.folded = 0  # data bytes folded in (a prefix of the data)
        # A header describes the global model's tensors: about the size of its own header.
        self._max_header = min(MAX_HEADER_BYTES, (1 << 20) + 256 * len(expected)
                               + sum(len(name) for name in expected))

    # -- reading --------------------------------------------------------------
    def feed(self, data: memoryview) -> None:
        if self.received + len(data) > self.payload_size:
            raise UploadRefused(f"result payload longer than its header says ({self.payload_size} bytes)")
        self.received += len(data)
        if self._spans is None:
            data = self._take_header(data)
        while len(data):
            take = min(WINDOW_BYTES - self._filled, len(data))
            copy_into(self._bytes, self._filled, data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == WINDOW_BYTES:
                self._flush()

    def read_file(self) -> None:
        """The whole payload from the journal, a FileSource, a window at a time straight into the window."""
        source = self.journal
        if not isinstance(source, FileSource):
            raise TypeError("read_file needs a FileSource as the upload's journal")
        prefix = bytearray(8)
        _pread_all(source.fd, memoryview(prefix), 0)
        (length,) = struct.unpack("<Q", prefix)
        self._check_header_length(length)
        header = bytearray(8 + length)
        _pread_all(source.fd, memoryview(header), 0)
        self.received = len(header)
        self._take_header(memoryview(header))
        source.data_start = len(header)
        while self._window_at < self._data_len:
            size = min(WINDOW_BYTES, self._data_len - self._window_at)
            source.read_into(self._window, self._window_at, size)
            self.received += size
            self._filled = size
            self._flush()

    def end(self) -> None:
        """Every byte came: fold the last window. UploadRefused if bytes are missing."""
        if self.received != self.payload_size:
            raise UploadRefused(f"result payload truncated: got {self.received} of {self.payload_size} bytes")
        if self._spans is None:
            raise ValidationError(f"site {self.site}: result payload ended inside its header")
        if self._filled:
            self._flush()

    # -- the header -----------------------------------------------------------
    def _check_header_length(self, length: int) -> None:
        if length > self._max_header or 8 + length > self.payload_size:
            raise ValidationError(f"site {self.site}: malformed params payload: header length {length} does not "
                                  f"fit (at most {min(self._max_header, self.payload_size - 8)} bytes)")

    def _take_header(self, data: memoryview) -> memoryview:
        """Collect the header's bytes; once it is whole, check it. Returns the bytes after it."""
        if len(self._header) < 8:
            take = min(8 - len(self._header), len(data))
            self._header += data[:take]
            data = data[take:]
            if len(self._header) < 8:
                return data
            self._check_header_length(struct.unpack_from("<Q", self._header)[0])
        (length,) = struct.unpack_from("<Q", self._header)
        take = min(8 + length - len(self._header), len(data))
        self._header += data[:take]
        data = data[take:]
        if len(self._header) == 8 + length:
            self._data_len = self.payload_size - len(self._header)
            spans = read_spans(bytes(self._header[8:]), self._data_len)
            check_layout(self.site, {name: (tuple(shape), dtype) for _, _, name, dtype, shape in spans},
                         self.expected)
            self._spans = spans
            self._header = bytearray()
        return data

    # -- folding --------------------------------------------------------------
    def _pieces(self, at: int, size: int) -> list[tuple[str, int, torch.Tensor, int]]:
        """(name, first element, values, end) of each tensor's bytes in data ``at...at + size`` (in
        the window); ``end``: the data offset just after the piece."""
        assert self._spans is not None
        window = torch.from_numpy(self._bytes)
        pieces = []
        for begin, end, name, dtype, _ in self._spans:
            if end <= at or begin >= at + size or end == begin:
                continue
            lo, hi = max(begin, at), min(end, at + size)
            itemsize = self.expected[name].element_size()
            pieces.append((name, (lo - begin) // itemsize, window[lo - at:hi - at].view(dtype), hi))
        return pieces

    def _flush(self) -> None:
        size = self._filled
        pieces = self._pieces(self._window_at, size)
        for name, start, values, _ in pieces:  # nothing of a window is folded unless all of it is finite
            if values.is_floating_point() and not all_finite(values):
                bad = int((~torch.isfinite(values)).sum())
                raise ValidationError(f"site {self.site}: tensor '{name}' has {bad} non-finite value(s) (NaN or Inf) "
                                      f"among its elements {start}..{start + values.numel() - 1}")
        self.journal.append(self._window, size)  # journaled before folded: take_back can replay it
        for name, start, values, end in pieces:
            self.contribution.fold(name, start, values)
            self.folded = end  # pieces lie in data order: what is folded stays a prefix
        self.folded = self._window_at + size
        self._window_at += size
        self._filled = 0

    def take_back(self) -> None:
        """Unfold every byte folded so far (replayed from the journal), window by window."""
        at = 0
        while at < self.folded:
            size = min(WINDOW_BYTES, self.folded - at)
            self.journal.read_into(self._window, at, size)
            for name, start, values, _ in self._pieces(at, size):
                self.contribution.unfold(name, start, values)
            at += size
        self.folded = 0


__all__ = ["WINDOW_BYTES", "DiskJournal", "FileSource", "StreamedUpload", "UploadRefused", "Windows"]
