"""Server-side optimisers: FedAvgM, FedAdam, FedYogi and FedAdagrad.

Each round's FedAvg mean is not taken as the next global model; the difference it makes,
``delta = mean - global`` (a pseudo-gradient, Reddi et al., "Adaptive Federated Optimization",
2021), is fed to an optimiser on the server, and the next global model is ``global + step``.
With ``FedAvgM(server_learning_rate=1, server_momentum=0)`` that is FedAvg again.

- ``fedavgm`` (Hsu et al., 2019): ``v = momentum * v + delta`` (``v = delta`` at the first step),
  ``step = lr * v``. This is ``torch.optim.SGD(lr, momentum)`` on the gradient ``-delta``.
- ``fedadam``: ``m = b1*m + (1-b1)*delta``, ``v = b2*v + (1-b2)*delta**2``; with
  ``bias_correction`` (the default) ``step = eta * m_hat / (sqrt(v_hat) + tau)`` with Adam's
  bias-corrected moments, which is ``torch.optim.Adam(lr=eta, betas, eps=tau)`` on ``-delta``;
  without it, Reddi et al.'s ``eta * m / (sqrt(v) + tau)``.
- ``fedyogi``: as FedAdam without bias correction, but ``v = v - (1-b2) * delta**2 *
  sign(v - delta**2)``, which grows ``v`` more slowly (Reddi et al.).
- ``fedadagrad``: ``v = v + delta**2``, ``m = b1*m + (1-b1)*delta`` (``b1 = 0``, the default, is
  ``m = delta``), ``step = eta * m / (sqrt(v) + tau``); with ``b1 = 0`` this is
  ``torch.optim.Adagrad(lr=eta, eps=tau)`` on ``-delta``.

Only floating-point parameters are stepped; integer and bool buffers (BatchNorm's
``num_batches_tracked``) and BatchNorm's running statistics (``running_mean``, ``running_var``) take
FedAvg's mean, as NVFlare's FedOpt steps only the model's parameters. The optimiser state is kept in the model's floating
dtype (float32 for 16-bit models) and saved with every round's global model, so a resumed server
goes on with the same momentum (``Strategy.state_tensors``).

Server memory beyond FedAvg's: FedAvgM one model (its momentum; none without momentum), FedAdam
and FedYogi two (m and v), FedAdagrad one (v; two with ``beta_1 > 0``), plus a 16 MiB staging
buffer. The mean itself is FedAvg's (``streamed`` as for FedAvg).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flkit.model import ParamsType
from flkit.strategy.base import Aggregator, Contribution, SiteResult, Strategy
from flkit.strategy.fedavg import mean_aggregator
from flkit.strategy.registry import register
from flkit.wire.codec import Params

# Elements per step of the update (a 16 MiB float64 staging buffer at most).
STEP_CHUNK = 1 << 21


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a strategy keeps state of a floating tensor in: float64 for float64, else float32
    (16-bit models' state would lose too much in their own dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _number(owner: str, name: str, value: object, low: float, high: float = math.inf,
            low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        bound = f"{'>' if low_open else '>='} {low:g}" + (
            "" if high == math.inf else f" and {'<' if high_open else '<='} {high:g}")
        raise ValueError(f"{owner}: {name} must be {bound}, got {value!r}")
    return float(value)


# Floating tensors that are statistics, not parameters: they take FedAvg's mean, as NVFlare's FedOpt
# steps only the model's parameters (an adaptive step of a variance could make it negative).
BUFFER_SUFFIXES = ("running_mean", "running_var")


def stepped(name: str, tensor: torch.Tensor) -> bool:
    """Whether the server optimiser steps this tensor (floating, and not a BatchNorm statistic)."""
    return tensor.is_floating_point() and not name.endswith(BUFFER_SUFFIXES)


class ServerOptimizer(Strategy):
    """FedAvg's mean followed by an optimiser step on the server (the subclasses say which step).

    Subclasses name their state tensors (``slots``) and implement ``update``, which turns a chunk
    of ``delta`` into the step, in place, updating the matching chunks of their state."""

    slots: tuple[str, ...] = ()

    def __init__(self, streamed: bool | None = None) -> None:
        self._mean = mean_aggregator(streamed)
        self._state: dict[str, torch.Tensor] = {}  # "<slot>/<tensor name>" -> flat state tensor
        self.steps = 0  # server steps taken (Adam's bias correction counts them)

    def aggregator(self, round_num: int) -> Aggregator:
        return _Stepped(self, self._mean)

    def update(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        """Turn ``delta`` (a flat chunk of ``mean - global``) into the step, in place; ``state``: this
        chunk of each slot (flat views), updated in place. ``self.steps`` is already this step's number."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        steps = state.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{type(self).__name__}: saved steps must be a whole number >= 0, got {steps!r}")
        unknown = set(state) - {"steps"}
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown saved state {sorted(unknown)}")
        self.steps = steps

    def state_tensors(self) -> Mapping[str, torch.Tensor]:
        return self._state

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key in tensors:
            slot = key.partition("/")[0]
            if slot not in self.slots:
                raise ValueError(f"{type(self).__name__}: saved state tensor {key!r} is not one of its slots "
                                 f"{list(self.slots)}")
        self._state = {key: tensor.reshape(-1).contiguous() for key, tensor in tensors.items()}

    def _slot_views(self, global_params: Params) -> dict[str, dict[str, torch.Tensor]]:
        """Per floating tensor, its flat state of each slot (made at the first step: zeros)."""
        views: dict[str, dict[str, torch.Tensor]] = {}
        for name, base in global_params.items():
            if not stepped(name, base):
                continue
            views[name] = {}
            for slot in self.slots:
                key = f"{slot}/{name}"
                state = self._state.get(key)
                if state is None:
                    state = self._state[key] = torch.zeros(base.numel(), dtype=state_dtype(base.dtype))
                elif state.numel() != base.numel():
                    raise ValueError(f"{type(self).__name__}: state {key!r} has {state.numel()} values, the model's "
                                     f"tensor {base.numel()} (a resume with another model?)")
                views[name][slot] = state
        return views


