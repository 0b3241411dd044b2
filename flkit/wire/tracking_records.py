"""Experiment-tracking records: the one shape sites log and the server's receivers read.

A record is plain JSON: ``{"key", "value", "type", "step", "time"}`` (plus ``"path"`` for a
text artifact). The site checks a record when the script logs it, so a bad value fails at
the line that logged it; the server checks every batch again on arrival, since anything
that crossed the network is untrusted.
"""

from __future__ import annotations

import json
import math
import time
from enum import Enum
from pathlib import PurePosixPath
from typing import Any

from flkit.errors import ValidationError

MAX_KEY_CHARS = 256
MAX_TEXT_CHARS = 1 << 20
MAX_ENTRIES = 1000
MAX_BATCH_RECORDS = 10_000
# A batch as JSON (sites send at most 2 MiB: flkit.client.records.BATCH_BYTES).
MAX_BATCH_CHARS = 4 * 1024 * 1024
MAX_STEP = 2**63  # steps are int64 in TensorBoard and MLflow


class AnalyticsDataType(str, Enum):
    """What a record's value is (NVFlare's names)."""

    SCALAR = "SCALAR"
    SCALARS = "SCALARS"
    TEXT = "TEXT"
    METRIC = "METRIC"
    METRICS = "METRICS"
    PARAMETER = "PARAMETER"
    PARAMETERS = "PARAMETERS"
    TAG = "TAG"
    TAGS = "TAGS"


_NUMBER_TYPES = {AnalyticsDataType.SCALAR, AnalyticsDataType.METRIC}
_NUMBER_DICT_TYPES = {AnalyticsDataType.SCALARS, AnalyticsDataType.METRICS}
_PLAIN_DICT_TYPES = {AnalyticsDataType.PARAMETERS, AnalyticsDataType.TAGS}
_PLAIN_TYPES = {AnalyticsDataType.PARAMETER, AnalyticsDataType.TAG}


def _number(where: str, value: Any) -> float:
    if hasattr(value, "item") and callable(value.item):  # a one-element tensor or numpy scalar
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValidationError(f"{where} must be a finite number, got {value!r}"[:400])
    return value


def _plain(where: str, value: Any) -> str | int | float | bool:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{where} must be finite, got {value!r}")
    if isinstance(value, str):
        if len(value) > MAX_TEXT_CHARS:
            raise ValidationError(f"{where} is longer than {MAX_TEXT_CHARS} characters")
        return value
    if isinstance(value, (bool, int, float)):
        return value
    raise ValidationError(f"{where} must be a string, number or bool, got {type(value).__name__}")


def _key(where: str, key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise ValidationError(f"{where} must be a non-empty string of at most {MAX_KEY_CHARS} characters, "
                              f"got {key!r}"[:400])
    return key


def _entries(where: str, value: Any, check) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be a dict, got {type(value).__name__}")
    if len(value) > MAX_ENTRIES:
        raise ValidationError(f"{where} has more than {MAX_ENTRIES} entries")
    return {_key(f"{where} key", k): check(f"{where}[{k!r}]", v) for k, v in value.items()}


def _artifact_path(path: Any) -> str:
    text = _key("text artifact path", path)
    parts = PurePosixPath(text).parts
    if text.startswith("/") or ".." in parts or "\\" in text:
        raise ValidationError(f"text artifact path {text!r} must be a relative path without '..'")
    return text


def make_record(key: Any, value: Any, data_type: Any = None, step: Any = None, path: Any = None,
                when: float | None = None) -> dict[str, Any]:
    """A checked record; raises ValidationError naming what is wrong."""
    try:
        kind = AnalyticsDataType(getattr(data_type, "value", data_type) or AnalyticsDataType.SCALAR.value)
    except ValueError:
        raise ValidationError(f"tracking record type must be one of {[t.value for t in AnalyticsDataType]}, "
                              f"got {str(data_type)[:40]!r}") from None
    key = _key("tracking record key", key)
    where = f"tracking record '{key}'"
    if kind in _NUMBER_TYPES:
        value = _number(f"{where} value", value)
    elif kind in _NUMBER_DICT_TYPES:
        value = _entries(f"{where} value", value, _number)
    elif kind in _PLAIN_DICT_TYPES:
        value = _entries(f"{where} value", value, _plain)
    elif kind in _PLAIN_TYPES:
        value = _plain(f"{where} value", value)
    else:  # TEXT
        if not isinstance(value, str) or len(value) > MAX_TEXT_CHARS:
            raise ValidationError(f"{where}: TEXT must be a string of at most {MAX_TEXT_CHARS} characters")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, int):
            try:
                step = int(_number(f"{where} step", step))
            except ValidationError:
                raise ValidationError(f"{where} step must be a whole number >= 0, got {step!r}"[:400]) from None
        if not 0 <= step < MAX_STEP:
            raise ValidationError(f"{where} step must be a whole number from 0 to 2**63-1, got {step!r}"[:400])
    record = {"key": key, "value": value, "type": kind.value, "step": step,
              "time": time.time() if when is None else _number(f"{where} time", when)}
    if path is not None:
        record["path"] = _artifact_path(path)
    return record


def check_records(text: str) -> list[dict[str, Any]]:
    """Parse and check a batch that arrived from a site (a JSON array of records)."""
    if len(text) > MAX_BATCH_CHARS:
        raise ValidationError(f"a batch of tracking records has at most {MAX_BATCH_CHARS} characters, "
                              f"got {len(text)}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"tracking records are not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, list):
        raise ValidationError("tracking records must be a JSON array")
    if len(data) > MAX_BATCH_RECORDS:
        raise ValidationError(f"a batch holds at most {MAX_BATCH_RECORDS} tracking records, got {len(data)}")
    out = []
    for item in data:
        if not isinstance(item, dict):
            raise ValidationError("each tracking record must be a JSON object")
        unknown = set(item) - {"key", "value", "type", "step", "time", "path"}
        if unknown:
            raise ValidationError(f"tracking record has unknown fields {[k[:40] for k in sorted(unknown)[:5]]}")
        out.append(make_record(item.get("key"), item.get("value"), item.get("type"), item.get("step"),
                               item.get("path"), item.get("time", 0.0)))
    return out
