"""Reading a run's ``metrics.json`` (the server's history of a job) for ``flkit report``.

The file is the server's own output, but it is read as untrusted input: a bounded size, plain
JSON (no code runs), and every field checked for its type, so that a hand-edited or truncated
file gives an error naming the file and the field, never a traceback from the drawing code.
Imports nothing heavy (no torch, no matplotlib).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flkit.errors import FLKitError

# flkit.server.persistor.METRICS_FILE (that module imports torch; tests check the two agree).
METRICS_FILE = "metrics.json"
# A larger file is refused rather than read: 1,000 sites x 1,000 rounds x a few metrics is ~100 MB.
MAX_BYTES = 256 * 1024 * 1024
MAX_NAME = 1000  # characters of a site or metric name
MAX_TEXT = 100_000  # characters of a reason


class ReportError(FLKitError):
    """metrics.json is missing, too large or not in the shape the server writes."""


@dataclass
class Round:
    round: int
    task: str
    sites: list[str] = field(default_factory=list)  # the sites offered the task
    answered: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # answered, not aggregated (no data)
    weights: dict[str, float] = field(default_factory=dict)
    answered_after_s: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)  # site -> name -> value
    mean: dict[str, float | None] = field(default_factory=dict)
    aggregated: dict[str, float | None] | None = None
    score: float | None = None
    best: bool = False
    seconds: float = 0.0


@dataclass
class RunHistory:
    path: Path
    job_id: str
    key_metric: str | None
    key_metric_mode: str  # "max" or "min"
    strategy: str
    num_rounds: int | None
    status: str
    reason: str | None
    best_round: int | None
    best_score: float | None
    rounds: list[Round]

    def metric_names(self) -> list[str]:
        """Every metric with a number in some round, the key metric first, then by name."""
        names = {name for r in self.rounds for values in r.metrics.values() for name, v in values.items()
                 if v is not None}
        names.update(name for r in self.rounds for name, v in r.mean.items() if v is not None)
        ordered = sorted(names)
        if self.key_metric in names:
            ordered.remove(self.key_metric)
            ordered.insert(0, self.key_metric)
        return ordered

    def site_names(self) -> list[str]:
        """Every site offered a task, in the order first seen."""
        seen: dict[str, None] = {}
        for r in self.rounds:
            for name in (*r.sites, *r.answered, *r.failed):
                seen.setdefault(name, None)
        return list(seen)


def find_metrics_file(where: str | Path) -> Path:
    """``where``: a workspace (with ``server/metrics.json``), its ``server/`` folder, or the file."""
    path = Path(where)
    if path.is_dir():
        for candidate in (path / "server" / METRICS_FILE, path / METRICS_FILE):
            if candidate.is_file():
                return candidate
        raise ReportError(f"{path} holds no {METRICS_FILE} (looked for {path / 'server' / METRICS_FILE} and "
                          f"{path / METRICS_FILE}); give a simulator workspace, a server's folder or the file; "
                          "the server writes it after every round")
    if path.is_file():
        return path
    raise ReportError(f"{path} does not exist (give a simulator workspace, a server's folder or its {METRICS_FILE})")


def load_history(where: str | Path) -> RunHistory:
    """The run's history from ``metrics.json`` (see ``find_metrics_file`` for ``where``), checked."""
    path = find_metrics_file(where)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ReportError(f"{path}: {size} bytes, more than the {MAX_BYTES} a report reads")
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None
    if len(raw) > MAX_BYTES:
        raise ReportError(f"{path}: more than the {MAX_BYTES} bytes a report reads")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ReportError(f"{path} is not UTF-8 text: {exc}") from None
    except ValueError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ReportError(f"{path} is not a metrics file: nested too deeply") from None
    return _parse(path, data)


# -- the schema ------------------------------------------------------------------


class _Bad(Exception):
    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where} {what}")


