"""FedProx's proximal term as a loss module (NVFlare's ``PTFedProxLoss``, same name and call)."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss


class PTFedProxLoss(_Loss):
    """``mu / 2 * sum ||w - w_global||**2`` over the trainable parameters of two models.

    ``loss = criterion(out, y) + PTFedProxLoss(mu)(model, global_model)``, where ``global_model`` is
    a frozen copy of the model as received this round and ``mu`` is ``FLModel.meta["fedprox_mu"]``.
    Parameters are paired by name (NVFlare pairs them by position), less the prefixes DDP and
    torch.compile add, so a copy that lacks one is an error rather than a silent mismatch."""

    def __init__(self, mu: float = 0.01) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not mu >= 0.0 or mu == float("inf"):
            raise ValueError(f"PTFedProxLoss: mu must be a finite number >= 0, got {mu!r}")
        self.mu = float(mu)

    def forward(self, input: torch.nn.Module, target: torch.nn.Module) -> torch.Tensor:  # noqa: A002 - NVFlare's names
        reference = {_unwrapped(name): p for name, p in target.named_parameters()}
        total: torch.Tensor | None = None
        for name, param in input.named_parameters():
            name = _unwrapped(name)
            if not param.requires_grad:
                continue
            if name not in reference:
                raise KeyError(f"PTFedProxLoss: the global model has no parameter '{name}'")
            term = torch.sum((param - reference[name].detach()) ** 2)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total * (self.mu / 2)


# What DDP (``module.``) and torch.compile (``_orig_mod.``) put before a wrapped model's parameter names:
# one of the two models may be wrapped and the other not.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrapped(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


__all__ = ["PTFedProxLoss"]
