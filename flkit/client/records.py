"""A site's tracking records on their way: its own file, its own receivers, the server.

Records are logged from the training loop, so logging must cost a JSON line and a list
append, not a file open or a network round trip. Every record goes to the site's
``tracking.jsonl`` (one file handle for the whole job, flushed at each ``send()`` and at the
end). The rest depends on the job, which the site learns when it joins: the server's receivers
(``add_experiment_tracking``, server side) get records in batches (at most ``RECORD_BATCH``
records and ``BATCH_BYTES`` bytes, so a batch always fits a gRPC message) from a sender thread,
woken by a full batch, every ``SEND_INTERVAL_S``, and flushed at each ``send()`` and at the end;
receivers the site runs itself (client side) get each one at once. Records logged before the
site joined wait for that.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flkit.errors import CommunicationError, FLKitError, ValidationError

log = logging.getLogger("flkit.client")

RECORD_BATCH = 1000
BATCH_BYTES = 2 * 1024 * 1024  # well under the gRPC message cap (flkit.wire.grpc_options)
MAX_RECORD_BYTES = 1024 * 1024  # one record, as JSON
MAX_QUEUED_RECORDS = 100_000
# Records the site's own receivers get at a time (fewer hand-overs to their worker thread).
LOCAL_BATCH = 200
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
        self._site_json = json.dumps(site)
        self._file = None  # opened at the first record
        self._configured = False
        self._to_server = False
        self._local = None  # TrackingHub of the site's own receivers
        self._local_batch: list[dict[str, Any]] = []  # for them, not handed over yet
        self._early: list[tuple[dict[str, Any], str]] = []  # logged before the job settings were known
        self._queue: deque[tuple[int, str]] = deque()  # (sequence number, record as JSON) not sent yet
        self._next_seq = 0
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
                from flkit.report.tracking import TrackingHub

                self._local = TrackingHub(specs, self.workspace, self.job_id)
            early, self._early = self._early, []
        for record, text in early:
            self._route(record, text)

    def add(self, record: dict[str, Any]) -> None:
        """Take one checked record (a full batch wakes the sender thread). A record larger than
        MAX_RECORD_BYTES is refused here, at the line that logged it."""
        text = json.dumps(record)
        if len(text) > MAX_RECORD_BYTES:
            raise ValidationError(f"tracking record '{record['key']}' is {len(text)} bytes as JSON; the limit is "
                                  f"{MAX_RECORD_BYTES}")
        line = f'{text[:-1]}, "site": {self._site_json}}}\n'
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the job, closed in close()
            self._file.write(line)
            if not self._configured:
                self._early.append((record, text))
                del self._early[:-MAX_QUEUED_RECORDS]
                return
        if self._route(record, text) >= RECORD_BATCH:
            self._wake.set()

    def _send_loop(self, sender: Sender) -> None:
        while not self._stop.is_set():
            self._wake.wait(SEND_INTERVAL_S)
            self._wake.clear()
            if not self._stop.is_set():
                self.send(sender)

    def _route(self, record: dict[str, Any], text: str) -> int:
        if self._local is not None:
            with self._lock:
                self._local_batch.append(record)
                full = len(self._local_batch) >= LOCAL_BATCH
            if full:
                self._write_local()
        if not self._to_server:
            return 0
        with self._lock:
            self._queue.append((self._next_seq, text))
            self._next_seq += 1
            while len(self._queue) > MAX_QUEUED_RECORDS:
                self._queue.popleft()
                if not self._warned:
                    self._warned = True
                    log.warning("site %s: the server has not taken tracking records for a while; keeping the "
                                "newest %d", self.site, MAX_QUEUED_RECORDS)
            return len(self._queue)

    def _write_local(self) -> None:
        """Hand the records gathered for the site's own receivers to them (their worker writes them)."""
        with self._lock:
            batch, self._local_batch = self._local_batch, []
        if batch and self._local is not None:
            self._local.write(self.site, batch)

    def flush_file(self) -> None:
        self._write_local()
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def _next_batch(self) -> tuple[int, list[str]]:
        """The oldest queued records that fit one batch, and the sequence number of the last one."""
        texts, size, last = [], 2, -1
        with self._lock:
            for seq, text in self._queue:
                if texts and (len(texts) >= RECORD_BATCH or size + len(text) + 1 > BATCH_BYTES):
                    break
                texts.append(text)
                size += len(text) + 1
                last = seq
        return last, texts

    def _forget_through(self, last: int) -> None:
        """Drop the records up to sequence ``last`` (trimming may have dropped some already)."""
        with self._lock:
            while self._queue and self._queue[0][0] <= last:
                self._queue.popleft()

    def send(self, sender: Sender) -> None:
        """Send what is queued, in batches (best effort: kept for the next try if the server is away)."""
        self.flush_file()
        if not self._to_server:
            return
        with self._send_lock:
            while True:
                last, texts = self._next_batch()
                if not texts:
                    return
                try:
                    sender("[" + ",".join(texts) + "]")
                except CommunicationError as exc:
                    log.debug("site %s: tracking records not sent yet: %s", self.site, exc)
                    return
                except FLKitError as exc:  # refused: the batch is dropped, and the site says so
                    log.warning("site %s: %d tracking record(s) refused by the server: %s", self.site,
                                len(texts), exc)
                self._forget_through(last)

    def close(self) -> None:
        """Stop the sender thread and close the file (send what is left first: ``send``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        self._write_local()
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if self._local is not None:
            self._local.close()