def _parse(path: Path, data: Any) -> RunHistory:
    try:
        top = _obj(data, "the file")
        rounds_raw = top.get("rounds")
        if rounds_raw is None:
            raise _Bad("the file", "has no 'rounds' (not a metrics.json written by flkit's server?)")
        rounds = [_round(item, f"rounds[{i}]") for i, item in enumerate(_list(rounds_raw, "rounds"))]
        best = top.get("best")
        best_round = best_score = None
        if best is not None:
            best_obj = _obj(best, "best")
            best_round = _int(best_obj.get("round"), "best.round")
            best_score = _num(best_obj.get("score"), "best.score", allow_none=True)
        mode = _str(top.get("key_metric_mode", "max"), "key_metric_mode")
        if mode not in ("max", "min"):
            raise _Bad("key_metric_mode", f"must be 'max' or 'min', not {mode[:40]!r}")
        num_rounds = top.get("num_rounds")
        return RunHistory(
            path=path,
            job_id=_str(top.get("job_id", ""), "job_id"),
            key_metric=_opt_str(top.get("key_metric"), "key_metric", MAX_NAME),
            key_metric_mode=mode,
            strategy=_str(top.get("strategy", ""), "strategy"),
            num_rounds=None if num_rounds is None else _int(num_rounds, "num_rounds"),
            status=_str(top.get("status", "unknown"), "status"),
            reason=_opt_str(top.get("reason"), "reason", MAX_TEXT),
            best_round=best_round,
            best_score=best_score,
            rounds=rounds,
        )
    except _Bad as exc:
        raise ReportError(f"{path} is not in the shape flkit's server writes: {exc}") from None


def _round(item: Any, where: str) -> Round:
    obj = _obj(item, where)
    aggregated = obj.get("aggregated")
    return Round(
        round=_int(obj.get("round"), f"{where}.round"),
        task=_str(obj.get("task"), f"{where}.task"),
        sites=_names(obj.get("sites", []), f"{where}.sites"),
        answered=_names(obj.get("answered", []), f"{where}.answered"),
        failed=_texts(obj.get("failed", {}), f"{where}.failed"),
        skipped=_texts(obj.get("skipped", {}), f"{where}.skipped"),
        weights=_finite(obj.get("weights", {}), f"{where}.weights"),
        answered_after_s=_finite(obj.get("answered_after_s", {}), f"{where}.answered_after_s"),
        metrics={_name(site, f"{where}.metrics"): _numbers(values, f"{where}.metrics[{_quote(site)}]")
                 for site, values in _obj(obj.get("metrics", {}), f"{where}.metrics").items()},
        mean=_numbers(obj.get("mean", {}), f"{where}.mean"),
        aggregated=None if aggregated is None else _numbers(aggregated, f"{where}.aggregated"),
        score=_num(obj.get("score"), f"{where}.score", allow_none=True),
        best=_bool(obj.get("best", False), f"{where}.best"),
        seconds=_num(obj.get("seconds", 0.0), f"{where}.seconds") or 0.0,
    )


def _quote(text: str) -> str:
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(where, f"must be a JSON object, not {_kind(value)}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(where, f"must be a JSON list, not {_kind(value)}")
    return value


def _str(value: Any, where: str, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str):
        raise _Bad(where, f"must be a string, not {_kind(value)}")
    if len(value) > limit:
        raise _Bad(where, f"is longer than {limit} characters")
    return value


def _opt_str(value: Any, where: str, limit: int) -> str | None:
    return None if value is None else _str(value, where, limit)


def _name(value: Any, where: str) -> str:
    return _str(value, f"{where}: a name", MAX_NAME)


def _names(value: Any, where: str) -> list[str]:
    return [_str(v, f"{where}[{i}]") for i, v in enumerate(_list(value, where))]


def _texts(value: Any, where: str) -> dict[str, str]:
    return {_name(k, where): _str(v, f"{where}[{_quote(k)}]", MAX_TEXT) for k, v in _obj(value, where).items()}


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(where, f"must be a whole number, not {_kind(value)}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(where, f"must be true or false, not {_kind(value)}")
    return value


def _num(value: Any, where: str, allow_none: bool = False) -> float | None:
    """A number (NaN and infinities, which Python's JSON writes, read as None: nothing to draw)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(where, f"must be a number, not {_kind(value)}")
    number = float(value)
    return number if math.isfinite(number) else None


def _numbers(value: Any, where: str) -> dict[str, float | None]:
    """Name -> number or null (null, NaN and infinities: None)."""
    return {_name(k, where): _num(v, f"{where}[{_quote(k)}]", allow_none=True) for k, v in _obj(value, where).items()}


def _finite(value: Any, where: str) -> dict[str, float]:
    """Name -> number; a NaN or an infinity is left out."""
    out: dict[str, float] = {}
    for k, v in _obj(value, where).items():
        number = _num(v, f"{where}[{_quote(_name(k, where))}]")
        if number is not None:
            out[k] = number
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)
