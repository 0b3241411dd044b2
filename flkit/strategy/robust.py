"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Why: FedAvg's mean follows any one site as far as it likes (one site sending huge values moves the
global model anywhere). These aggregates bound what a few bad sites can do, at a price:

- they need every result of the round at once, so the server keeps a copy of each: memory is
  **one model per sampled site** on top of FedAvg's two (bound it with ``clients_per_round``);
- they ignore ``NUM_STEPS_CURRENT_ROUND`` weights (a weight is what a bad site would lie about),
  except that Multi-Krum averages its chosen results by weight, as Flower's Krum does.

DIFF results are turned into full models (global model + difference) before they are compared.
Integer tensors (BatchNorm's ``num_batches_tracked``) take the coordinate-wise median everywhere.

- ``median`` (Yin et al., 2018): each coordinate is the median of the sites' values (for an even
  count, the mean of the two middle values, as numpy and Flower's FedMedian do).
- ``trimmed-mean`` (Yin et al., 2018): per coordinate, the ``beta`` fraction of the largest and of
  the smallest values are dropped (``floor(beta * n)`` each side) and the rest averaged.
- ``krum`` (Blanchard et al., 2017): each result is scored by the sum of squared distances to its
  ``n - f - 2`` nearest other results; the lowest score wins. With ``m > 1`` (Multi-Krum) the ``m``
  best-scored results are averaged by weight. ``f``: how many results may be bad; Krum needs
  ``n > 2f + 2`` results, and the round fails clearly with fewer.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from flkit.errors import FLKitError
from flkit.model import ParamsType
from flkit.strategy.base import Aggregator, SiteResult, Strategy
from flkit.strategy.registry import register
from flkit.wire.codec import Params


class _KeepAll(Aggregator):
    """Keeps a full copy of every result of the round; ``combine`` makes the aggregate from them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._global: Params = {}
        self._out: Callable[[], Params] = dict
        self._results: list[tuple[str, float, Params]] = []
        self._round = -1

    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        with self._lock:
            self._global, self._out, self._results, self._round = global_params, out, [], round_num

    def add(self, result: SiteResult) -> None:
        full = {}
        for name, base in self._global.items():
            value = result.params[name]
            if tuple(value.shape) != tuple(base.shape):
                raise FLKitError(f"site {result.site}: tensor '{name}' has shape {tuple(value.shape)}, "
                                 f"the model {tuple(base.shape)}")
            full[name] = value + base if result.params_type == ParamsType.DIFF else value.clone()
        with self._lock:
            self._results.append((result.site, result.weight, full))

    def finish(self) -> None:
        with self._lock:
            results = list(self._results)
            self._results = []
        if not results:
            raise FLKitError(f"round {self._round}: no results to aggregate")
        results.sort(key=lambda r: r[0])  # arrival order does not change the aggregate
        self.combine(results, self._out())

    def combine(self, results: list[tuple[str, float, Params]], out: Params) -> None:
        raise NotImplementedError


def _median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over dim 0; an even count gives the mean of the two middle values."""
    if stacked.dtype == torch.bool:  # a majority (a tie: False)
        return _median(stacked.to(torch.uint8)).bool()
    n = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if n % 2:
        return ordered[n // 2]
    if not stacked.is_floating_point():
        return ordered[n // 2 - 1]  # integers: the lower middle value (a mean could fall between them)
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class _Median(_KeepAll):
    def combine(self, results: list[tuple[str, float, Params]], out: Params) -> None:
        for name, target in out.items():
            target.copy_(_median(torch.stack([params[name] for _, _, params in results])))


class _TrimmedMean(_KeepAll):
    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def combine(self, results: list[tuple[str, float, Params]], out: Params) -> None:
        n = len(results)
        cut = math.floor(self.beta * n)
        for name, target in out.items():
            stacked = torch.stack([params[name] for _, _, params in results])
            if not stacked.is_floating_point():
                target.copy_(_median(stacked))
                continue
            ordered = stacked.sort(dim=0).values
            target.copy_(ordered[cut:n - cut].mean(dim=0))


class _Krum(_KeepAll):
    def __init__(self, f: int, m: int) -> None:
        super().__init__()
        self.f, self.m = f, m

    def combine(self, results: list[tuple[str, float, Params]], out: Params) -> None:
        n = len(results)
        if n <= 2 * self.f + 2:
            raise FLKitError(f"krum with f={self.f} needs more than {2 * self.f + 2} results, got {n}")
        distances = torch.zeros(n, n, dtype=torch.float64)  # squared, summed tensor by tensor
        for name, target in out.items():
            if not target.is_floating_point():
                continue
            values = [params[name].reshape(-1).double() for _, _, params in results]
            for i in range(n):
                for j in range(i + 1, n):
                    d = float(torch.sum((values[i] - values[j]) ** 2))
                    distances[i, j] += d
                    distances[j, i] += d
        neighbours = n - self.f - 2
        scores = [float(distances[i][torch.arange(n) != i].sort().values[:neighbours].sum()) for i in range(n)]
        chosen = sorted(range(n), key=lambda i: (scores[i], results[i][0]))[:min(self.m, n)]
        total = sum(results[i][1] for i in chosen)
        for name, target in out.items():
            if not target.is_floating_point():
                target.copy_(_median(torch.stack([results[i][2][name] for i in chosen])))
                continue
            mean = sum(results[i][2][name].double() * (results[i][1] / total) for i in chosen)
            assert isinstance(mean, torch.Tensor)
            target.copy_(mean)


@register("median")
class FedMedian(Strategy):
    """Coordinate-wise median of the round's results (see flkit.strategy.robust). No arguments.
    Server memory: one model per sampled site on top of FedAvg's."""

    def __init__(self) -> None:
        self._aggregate = _Median()

    def aggregator(self, round_num: int) -> Aggregator:
        return self._aggregate


@register("trimmed-mean")
class FedTrimmedMean(Strategy):
    """Coordinate-wise mean after dropping the ``beta`` fraction of the largest and of the smallest
    values (0 <= beta < 0.5). Server memory: one model per sampled site on top of FedAvg's."""

    def __init__(self, beta: float = 0.1) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
            raise ValueError(f"trimmed-mean: beta must be a number in [0, 0.5), got {beta!r}")
        self._aggregate = _TrimmedMean(float(beta))

    def aggregator(self, round_num: int) -> Aggregator:
        return self._aggregate


@register("krum")
class Krum(Strategy):
    """Krum (``m=1``) or Multi-Krum (``m > 1``): the result(s) closest to their ``n - f - 2``
    nearest others. ``f``: results that may be bad (n must exceed 2f + 2). Server memory: one model
    per sampled site on top of FedAvg's."""

    def __init__(self, f: int = 1, m: int = 1) -> None:
        for label, value, low in (("f", f, 0), ("m", m, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"krum: {label} must be an int >= {low}, got {value!r}")
        self._aggregate = _Krum(f, m)

    def aggregator(self, round_num: int) -> Aggregator:
        return self._aggregate


__all__ = ["FedMedian", "FedTrimmedMean", "Krum"]
