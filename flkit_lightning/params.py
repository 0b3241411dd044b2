"""Load a received global model into a LightningModule, with a clear report of any mismatch.

``torch.nn.Module.load_state_dict(strict=False)`` still raises on a wrong shape and says
nothing about what it skipped; here every mismatch is named, whichever way ``strict`` is set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from flkit.errors import ValidationError

log = logging.getLogger("flkit.lightning")

_SHOWN = 10  # names listed per kind of mismatch; the count says how many more


@dataclass
class Mismatch:
    """How a received state dict differs from the module's own."""

    missing: list[str] = field(default_factory=list)  # the module has them, the global model does not
    unexpected: list[str] = field(default_factory=list)  # the global model has them, the module does not
    wrong_shape: list[str] = field(default_factory=list)  # "name: received (a, b), module has (c, d)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def describe(self) -> str:
        parts = []
        for what, names in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                            ("wrong shapes", self.wrong_shape)):
            if names:
                more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
                parts.append(f"{what} ({len(names)}): {', '.join(names[:_SHOWN])}{more}")
        return "; ".join(parts)


def compare(module: nn.Module, params: Mapping[str, torch.Tensor]) -> Mismatch:
    """The differences between ``params`` and ``module.state_dict()`` (names and shapes)."""
    own = module.state_dict()
    mismatch = Mismatch(
        missing=sorted(set(own) - set(params)),
        unexpected=sorted(set(params) - set(own)),
    )
    for name in sorted(set(own) & set(params)):
        got, want = tuple(params[name].shape), tuple(own[name].shape)
        if got != want:
            mismatch.wrong_shape.append(f"{name}: received {got}, module has {want}")
    return mismatch


def load_global_params(module: nn.Module, params: Mapping[str, torch.Tensor], strict: bool, where: str) -> Mismatch:
    """Copy ``params`` into ``module``.

    strict: any mismatch raises ``ValidationError`` naming it, and nothing is loaded.
    Not strict: the matching tensors are loaded and the mismatch is logged as a warning.
    ``where`` says whose model it is (site and round) in those messages.
    """
    mismatch = compare(module, params)
    if mismatch and strict:
        raise ValidationError(
            f"{where}: the global model does not fit the LightningModule: {mismatch.describe()}. "
            "Check that the job's initial model is this module (FedAvgJob(initial_model=...)), or "
            "patch(trainer, load_state_dict_strict=False) to load only the matching tensors"
        )
    if mismatch:
        log.warning("%s: loading only the matching tensors of the global model: %s", where, mismatch.describe())
    skip = set(mismatch.unexpected) | {entry.split(":", 1)[0] for entry in mismatch.wrong_shape}
    module.load_state_dict({k: v for k, v in params.items() if k not in skip}, strict=not mismatch)
    return mismatch