class _Stepped(Aggregator):
    """FedAvg's mean into ``out``, then ``out = global + step(out - global)``."""

    def __init__(self, strategy: ServerOptimizer, mean: Aggregator) -> None:
        self._strategy = strategy
        self._mean = mean
        self._global: Params = {}
        self._out: Callable[[], Params] = dict

    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        self._global, self._out = global_params, out
        self._mean.start(round_num, global_params, out)

    def add(self, result: SiteResult) -> None:
        self._mean.add(result)

    def contribution(self, round_num: int, site: str, weight: float, params_type: ParamsType,
                     cancel: Callable[[], None] | None = None) -> Contribution | None:
        return self._mean.contribution(round_num, site, weight, params_type, cancel)

    def finish(self) -> None:
        self._mean.finish()  # out() holds the mean now
        strategy = self._strategy
        views = strategy._slot_views(self._global)
        out = self._out()
        strategy.steps += 1
        # One staging buffer per state dtype, as large as the largest chunk: allocated once a round.
        staging: dict[torch.dtype, torch.Tensor] = {}
        for name in views:
            base = self._global[name]
            dtype, size = state_dtype(base.dtype), min(STEP_CHUNK, base.numel())
            if staging.get(dtype, torch.empty(0)).numel() < size:
                staging[dtype] = torch.empty(size, dtype=dtype)
        for name, slots in views.items():
            base, target = self._global[name].reshape(-1), out[name].view(-1)
            buffer = staging[state_dtype(base.dtype)]
            for start in range(0, base.numel(), STEP_CHUNK):
                stop = min(start + STEP_CHUNK, base.numel())
                delta = buffer[:stop - start]
                delta.copy_(target[start:stop])
                delta.sub_(base[start:stop])  # the pseudo-gradient: mean - global
                strategy.update(delta, {slot: state[start:stop] for slot, state in slots.items()})
                delta.add_(base[start:stop])
                target[start:stop].copy_(delta)


