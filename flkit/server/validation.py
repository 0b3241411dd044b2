"""Checks a site's result against the global model before it can touch the aggregate, and the
bounds on what a site may send at all (ids, reasons, JSON), checked before anything of it is
logged, stored or quoted back. Messages quote at most a short prefix of what a site sent
(``flkit.wire.codec.quote``), so a hostile value never floods a log or a reply."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from flkit.errors import ValidationError
from flkit.model import MetaKey, ParamsType
from flkit.wire.codec import Params, quote


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (no NaN, no +-Inf).

    Why not ``isfinite(t).all()``: it writes a bool per element, about 10x the cost of reading the
    tensor once. First ``dot(t, t)`` (BLAS, about a third of ``aminmax``'s time here): a NaN or an
    Inf anywhere makes it NaN or Inf (squares cannot cancel), so a finite result settles it. It can
    also overflow for huge finite values (beyond about 1e19 in float32), so a non-finite one is
    settled by ``aminmax``, whose min and max propagate NaN and show +-Inf.
    """
    if t.dtype in (torch.float32, torch.float64) and t.is_contiguous() and t.device.type == "cpu" and t.numel():
        flat = t.view(-1)
        if bool(torch.isfinite(torch.dot(flat, flat))):
            return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


# Tensors at least this large are checked one by one (a BLAS dot each); smaller ones together.
ONE_BY_ONE = 1 << 16


def first_non_finite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The index of the first floating tensor with a NaN or an Inf, or None when all are finite.

    Why together: a model has many small tensors (biases, norms), and each torch call costs more
    than their data, the more so when threads take turns with the GIL at every call: all of them
    go through one ``torch._foreach_norm`` (a NaN or an Inf makes a norm non-finite; so can a
    huge finite value, which the one-by-one check then settles). Large tensors are checked one
    by one (``all_finite``), where the work is in the data.
    """
    small = [i for i, t in enumerate(tensors)
             if t.is_floating_point() and 0 < t.numel() < ONE_BY_ONE]
    suspects: set[int] = set()
    if small:
        norms = getattr(torch, "_foreach_norm", None)
        # One torch call for all of them; reading each norm (a 0-d tensor) costs less than stacking them.
        if norms is None or not all(math.isfinite(n.item()) for n in norms([tensors[i] for i in small])):
            suspects = set(small)
    for i, t in enumerate(tensors):
        if (i in suspects or (t.is_floating_point() and t.numel() >= ONE_BY_ONE)) and not all_finite(t):
            return i
    return None


def _names(names: list[str]) -> str:
    shown = ", ".join(quote(n) for n in names[:5])
    return f"[{shown}{f' and {len(names) - 5} more' if len(names) > 5 else ''}]"


def layout_problems(site: str, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                    expected: Params) -> Iterator[str]:
    """Each way ``layout`` (name -> (shape, dtype)) differs from ``expected``, lazily: the keys
    first (missing and unexpected ones in one message), then each tensor's shape and dtype in the
    global model's order. ``check_layout`` raises the first; the pre-flight check lists them all."""
    missing = sorted(set(expected) - set(layout))
    extra = sorted(set(layout) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if extra:
            parts.append(f"unexpected {_names(extra)}")
        yield f"site {site}: result keys do not match the global model: {'; '.join(parts)}"
    for name, ref in expected.items():
        if name not in layout:
            continue
        shape, dtype = layout[name]
        if tuple(shape) != tuple(ref.shape):
            yield f"site {site}: tensor '{name}' has shape {tuple(shape)}, expected {tuple(ref.shape)}"
        if dtype != ref.dtype:
            yield f"site {site}: tensor '{name}' has dtype {dtype}, expected {ref.dtype}"


def check_layout(site: str, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], expected: Params) -> None:
    """``layout`` (name -> (shape, dtype)) has the keys, shapes and dtypes of ``expected``."""
    _raise_first(layout_problems(site, layout, expected))


def params_problems(site: str, params: Params, expected: Params) -> Iterator[str]:
    """Each problem of ``params`` against ``expected``, lazily: the layout's (``layout_problems``),
    then each tensor with a NaN or an Inf, named, in the global model's order."""
    yield from layout_problems(site, {name: (tuple(t.shape), t.dtype) for name, t in params.items()}, expected)
    names = [name for name in expected if name in params]
    while names:
        bad_index = first_non_finite([params[name] for name in names])
        if bad_index is None:
            return
        name = names[bad_index]
        bad = int((~torch.isfinite(params[name])).sum())
        yield f"site {site}: tensor '{name}' has {bad} non-finite value(s) (NaN or Inf)"
        names = names[bad_index + 1:]


def check_params(site: str, params: Params, expected: Params) -> None:
    """Same keys, shapes and dtypes as ``expected``, and only finite values."""
    _raise_first(params_problems(site, params, expected))


def _raise_first(problems: Iterator[str]) -> None:
    problem = next(problems, None)
    if problem is not None:
        raise ValidationError(problem)


def params_type_of(site: str, params_type: str) -> ParamsType:
    """A result's params type (empty: FULL); ValidationError when it is neither FULL nor DIFF."""
    try:
        return ParamsType(params_type or ParamsType.FULL.value)
    except ValueError:
        raise ValidationError(f"site {site}: params_type {params_type[:50]!r} is neither FULL nor DIFF") from None


