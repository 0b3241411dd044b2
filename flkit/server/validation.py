"""Checks a site's result against the global model before it can touch the aggregate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from flkit.errors import ValidationError
from flkit.model import MetaKey
from flkit.wire.codec import Params


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


def check_params(site: str, params: Params, expected: Params) -> None:
    """Same keys, shapes and dtypes as ``expected``, and only finite values."""
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise ValidationError(f"site {site}: result keys do not match the global model: {'; '.join(parts)}")
    for name, ref in expected.items():
        got = params[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise ValidationError(
                f"site {site}: tensor '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
            )
        if got.dtype != ref.dtype:
            raise ValidationError(f"site {site}: tensor '{name}' has dtype {got.dtype}, expected {ref.dtype}")
    names = list(expected)
    bad_index = first_non_finite([params[name] for name in names])
    if bad_index is not None:
        name = names[bad_index]
        bad = int((~torch.isfinite(params[name])).sum())
        raise ValidationError(f"site {site}: tensor '{name}' has {bad} non-finite value(s) (NaN or Inf)")


def weight_of(site: str, meta: dict[str, Any]) -> float:
    """The aggregation weight: NUM_STEPS_CURRENT_ROUND, default 1."""
    raw = meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw) or raw <= 0:
        raise ValidationError(
            f"site {site}: meta {MetaKey.NUM_STEPS_CURRENT_ROUND} must be a positive number, got {raw!r}"
        )
    return float(raw)


def check_metrics(site: str, metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValidationError(f"site {site}: metric '{key}' must be a finite number, got {value!r}")
        out[key] = value
    return out