@register("fedavgm")
class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019), Flower's names: ``server_learning_rate``
    (default 1.0) and ``server_momentum`` (default 0.9; 0 keeps no state). Memory: + 1 model."""

    def __init__(self, server_learning_rate: float = 1.0, server_momentum: float = 0.9,
                 streamed: bool | None = None) -> None:
        super().__init__(streamed)
        self.lr = _number("fedavgm", "server_learning_rate", server_learning_rate, 0.0, low_open=True)
        self.momentum = _number("fedavgm", "server_momentum", server_momentum, 0.0, 1.0)
        self.slots = ("momentum",) if self.momentum else ()

    def update(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        if self.momentum:
            buffer = state["momentum"]
            if self.steps == 1:
                buffer.copy_(delta)
            else:
                buffer.mul_(self.momentum).add_(delta)
            delta.copy_(buffer)
        delta.mul_(self.lr)


class _Adaptive(ServerOptimizer):
    """The FedOpt family's common arguments (Flower's names): ``eta`` (server learning rate),
    ``beta_1``, ``beta_2``, ``tau`` (adaptivity, Adam's eps)."""

    name = ""

    def __init__(self, eta: float, beta_1: float, beta_2: float, tau: float, streamed: bool | None) -> None:
        super().__init__(streamed)
        self.eta = _number(self.name, "eta", eta, 0.0, low_open=True)
        self.beta_1 = _number(self.name, "beta_1", beta_1, 0.0, 1.0, high_open=True)
        self.beta_2 = _number(self.name, "beta_2", beta_2, 0.0, 1.0, high_open=True)
        self.tau = _number(self.name, "tau", tau, 0.0, low_open=True)

    def _momentum(self, delta: torch.Tensor, m: torch.Tensor) -> None:
        m.mul_(self.beta_1).add_(delta, alpha=1.0 - self.beta_1)


@register("fedadam")
class FedAdam(_Adaptive):
    """Adam on the server (Reddi et al., 2021). Defaults: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-9
    (Flower's), and Adam's bias correction (``bias_correction=False``: the paper's form).
    Memory: + 2 models."""

    name = "fedadam"
    slots = ("m", "v")

    def __init__(self, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-9,
                 bias_correction: bool = True, streamed: bool | None = None) -> None:
        super().__init__(eta, beta_1, beta_2, tau, streamed)
        if not isinstance(bias_correction, bool):
            raise ValueError(f"fedadam: bias_correction must be true or false, got {bias_correction!r}")
        self.bias_correction = bias_correction

    def update(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        m, v = state["m"], state["v"]
        self._momentum(delta, m)
        v.mul_(self.beta_2).addcmul_(delta, delta, value=1.0 - self.beta_2)
        if self.bias_correction:
            m_scale = 1.0 / (1.0 - self.beta_1 ** self.steps)
            v_scale = 1.0 / (1.0 - self.beta_2 ** self.steps)
        else:
            m_scale = v_scale = 1.0
        # step = eta * (m * m_scale) / (sqrt(v * v_scale) + tau), written into delta
        torch.mul(v, v_scale, out=delta).sqrt_().add_(self.tau)
        torch.div(m, delta, out=delta).mul_(self.eta * m_scale)


@register("fedyogi")
class FedYogi(_Adaptive):
    """Yogi on the server (Reddi et al., 2021). Defaults (Flower's): eta 0.01, beta_1 0.9,
    beta_2 0.99, tau 1e-3. Memory: + 2 models."""

    name = "fedyogi"
    slots = ("m", "v")

    def __init__(self, eta: float = 0.01, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3,
                 streamed: bool | None = None) -> None:
        super().__init__(eta, beta_1, beta_2, tau, streamed)

    def update(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        m, v = state["m"], state["v"]
        self._momentum(delta, m)
        squared = delta.square()  # (a chunk: at most 16 MiB)
        sign = torch.sub(v, squared).sign_()
        v.addcmul_(squared, sign, value=-(1.0 - self.beta_2))
        torch.sqrt(v, out=delta).add_(self.tau)
        torch.div(m, delta, out=delta).mul_(self.eta)


@register("fedadagrad")
class FedAdagrad(_Adaptive):
    """Adagrad on the server (Reddi et al., 2021). Defaults (Flower's): eta 0.1, tau 1e-9, and
    beta_1 0 (no momentum: one state model; beta_1 > 0 keeps m too). beta_2 is not used."""

    name = "fedadagrad"

    def __init__(self, eta: float = 0.1, beta_1: float = 0.0, tau: float = 1e-9,
                 streamed: bool | None = None) -> None:
        super().__init__(eta, beta_1, 0.0, tau, streamed)
        self.slots = ("m", "v") if self.beta_1 else ("v",)

    def update(self, delta: torch.Tensor, state: dict[str, torch.Tensor]) -> None:
        v = state["v"]
        v.addcmul_(delta, delta)
        if self.beta_1:
            m = state["m"]
            self._momentum(delta, m)
        else:
            m = delta.clone()
        torch.sqrt(v, out=delta).add_(self.tau)
        torch.div(m, delta, out=delta).mul_(self.eta)


__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer"]
