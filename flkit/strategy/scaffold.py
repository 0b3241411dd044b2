"""SCAFFOLD (Karimireddy et al., 2020): control variates that correct each site's drift.

The server keeps a control variate ``c`` (one per floating tensor of the model, zeros at first)
and sends it with every training task in ``FLModel.meta["scaffold_c_global"]`` (NVFlare's key).
Each site keeps its own ``c_i`` and corrects every local step by ``- lr * (c - c_i)``; after
training it sets ``c_i+ = c_i - c + (x - y_i) / (K * lr)`` and answers with its model and
``meta["scaffold_c_diff"] = c_i+ - c_i`` (all of which ``flkit.pt.PTScaffoldHelper`` does). The
server takes FedAvg's mean of the models and ``c += (1/N) * sum of the round's c_diffs`` over the
N sites of the job, so ``c`` stays the mean of every site's ``c_i`` (the paper's rule; NVFlare
adds the weighted mean of the round's c_diffs instead, the same when every site takes part with
equal weights).

A site's ``c_i`` belongs to the site, not to the process that ran its script: PTScaffoldHelper
keeps it in the site's folder, one file per round, and the server tells each site which round's
``c_i`` its own ``c`` was last made from (``meta["scaffold_c_local_round"]``). So a site that moves
between workers, or a server that resumes from an earlier round, goes on from the matching ``c_i``.

Server memory beyond FedAvg's: two models (``c`` and the round's sum of c_diffs, in the model's
floating dtype; float32 for 16-bit models). Results are taken whole (not folded while they
arrive), and the task carries ``c`` beside the model (one more model per task on the wire).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flkit.errors import ValidationError
from flkit.model import AlgorithmConstants
from flkit.strategy.base import Aggregator, SiteConfig, SiteResult, Strategy
from flkit.strategy.fedavg import WeightedMean
from flkit.strategy.fedopt import state_dtype
from flkit.strategy.registry import register
from flkit.wire.codec import Params

# Where the server says which round's c_i a site must start from (None: zeros, it never took part).
LOCAL_ROUND_KEY = "scaffold_c_local_round"


@register("scaffold")
class Scaffold(Strategy):
    """SCAFFOLD's server: FedAvg's mean of the models, and the global control variate."""

    def __init__(self) -> None:
        self._c: dict[str, torch.Tensor] = {}  # name -> flat control variate
        self._aggregated: dict[str, int] = {}  # site -> the last round whose c_diff is in c
        self._sites = 0  # the job's sites now (population)
        self._aggregate = _ScaffoldAggregator(self)

    def population(self, sites: Sequence[str]) -> None:
        self._sites = len(sites)

    def configure_train(self, round_num: int, sites: Sequence[str], rng: random.Random) -> dict[str, SiteConfig]:
        return {site: {LOCAL_ROUND_KEY: self._aggregated.get(site)} for site in sites}

    def train_tensors(self, round_num: int, global_params: Params) -> Mapping[str, Mapping[str, torch.Tensor]]:
        return {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: {
            name: self._control(name, base).view(base.shape) for name, base in global_params.items()
            if base.is_floating_point()}}

    def _control(self, name: str, base: torch.Tensor) -> torch.Tensor:
        c = self._c.get(name)
        if c is None:
            c = self._c[name] = torch.zeros(base.numel(), dtype=state_dtype(base.dtype))
        elif c.numel() != base.numel():
            raise ValueError(f"scaffold: the control variate of '{name}' has {c.numel()} values, the model's "
                             f"tensor {base.numel()} (a resume with another model?)")
        return c

    def aggregator(self, round_num: int) -> Aggregator:
        return self._aggregate

    def state_dict(self) -> dict[str, Any]:
        return {"aggregated": dict(self._aggregated)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        aggregated = state.get("aggregated", {})
        if set(state) - {"aggregated"} or not isinstance(aggregated, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in aggregated.items()):
            raise ValueError(f"scaffold: saved state must be {{'aggregated': {{site: round}}}}, got {state!r:.200}")
        self._aggregated = dict(aggregated)

    def state_tensors(self) -> Mapping[str, torch.Tensor]:
        return {f"c/{name}": c for name, c in self._c.items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        bad = [key for key in tensors if not key.startswith("c/")]
        if bad:
            raise ValueError(f"scaffold: saved state tensors {bad[:3]} are not control variates ('c/<name>')")
        self._c = {key[2:]: tensor.reshape(-1).contiguous() for key, tensor in tensors.items()}


class _ScaffoldAggregator(Aggregator):
    """FedAvg's mean of the models; the plain sum of the round's c_diffs, added to c at the end."""

    def __init__(self, strategy: Scaffold) -> None:
        self._strategy = strategy
        self._mean = WeightedMean()
        self._lock = threading.Lock()
        self._sums: dict[str, torch.Tensor] = {}
        self._added: list[str] = []
        self._round = -1
        self._global: Params = {}

    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        self._mean.start(round_num, global_params, out)
        with self._lock:
            self._round, self._global, self._added = round_num, global_params, []
            for name, base in global_params.items():
                if base.is_floating_point():
                    sums = self._sums.get(name)
                    if sums is None or sums.numel() != base.numel():  # (kept round after round)
                        sums = self._sums[name] = torch.empty(base.numel(), dtype=state_dtype(base.dtype))
                    sums.zero_()

    def add(self, result: SiteResult) -> None:
        diff = result.meta_tensors.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF)
        if diff is None:
            raise ValidationError(f"site {result.site}: a SCAFFOLD result must carry "
                                  f"meta['{AlgorithmConstants.SCAFFOLD_CTRL_DIFF}'] (PTScaffoldHelper.get_delta_controls())")
        missing = sorted(set(self._sums) - set(diff))
        extra = sorted(set(diff) - set(self._sums))
        if missing or extra:
            raise ValidationError(f"site {result.site}: meta['{AlgorithmConstants.SCAFFOLD_CTRL_DIFF}'] does not match "
                                  f"the model's floating tensors (missing {missing[:5]}, unexpected {extra[:5]})")
        for name, tensor in diff.items():
            if tensor.numel() != self._sums[name].numel() or not (tensor.is_floating_point()):
                raise ValidationError(f"site {result.site}: meta['{AlgorithmConstants.SCAFFOLD_CTRL_DIFF}']['{name}'] "
                                      f"is {tuple(tensor.shape)} {tensor.dtype}; the model's tensor is "
                                      f"{tuple(self._global[name].shape)}")
        self._mean.add(result)
        with self._lock:
            for name, tensor in diff.items():
                self._sums[name].add_(tensor.reshape(-1))
            self._added.append(result.site)

    def finish(self) -> None:
        self._mean.finish()
        strategy = self._strategy
        with self._lock:
            scale = 1.0 / max(strategy._sites, len(self._added), 1)
            for name, total in self._sums.items():
                strategy._control(name, self._global[name]).add_(total, alpha=scale)
            for site in self._added:
                strategy._aggregated[site] = self._round


__all__ = ["LOCAL_ROUND_KEY", "Scaffold"]
