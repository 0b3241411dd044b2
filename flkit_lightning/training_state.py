"""Carry optimizer, LR scheduler and AMP scaler states from one round's fit() to the next.

Lightning builds new optimizers and schedulers (``configure_optimizers``) at every fit(),
so without this, momentum and Adam moments restart at zero and a schedule restarts at its
first step every round. States are kept in this process only; nothing is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl


@dataclass
class TrainingState:
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    precision: dict[str, Any]


def capture(trainer: pl.Trainer) -> TrainingState:
    """The states at the end of a fit() (the objects themselves are dropped at the next fit)."""
    return TrainingState(
        optimizers=[opt.state_dict() for opt in trainer.optimizers],
        schedulers=[config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
        precision=trainer.precision_plugin.state_dict(),
    )


def restore(trainer: pl.Trainer, state: TrainingState) -> None:
    """Load ``state`` into the optimizers and schedulers the new fit() just built.

    A changed number of optimizers or schedulers (configure_optimizers decided differently)
    is a ValueError: loading states into the wrong objects would corrupt training silently.
    """
    optimizers, configs = trainer.optimizers, trainer.lr_scheduler_configs
    if len(optimizers) != len(state.optimizers) or len(configs) != len(state.schedulers):
        raise ValueError(
            f"restore_state: the last round had {len(state.optimizers)} optimizer(s) and {len(state.schedulers)} "
            f"LR scheduler(s), this fit() has {len(optimizers)} and {len(configs)}; "
            "use patch(trainer, restore_state=False) if configure_optimizers() changes between rounds"
        )
    for opt, saved in zip(optimizers, state.optimizers, strict=True):
        opt.load_state_dict(saved)
    for config, saved in zip(configs, state.schedulers, strict=True):
        config.scheduler.load_state_dict(saved)
    if state.precision:
        trainer.precision_plugin.load_state_dict(state.precision)