def missing_key_metric(site: str, key_metric: str | None, metrics: Mapping[str, Any]) -> str | None:
    """Why best-model selection cannot use this site's metrics (it lacks ``key_metric``), or None."""
    if key_metric is None or key_metric in metrics:
        return None
    return (f"site {site} reported no '{key_metric}' metric (it sent {sorted(metrics) or 'no metrics'}); "
            "best-model selection ignores it")


META_TENSOR_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                                torch.int16, torch.int32, torch.int64, torch.bool})


def check_meta_tensors(site: str, groups: Mapping[str, Mapping[str, torch.Tensor]], limit_bytes: int) -> None:
    """A site's tensors in meta (flkit.wire.meta_tensors): finite values, and at most ``limit_bytes``
    in all (the global model's size: what a site sends beside its model is bounded by what it got)."""
    total = 0
    for key, tensors in groups.items():
        for name, tensor in tensors.items():
            if tensor.dtype not in META_TENSOR_DTYPES:
                raise ValidationError(f"site {site}: meta[{quote(key)}][{quote(name)}] is {tensor.dtype}; tensors in "
                                      "meta are floating (16, 32 or 64 bits), integer or bool")
            total += tensor.numel() * tensor.element_size()
            if total > limit_bytes:
                raise ValidationError(f"site {site}: the tensors in its meta hold more than the global model's "
                                      f"{limit_bytes} bytes")
            if (tensor.is_floating_point() or tensor.is_complex()) and not all_finite(tensor):
                raise ValidationError(f"site {site}: meta[{quote(key)}][{quote(name)}] has non-finite values "
                                      "(NaN or Inf)")


def weight_of(site: str, meta: dict[str, Any]) -> float:
    """The aggregation weight: NUM_STEPS_CURRENT_ROUND, default 1. Zero is a site that had no data
    this round (e.g. an empty part of a skewed split): its result is taken but not folded in."""
    raw = meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not _finite(raw) or raw < 0:
        raise ValidationError(
            f"site {site}: meta {MetaKey.NUM_STEPS_CURRENT_ROUND} must be a number >= 0, got {quote(raw)}"
        )
    return float(raw)


def default_weight(site: str, meta: Mapping[str, Any]) -> str | None:
    """Why ``weight_of`` falls back to its default of 1 (the meta has no NUM_STEPS_CURRENT_ROUND),
    or None. A run takes it silently, as NVFlare does; the pre-flight check says so."""
    if MetaKey.NUM_STEPS_CURRENT_ROUND in meta:
        return None
    return (f"site {site}: meta has no {MetaKey.NUM_STEPS_CURRENT_ROUND}: its aggregation weight defaults to 1, "
            f"whatever it trained (send meta={{'{MetaKey.NUM_STEPS_CURRENT_ROUND}': steps}})")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


# A result's metrics are stored in the round's history (round_state.json): a few, with short names.
MAX_METRICS = 1000
MAX_METRIC_NAME_CHARS = 256


def check_metrics(site: str, metrics: dict[str, Any]) -> dict[str, float]:
    if len(metrics) > MAX_METRICS:
        raise ValidationError(f"site {site}: {len(metrics)} metrics, more than the {MAX_METRICS} allowed")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key or len(key) > MAX_METRIC_NAME_CHARS:
            raise ValidationError(f"site {site}: metric name {quote(key)} must have 1 to {MAX_METRIC_NAME_CHARS} "
                                  "characters")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise ValidationError(f"site {site}: metric {quote(key)} must be a finite number, got {quote(value)}")
        out[key] = value
    return out


# -- what a site sends besides params: checked before anything of it is logged or stored ----------

# Ids the server hands out are short hex (sessions: 32 characters, tasks: 16); these bounds leave
# room for other schemes and refuse anything that could flood a log or a reply.
MAX_ID_CHARS = 128
_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_ID_CHARS}}}")
# Free text a site sends (a failure report, a reason for leaving): kept whole up to this length.
MAX_REASON_CHARS = 4000
# Job ids name a job (a job's name and a suffix): printable, at most this long.
MAX_JOB_ID_CHARS = 256
# A job token: far longer than any generated one (32 characters).
MAX_TOKEN_CHARS = 1024
PARAMS_TYPES = ("", "FULL", "DIFF")


def is_id(value: object) -> bool:
    """Whether ``value`` looks like an id the server hands out (bounded, plain characters)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_task_id(task_id: object) -> str:
    if not is_id(task_id):
        raise ValidationError(f"task id {quote(task_id)} is malformed: 1-{MAX_ID_CHARS} letters, digits, "
                              "'.', '_', ':' or '-'")
    assert isinstance(task_id, str)
    return task_id


def check_params_type(params_type: object) -> str:
    if params_type not in PARAMS_TYPES:
        raise ValidationError(f"params_type {quote(params_type, 20)} is neither FULL nor DIFF (nor empty)")
    assert isinstance(params_type, str)
    return params_type


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID_CHARS or not job_id.isprintable():
        raise ValidationError(f"job id {quote(job_id)} is malformed: 1-{MAX_JOB_ID_CHARS} printable characters")
    return job_id


def short_reason(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """A site's free text (a failure report, a reason to leave), cut to ``limit`` characters."""
    if len(reason) <= limit:
        return reason
    return f"{reason[:limit]}... ({len(reason) - limit} more characters)"
