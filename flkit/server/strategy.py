"""Aggregation strategies: a small ABC and FedAvg.

The Controller calls ``start_round`` once, ``add_result`` for every accepted
result as it arrives, and ``finish_round`` to get the next global model. A
strategy therefore keeps O(1) models in memory, not one per site.
"""

from __future__ import annotations

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
        """Fold one accepted result into the running aggregate."""

    @abstractmethod
    def finish_round(self) -> Params:
        """Return the new global model (same keys, shapes and dtypes as the old one)."""


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float32, torch.float64):
        return dtype
    if dtype.is_floating_point:
        return torch.float32  # half / bfloat16 / fp8: average at higher precision
    return torch.float64  # integer and bool buffers: average exactly, round at the end


class FedAvg(Strategy):
    """Weighted federated averaging (McMahan et al.), as a running weighted mean.

    ``mean <- mean + (w / W_total) * (x - mean)`` (``torch.lerp_``) keeps a single
    accumulator per tensor; with one site the result is that site's tensor bit for
    bit. DIFF results are turned into full models (``global + diff``) first, so FULL
    and DIFF sites can be mixed in one round. Integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are averaged in float64 and rounded back to their dtype.
    """

    def __init__(self) -> None:
        self._global: Params = {}
        self._mean: Params = {}
        self._total_weight = 0.0
        self._round = -1

    def start_round(self, round_num: int, global_params: Params) -> None:
        self._global = global_params
        self._mean = {}
        self._total_weight = 0.0
        self._round = round_num

    def add_result(self, result: SiteResult) -> None:
        if result.weight <= 0:
            raise FLKitError(f"site {result.site}: aggregation weight must be > 0, got {result.weight}")
        self._total_weight += result.weight
        frac = result.weight / self._total_weight
        first = not self._mean
        for name, base in self._global.items():
            value = result.params[name]
            acc_dtype = _acc_dtype(base.dtype)
            if result.params_type == ParamsType.DIFF:
                value = base.to(acc_dtype) + value.to(acc_dtype)
            else:
                value = value.to(acc_dtype)
            if first:
                self._mean[name] = value.clone() if value.data_ptr() == result.params[name].data_ptr() else value
            else:
                self._mean[name].lerp_(value, frac)

    def finish_round(self) -> Params:
        if not self._mean:
            raise FLKitError(f"round {self._round}: no results to aggregate")
        out: Params = {}
        for name, base in self._global.items():
            mean = self._mean[name]
            if base.dtype == torch.bool:
                out[name] = mean >= 0.5
            elif not base.dtype.is_floating_point:
                out[name] = torch.round(mean).to(base.dtype)
            else:
                out[name] = mean.to(base.dtype)
        self._mean = {}
        return out
