"""A site's tracking records on their way: its own file, its own receivers, the server.

Records are logged from the training loop, so logging must cost a buffered line and a list
append, not a file open or a network round trip. Every record goes to the site's
``tracking.jsonl`` (one file handle for the whole job, flushed at each send, heartbeat and the
end). The rest depends on the job, which the site learns when it joins: the server's receivers
(``add_experiment_tracking``, server side) get records in batches of ``RECORD_BATCH`` at the next
``send()``, heartbeat or close; receivers the site runs itself (client side) get each one at
once. Records logged before the site joined wait for that. A full batch wakes a sender
thread, so the training loop never waits for the network.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flkit.errors import CommunicationError, FLKitError

log = logging.getLogger("flkit.client")

RECORD_BATCH = 1000
MAX_QUEUED_RECORDS = 100_000
# The sender thread also sends what is queued this often, so records show up while a round runs.
SEND_INTERVAL_S = 5.0

Sender = Callable[[str], None]  # sends one JSON array of records; raises CommunicationError to retry later


class RecordQueue:
    """The tracking records of one site (see the module doc)."""

    def __init__(self, site: str, workspace: str, job_id: str, file_name: str = "tracking.jsonl") -> None:
        self.site = site
        self.workspace = Path(workspace)
        self.job_id = job_id
        self.path = self.workspace / file_name
        self._file = None  # opened at the first record
        self._configured = False
        self._to_server = False
        self._local = None  # TrackingHub of the site's own receivers
        self._early: list[dict[str, Any]] = []  # logged before the job settings were known
        self._queue: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one sender at a time, so no batch goes twice
        self._warned = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, job_config: dict[str, Any], sender: Sender | None = None) -> None:
        """The job's settings from the join reply: where records go. ``sender`` sends a batch to
        the server (from a thread of this queue's own)."""
        with self._lock:
            if self._configured:
                return
            self._configured = True
            self._to_server = bool(job_config.get("tracking")) and sender is not None
            if self._to_server:
                self._thread = threading.Thread(target=self._send_loop, args=(sender,), daemon=True,
                                                name=f"flkit-records-{self.site}")
                self._thread.start()
            specs = job_config.get("client_tracking") or []
            if specs:
                from flkit.server.tracking import TrackingHub

                self._local = TrackingHub(specs, self.workspace, self.job_id)
            early, self._early = self._early, []
        for record in early:
            self._route(record)

    def add(self, record: dict[str, Any]) -> None:
        """Take one checked record (a full batch wakes the sender thread)."""
        line = json.dumps({**record, "site": self.site}) + "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the job, closed in close()
            self._file.write(line)
            if not self._configured:
                self._early.append(record)
                del self._early[:-MAX_QUEUED_RECORDS]
                return
        if self._route(record) >= RECORD_BATCH:
            self._wake.set()

    def _send_loop(self, sender: Sender) -> None:
        while not self._stop.is_set():
            self._wake.wait(SEND_INTERVAL_S)
            self._wake.clear()
            if not self._stop.is_set():
                self.send(sender)

    def _route(self, record: dict[str, Any]) -> int:
        if self._local is not None:
            self._local.write(self.site, [record])
        if not self._to_server:
            return 0
        with self._lock:
            self._queue.append(record)
            if len(self._queue) > MAX_QUEUED_RECORDS:
                del self._queue[: len(self._queue) - MAX_QUEUED_RECORDS]
                if not self._warned:
                    self._warned = True
                    log.warning("site %s: the server has not taken tracking records for a while; keeping the "
                                "newest %d", self.site, MAX_QUEUED_RECORDS)
            return len(self._queue)

    def flush_file(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def send(self, sender: Sender) -> None:
        """Send what is queued, in batches (best effort: kept for the next try if the server is away)."""
        self.flush_file()
        if not self._to_server:
            return
        with self._send_lock:
            while True:
                with self._lock:
                    batch = self._queue[:RECORD_BATCH]
                if not batch:
                    return
                try:
                    sender(json.dumps(batch))
                except CommunicationError as exc:
                    log.debug("site %s: tracking records not sent yet: %s", self.site, exc)
                    return
                except FLKitError as exc:  # refused: the batch is dropped, and the site says so
                    log.warning("site %s: %d tracking record(s) refused by the server: %s", self.site,
                                len(batch), exc)
                with self._lock:
                    del self._queue[: len(batch)]

    def close(self) -> None:
        """Stop the sender thread and close the file (send what is left first: ``send``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._local is not None:
            self._local.close()
