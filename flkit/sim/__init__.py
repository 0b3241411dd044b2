"""The local simulator: the real server on loopback and N in-process sites."""

from flkit.sim.simulator import SimulationResult, simulate

__all__ = ["SimulationResult", "simulate"]
