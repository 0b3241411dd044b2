"""Receive buffers for params streams, used again once nothing parsed from them is alive.

Why: a received model lands in one buffer that its tensors are views of (flkit.wire.tensor_stream).
A fresh 100 MB ``bytearray`` costs the kernel's zeroing of every page as the payload is copied in
(about twice the copy itself here), once per result on the server and once per task on a site.
A buffer is free again when nothing refers to it but the pool: every tensor, numpy array or
memoryview made from it holds a reference to the ``bytearray`` itself (the buffer protocol), so
its reference count says whether any of them is alive.
"""

from __future__ import annotations

import sys
import threading


class ReceiveBuffers:
    """Up to ``keep`` idle buffers; ``take(size)`` gives a free one of exactly ``size`` bytes or a new
    one. Thread-safe (several streams receive at once)."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._buffers: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            for index in range(len(self._buffers)):
                # The list's reference and getrefcount's argument: nobody else.
                if len(self._buffers[index]) == size and sys.getrefcount(self._buffers[index]) <= 2:
                    return self._buffers.pop(index)
        return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        """Offer ``buffer`` for a later ``take`` (it is reused only once nothing parsed from it is alive)."""
        with self._lock:
            if any(b is buffer for b in self._buffers):
                return
            self._buffers.append(buffer)
            if len(self._buffers) > self._keep:
                self._buffers.pop(0)


__all__ = ["ReceiveBuffers"]
