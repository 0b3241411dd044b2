"""Experiment tracking for sites: ``SummaryWriter.add_scalar`` like TensorBoard's.

For now records are written locally, one JSON object per line, to
``<site workspace>/tracking.jsonl``; streaming them to the server comes later.
"""

from __future__ import annotations

import json
import threading
import time
from enum import Enum
from pathlib import Path
from typing import Any

from flkit.wire.codec import to_plain

_write_lock = threading.Lock()


class AnalyticsDataType(str, Enum):
    SCALAR = "SCALAR"
    SCALARS = "SCALARS"
    TEXT = "TEXT"
    METRIC = "METRIC"
    METRICS = "METRICS"


def tracking_file(session) -> Path:
    path = Path(session.settings.workspace) / "tracking.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_record(session, key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
    if isinstance(value, dict):
        value = {str(k): to_plain(str(k), v, "value") for k, v in value.items()}
    else:
        value = to_plain(key, value, "value")
    record = {
        "time": time.time(),
        "site": session.settings.site_name,
        "key": key,
        "value": value,
        "type": getattr(data_type, "value", data_type) or AnalyticsDataType.SCALAR.value,
        **{k: to_plain(k, v, "value") for k, v in kwargs.items()},
    }
    line = json.dumps(record, default=str)
    with _write_lock, open(tracking_file(session), "a") as fh:
        fh.write(line + "\n")


class SummaryWriter:
    """TensorBoard-style writer bound to the current site (create it after ``flkit.init()``)."""

    def __init__(self) -> None:
        from flkit.api import require_session

        self._session = require_session()

    def add_scalar(self, tag: str, scalar: float, global_step: int | None = None, **kwargs: Any) -> None:
        write_record(self._session, tag, scalar, AnalyticsDataType.SCALAR, global_step=global_step, **kwargs)

    def add_scalars(self, tag: str, scalars: dict[str, float], global_step: int | None = None,
                    **kwargs: Any) -> None:
        write_record(self._session, tag, scalars, AnalyticsDataType.SCALARS, global_step=global_step, **kwargs)

    def flush(self) -> None:
        """Records are written as they come; nothing is buffered."""
