"""Aggregation strategies: a small ABC and FedAvg.

The Controller calls ``start_round`` once, ``add_result`` for every accepted
result as it arrives, and ``finish_round`` to get the next global model. A
strategy therefore keeps O(1) models in memory, not one per site.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from flkit.errors import FLKitError
from flkit.model import ParamsType
from flkit.wire.codec import Params


@dataclass
class SiteResult:
    """One site's validated answer to a train task."""

    site: str
    params: Params
    params_type: ParamsType
    weight: float
    metrics: dict[str, Any] = field(default_factory=dict)


class Strategy(ABC):
    """How a round's results become the next global model."""

    @abstractmethod
    def start_round(self, round_num: int, global_params: Params) -> None:
        """Prepare to aggregate results computed from ``global_params``."""

    @abstractmethod
    def add_result(self, result: SiteResult) -> None:
        """Fold one accepted result into the running aggregate. Called as results arrive, possibly
        from several threads at once; ``result.params`` are only valid during the call."""

    @abstractmethod
    def finish_round(self) -> Params:
        """Return the new global model (same keys, shapes and dtypes as the old one)."""


# Elements folded per step: small enough that the float64 staging buffer stays in cache.
FOLD_CHUNK = 1 << 18


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64 or dtype.is_complex:
        return torch.complex128 if dtype.is_complex else torch.float64
    return torch.float64  # float32/half/bfloat16/fp8 and integer/bool buffers: exact products, summed in float64


class _Accumulator:
    """The running weighted sum of one tensor, in float64."""

    __slots__ = ("sum", "touched")

    def __init__(self, like: torch.Tensor) -> None:
        self.sum = torch.empty(like.shape, dtype=_acc_dtype(like.dtype))
        self.touched = False


class FedAvg(Strategy):
    """Weighted federated averaging (McMahan et al.): ``sum(w_i * x_i) / sum(w_i)``.

    Why float64 sums: a float32 value times a whole-number weight (``NUM_STEPS_CURRENT_ROUND``
    < 2**29) is exact in float64, and the sum of a round's products rounds at 2**-53, far below
    float32's resolution. The new global model is that sum rounded once, so it has the same bits
    whatever order the results arrive in (unless an element's exact mean lies within 2**-29 ulp
    of a float32 rounding tie; float64 models sum at their own precision, in arrival order).
    With one site the result is that site's tensor bit for bit (for float32 and narrower floats, and
    integers below 2**53).

    Memory: one float64 sum per tensor (two float32 model sizes), reused across rounds, and a
    small staging buffer; results are folded in as they arrive and never kept. ``add_result``
    may be called from several threads at once; folds run one at a time (a fold is bound by
    memory bandwidth: two at once on two cores were slower than one after the other). DIFF results are summed as
    differences and the global model is added once, weighted, at the end, so FULL and DIFF
    sites can be mixed. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are rounded
    back to their dtype, bool ones by majority.
    """

    def __init__(self) -> None:
        self._global: Params = {}
        self._acc: dict[str, _Accumulator] = {}
        self._lock = threading.Lock()  # the weights and counts
        self._fold_lock = threading.Lock()  # the sums
        self._total_weight = 0.0
        self._diff_weight = 0.0
        self._results = 0
        self._round = -1
        self._staging: torch.Tensor | None = None  # used under _fold_lock only

    def start_round(self, round_num: int, global_params: Params) -> None:
        with self._fold_lock, self._lock:  # a late fold of the last round cannot land in this one
            self._start_round(round_num, global_params)

    def _start_round(self, round_num: int, global_params: Params) -> None:
        self._global = global_params
        self._total_weight = self._diff_weight = 0.0
        self._results = 0
        self._round = round_num
        for name, base in global_params.items():
            acc = self._acc.get(name)
            if acc is None or acc.sum.shape != base.shape or acc.sum.dtype != _acc_dtype(base.dtype):
                self._acc[name] = _Accumulator(base)
            else:
                acc.touched = False
        for name in [n for n in self._acc if n not in global_params]:
            del self._acc[name]

    def _buffer(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._staging
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype)
            self._staging = buf
        return buf[:n]

    def _fold(self, acc: _Accumulator, value: torch.Tensor, weight: float) -> None:
        """acc.sum (+)= weight * value, in FOLD_CHUNK steps through a float64 staging buffer."""
        flat_sum = acc.sum.view(-1)
        flat = value.reshape(-1)
        if flat.dtype == flat_sum.dtype:
            if acc.touched:
                flat_sum.add_(flat, alpha=weight)
            else:
                torch.mul(flat, weight, out=flat_sum)
            return
        n = flat.numel()
        for start in range(0, n, FOLD_CHUNK):
            stop = min(n, start + FOLD_CHUNK)
            part = flat_sum[start:stop]
            if acc.touched:
                staged = self._buffer(stop - start, flat_sum.dtype)
                staged.copy_(flat[start:stop])
                part.add_(staged, alpha=weight)
            else:
                part.copy_(flat[start:stop])
                part.mul_(weight)

    def add_result(self, result: SiteResult) -> None:
        if not result.weight > 0:
            raise FLKitError(f"site {result.site}: aggregation weight must be > 0, got {result.weight}")
        with self._fold_lock:
            for name in self._global:
                acc = self._acc[name]
                self._fold(acc, result.params[name], result.weight)
                acc.touched = True
        with self._lock:
            self._total_weight += result.weight
            if result.params_type == ParamsType.DIFF:
                self._diff_weight += result.weight
            self._results += 1

    def finish_round(self) -> Params:
        with self._fold_lock:  # no fold is half-way through the sums
            return self._finish_round()

    def _finish_round(self) -> Params:
        with self._lock:
            if not self._results:
                raise FLKitError(f"round {self._round}: no results to aggregate")
            total, diff_weight = self._total_weight, self._diff_weight
        out: Params = {}
        for name, base in self._global.items():
            acc = self._acc[name]
            if diff_weight:
                self._fold(acc, base, diff_weight)
            out[name] = self._mean(acc.sum, total, base.dtype)
        return out

    def _mean(self, total_sum: torch.Tensor, total: float, dtype: torch.dtype) -> torch.Tensor:
        """total_sum / total, rounded once to ``dtype`` (chunked: no model-sized float64 temporary)."""
        result = torch.empty(total_sum.shape, dtype=dtype)
        flat_out, flat_sum = result.view(-1), total_sum.view(-1)
        n = flat_sum.numel()
        for start in range(0, n, FOLD_CHUNK):
            stop = min(n, start + FOLD_CHUNK)
            staged = self._buffer(stop - start, flat_sum.dtype)
            torch.div(flat_sum[start:stop], total, out=staged)
            if dtype == torch.bool:
                flat_out[start:stop].copy_(staged >= 0.5)
            elif not (dtype.is_floating_point or dtype.is_complex):
                flat_out[start:stop].copy_(staged.round_())
            else:
                flat_out[start:stop].copy_(staged)
        return result
