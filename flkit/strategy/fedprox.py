"""FedProx (Li et al., 2020): FedAvg whose sites keep close to the global model.

Each site adds ``mu / 2 * ||w - w_global||**2`` to its loss (NVFlare's ``PTFedProxLoss``,
``flkit.pt.PTFedProxLoss``), which limits how far heterogeneous sites drift in their local
epochs. The server's part is small: FedAvg's mean, and ``fedprox_mu`` in every training task's
``FLModel.meta`` (NVFlare's key), where a script reads it each round and a Lightning trainer
patched with ``flare.patch`` applies it by itself. Server memory: FedAvg's, nothing more.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from flkit.model import AlgorithmConstants
from flkit.strategy.base import Aggregator, SiteConfig, Strategy
from flkit.strategy.fedavg import mean_aggregator
from flkit.strategy.registry import register


def check_mu(value: object, owner: str = "fedprox") -> float:
    """A FedProx coefficient: a finite number > 0 (NVFlare's rule for its recipe and its clients)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: fedprox_mu must be a finite number > 0, got {value!r}")
    return float(value)


@register("fedprox")
class FedProx(Strategy):
    """FedAvg plus ``fedprox_mu`` (default 0.01, NVFlare's) in every site's training task."""

    def __init__(self, fedprox_mu: float = 0.01, streamed: bool | None = None) -> None:
        self.mu = check_mu(fedprox_mu)
        self._mean = mean_aggregator(streamed)

    def configure_train(self, round_num: int, sites: Sequence[str], rng: random.Random) -> dict[str, SiteConfig]:
        return {site: {AlgorithmConstants.FEDPROX_MU: self.mu} for site in sites}

    def aggregator(self, round_num: int) -> Aggregator:
        return self._mean


__all__ = ["FedProx", "check_mu"]
