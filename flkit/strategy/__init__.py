"""Strategies: a ``Strategy`` plans each round, an ``Aggregator`` streams its results into the next
global model; strategies are registered by name so a job names them in ``job.json``.

``import flkit.strategy`` costs no torch; ``FedAvg`` and ``WeightedMean`` load on first use.
"""

from __future__ import annotations

from typing import Any

from flkit.strategy.base import Aggregator, SiteConfig, SiteResult, Strategy, mean_metrics
from flkit.strategy.registry import create, names, register, spec_of

_LAZY = {"FedAvg": "flkit.strategy.fedavg", "WeightedMean": "flkit.strategy.fedavg"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flkit.strategy' has no attribute {name!r}")


__all__ = ["Aggregator", "FedAvg", "SiteConfig", "SiteResult", "Strategy", "WeightedMean", "create", "mean_metrics",
           "names", "register", "spec_of"]
