"""FLCallback: the hooks that make ``trainer.validate()`` / ``trainer.fit()`` one FL round.

A round is one task from the server. Its global model is loaded before the first validate()
or fit() of the round; the first explicit validate() gives the round's metrics (never the
sanity check, never the validation inside fit()); the end of fit() sends the trained weights
with those metrics and the number of optimizer steps taken. Every rank of a DDP trainer runs
these hooks in the same order, so they make the same Client API calls: rank 0 talks to the
server and shares each task with the other ranks, whose ``send()`` sends nothing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn

from flkit import api
from flkit.client.task_state import Phase, TaskState
from flkit.errors import FLKitError
from flkit.messages import Task
from flkit.model import AlgorithmConstants, FLModel, MetaKey
from flkit_lightning import training_state
from flkit_lightning.params import load_global_params

log = logging.getLogger("flkit.lightning")

# A LightningModule may carry extra meta for the server here (NVFlare's name for it).
FL_META_ATTR = "__fl_meta__"
TRAIN, VALIDATE, SUBMIT_MODEL = "train", "validate", "submit_model"


class FLCallback(Callback):
    """Installed by ``flkit_lightning.patch(trainer)``; one per trainer."""

    def __init__(self, trainer: pl.Trainer, restore_state: bool = True, load_state_dict_strict: bool = True) -> None:
        super().__init__()
        self.restore_state = restore_state
        self.load_state_dict_strict = load_state_dict_strict
        # The per-round budget is what the trainer was built with: fit() trains that much every round.
        self.epochs_per_round: int | None = trainer.fit_loop.max_epochs
        self.steps_per_round: int = trainer.fit_loop.max_steps
        # The task whose global model this callback loaded; whether a task is open, and which,
        # is the session's task state (``_state()``), not a copy kept here.
        self.loaded_task_id: str | None = None
        self.metrics: dict[str, float] | None = None  # the round's explicit validate() metrics
        self.round_start_step = 0
        self.saved_state: training_state.TrainingState | None = None
        self._warned_no_metrics = False
        self.proximal: FedProxTerm | None = None  # this round's FedProx term, when the task asks for one

    # -- the round ----------------------------------------------------------

    @staticmethod
    def _state() -> TaskState:
        return api.require_session().state

    def _open_task(self) -> Task | None:
        """The task the script holds and has not answered (the session's state says)."""
        state = self._state()
        return state.task if state.phase == Phase.HELD else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Before validate()/fit() builds anything: load the round's global model."""
        if stage not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        fitting = stage == TrainerFn.FITTING
        state = self._state()
        if fitting and state.phase == Phase.ANSWERED and state.last_task_name != TRAIN:
            self._skip_fit(trainer, f"this round's task '{state.last_task_name}' was answered by validate()")
            return
        task = self._open_task()
        if task is None or task.task_id != self.loaded_task_id:
            model = api.receive()
            if model is None:
                if fitting:
                    self._skip_fit(trainer, "the job has ended")
                else:
                    log.info("validate(): no task (the job has ended); validating the local model")
                return
            self._start_round(trainer, pl_module, model)
        task = self._open_task()
        if task is None:
            return
        name = task.name
        if name == SUBMIT_MODEL:
            # Cross-site evaluation asks for this site's own model: the module as trained so far.
            if trainer.is_global_zero:
                self._answer(FLModel(params=pl_module.state_dict()))
            else:
                self._answer(FLModel(metrics={}))  # ranks > 0: closes the task, sends nothing
            if fitting:
                self._skip_fit(trainer, "this round's task 'submit_model' was answered with the local model")
            return
        if name not in (TRAIN, VALIDATE):
            raise FLKitError(f"flkit_lightning answers 'train', 'validate' and 'submit_model' tasks, got '{name}'")
        if fitting and name == VALIDATE:
            log.warning("site %s, round %s: task 'validate' reached fit() before any validate(); it is answered "
                        "with no metrics. Call trainer.validate() before fit() in the loop to report them.",
                        api.get_site_name(), task.round)
            self._answer(FLModel(metrics={}))
            self._skip_fit(trainer, "this round's task is 'validate'")
            return
        if fitting:
            self._set_budget(trainer)

    def _start_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: FLModel) -> None:
        task = self._open_task()
        self.loaded_task_id = None if task is None else task.task_id
        self.metrics = None
        self.round_start_step = trainer.global_step
        if model.params:
            where = f"site {api.get_site_name()}, round {model.current_round}"
            load_global_params(pl_module, model.params, self.load_state_dict_strict, where)
        self.proximal = FedProxTerm.for_round(model, pl_module) if task is not None and task.name == TRAIN else None

    def _set_budget(self, trainer: pl.Trainer) -> None:
        """Let this fit() train one more round's worth (Lightning would stop at once: 'max_epochs reached')."""
        loop = trainer.fit_loop
        if self.epochs_per_round is not None and self.epochs_per_round >= 0:
            loop.max_epochs = trainer.current_epoch + self.epochs_per_round
        if self.steps_per_round >= 0:
            loop.epoch_loop.max_steps = trainer.global_step + self.steps_per_round

    @staticmethod
    def _skip_fit(trainer: pl.Trainer, why: str) -> None:
        log.info("fit() skipped: %s", why)
        trainer.fit_loop.max_epochs = trainer.current_epoch
        trainer.fit_loop.epoch_loop.max_steps = trainer.global_step
        trainer.num_sanity_val_steps = 0

    # -- metrics ------------------------------------------------------------

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Only an explicit validate() of the round's global model gives the round's metrics."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.VALIDATING:
            return
        task = self._open_task()
        if task is None or task.task_id != self.loaded_task_id or self.metrics is not None:
            return
        self.metrics = scalar_metrics(trainer.callback_metrics)
        if task.name == VALIDATE:
            self._answer(FLModel(metrics=self.metrics))

    # -- training -----------------------------------------------------------

    def _training(self) -> bool:
        task = self._open_task()
        return task is not None and task.name == TRAIN and task.task_id == self.loaded_task_id

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training() and self.restore_state and self.saved_state is not None:
            training_state.restore(trainer, self.saved_state)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """FedProx (``meta["fedprox_mu"]`` in the task, as NVFlare main's patched trainer reads it):
        the proximal term's exact gradient, added to every trainable parameter's gradient."""
        if self.proximal is not None and self._training():
            self.proximal.add_gradient(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Send the trained weights with the round's metrics and its number of steps."""
        if not self._training():
            return
        self.proximal = None
        meta = fl_meta(pl_module)
        meta.setdefault(MetaKey.NUM_STEPS_CURRENT_ROUND, trainer.global_step - self.round_start_step)
        if self.metrics is None and not self._warned_no_metrics and trainer.is_global_zero:
            self._warned_no_metrics = True
            log.warning("site %s: fit() without a validate() of the global model first: the server gets no "
                        "metrics for best-model selection", api.get_site_name())
        if trainer.is_global_zero:  # send() moves the tensors to the CPU (to_cpu_params), once
            self._answer(FLModel(params=pl_module.state_dict(), metrics=self.metrics, meta=meta))
        else:
            self._answer(FLModel(metrics=self.metrics, meta=meta))  # ranks > 0: closes the task, sends nothing
        if self.restore_state:
            self.saved_state = training_state.capture(trainer)
        trainer.num_sanity_val_steps = 0  # the first round checked the loop; later rounds need not

    @staticmethod
    def _answer(model: FLModel) -> None:
        api.send(model)


class FedProxTerm:
    """``mu / 2 * ||w - w_global||**2`` for one round: its gradient ``mu * (w - w_global)``, added
    before each optimiser step (after AMP's unscaling), so no loss needs changing."""

    def __init__(self, mu: float, reference: dict[str, torch.Tensor]) -> None:
        self.mu = mu
        self.reference = reference

    @classmethod
    def for_round(cls, model: FLModel, pl_module: pl.LightningModule) -> FedProxTerm | None:
        """The round's term when its task carries a FedProx coefficient > 0; else None."""
        mu = (model.meta or {}).get(AlgorithmConstants.FEDPROX_MU)
        if mu is None or mu == 0:
            return None
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
            raise ValueError(f"meta['{AlgorithmConstants.FEDPROX_MU}'] must be a finite number >= 0, got {mu!r}")
        if not pl_module.automatic_optimization:
            raise RuntimeError("FedProx in a patched trainer needs Lightning's automatic optimization; with "
                               "manual optimization add flkit.pt.PTFedProxLoss to the loss yourself")
        return cls(float(mu), {name: p.detach().clone() for name, p in pl_module.named_parameters()
                               if p.requires_grad})

    @torch.no_grad()
    def add_gradient(self, pl_module: pl.LightningModule) -> None:
        matched = 0
        for name, param in pl_module.named_parameters():
            reference = self.reference.get(name)
            if reference is None or param.grad is None:
                continue
            if reference.device != param.device:  # taken before Lightning moved the module to its device
                reference = self.reference[name] = reference.to(param.device)
            param.grad.add_(param.detach() - reference, alpha=self.mu)
            matched += 1
        if not matched:
            raise RuntimeError("FedProx: no trainable parameter of the module has a gradient under its own name "
                               "(a sharded strategy such as FSDP or DeepSpeed?); add flkit.pt.PTFedProxLoss to "
                               "the loss instead")


def fl_meta(pl_module: pl.LightningModule) -> dict[str, Any]:
    """A copy of the module's ``__fl_meta__`` dict (extra meta for the server), or {}."""
    extra = getattr(pl_module, FL_META_ATTR, None)
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"{type(pl_module).__name__}.{FL_META_ATTR} must be a dict, got {type(extra).__name__}")
    return dict(extra)


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Lightning's logged values as plain floats (one-element tensors or numbers only)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            out[key] = float(value.item())
        elif isinstance(value, (int, float)):
            out[key] = float(value)
    return out
