"""Transfers that stop moving are cut off; transfers that move count as signs of life.

A result upload holds one of the server's few model-sized receive buffers until its last byte
arrives. A site (or anyone holding a valid session) that declares a payload and then sends
nothing would hold that buffer for as long as its connection lives. ``StallWatch`` cancels such a
call once no bytes have arrived for ``stall_s`` seconds. One thread watches every transfer, and
only while there are any.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("flkit.server")


class StallWatch:
    """Calls ``cancel`` of a transfer that made no progress for ``stall_s`` seconds."""

    def __init__(self, stall_s: float, check_every_s: float = 1.0) -> None:
        self.stall_s = stall_s
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._active: dict[int, tuple[float, str, Callable[[], object]]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def begin(self, key: int, what: str, cancel: Callable[[], object]) -> None:
        with self._lock:
            self._active[key] = (time.monotonic(), what, cancel)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="flkit-stall-watch", daemon=True)
                self._thread.start()

    def progress(self, key: int) -> None:
        """Bytes arrived (once per 4 MiB message: the lock costs nothing beside the copy)."""
        with self._lock:  # never re-inserts a transfer that ended, never races the watcher's look
            entry = self._active.get(key)
            if entry is not None:
                self._active[key] = (time.monotonic(), entry[1], entry[2])

    def end(self, key: int) -> None:
        with self._lock:
            self._active.pop(key, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._wake.wait(self.check_every_s):
            now = time.monotonic()
            with self._lock:
                stalled = [(key, what, cancel) for key, (last, what, cancel) in self._active.items()
                           if now - last > self.stall_s]
                for key, _, _ in stalled:
                    del self._active[key]
            for _, what, cancel in stalled:
                log.warning("%s: no bytes for %g s; the transfer is cut off", what, self.stall_s)
                cancel()
