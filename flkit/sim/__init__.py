"""The local simulator: the real server on loopback and the sites on a pool of workers.

``simulate`` and ``SimulationResult`` are imported on first use, so a worker process
(``python -m flkit.sim.worker``) does not import the job and server code it never uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flkit.sim.simulator import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from flkit.sim import simulator

        return getattr(simulator, name)
    raise AttributeError(f"module 'flkit.sim' has no attribute {name!r}")
