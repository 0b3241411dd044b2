"""patch(trainer): open the site's session for a Lightning trainer and install FLCallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from flkit import api
from flkit.client.session import Session
from flkit.client.settings import current_settings, in_runner_context
from flkit.errors import ConfigError
from flkit_lightning import ranks
from flkit_lightning.callback import FLCallback

log = logging.getLogger("flkit.lightning")


def patch(trainer: pl.Trainer, restore_state: bool = True, load_state_dict_strict: bool = True) -> FLCallback:
    """Make ``trainer.validate()`` and ``trainer.fit()`` take part in the FL job; call it on every rank.

    After it, each round's global model is loaded before the round's first validate() or fit();
    the first validate() of the round reports the metrics the server selects the best model by;
    fit() trains the trainer's own budget (max_epochs / max_steps) again every round and then
    sends the weights. Under DDP it starts the other ranks and the process group at once, so
    ``is_running()`` answers the same on every rank from the first call.

    Args:
        trainer: the Trainer the script uses for every round.
        restore_state: carry optimizer, LR scheduler and AMP scaler states across rounds
            (Lightning rebuilds them at every fit()).
        load_state_dict_strict: a global model that does not match the module (missing or
            unexpected keys, other shapes) is an error; False loads the matching tensors and
            logs what did not match.
    Returns the installed callback (patching the same trainer again returns it unchanged).
    """
    if not isinstance(trainer, pl.Trainer):
        raise TypeError(f"patch() takes a pytorch_lightning.Trainer, got {type(trainer).__name__}")
    for callback in trainer.callbacks:
        if isinstance(callback, FLCallback):
            log.info("trainer already patched; keeping its FLCallback")
            return callback
    site = current_settings().site_name
    world = ranks.world_size(trainer)
    if world > 1:
        ranks.start_ranks(trainer, site)
    session = api.current_session()
    if world > 1 and isinstance(session, Session) and not session.distributed:
        raise ConfigError(f"site {site}: flkit.init() ran before patch() on a {world}-rank trainer, so this rank "
                          "joined alone; call patch(trainer) first (flkit_lightning.init() waits for it)")
    api.init(rank=trainer.global_rank)
    if in_runner_context():
        _keep_outputs_apart(trainer, Path(current_settings().workspace))
    callback = FLCallback(trainer, restore_state=restore_state, load_state_dict_strict=load_state_dict_strict)
    trainer.callbacks.append(callback)
    return callback


def _keep_outputs_apart(trainer: pl.Trainer, workspace: Path) -> None:
    """In-process sites share the launcher's working folder: move Lightning's default outputs
    (lightning_logs/, checkpoints) into the site's workspace so two sites never write into
    the same version folder. A root folder or logger the script chose is left alone."""
    default_root = Path.cwd()
    if Path(trainer.default_root_dir).resolve() != default_root.resolve():
        return
    trainer._default_root_dir = str(workspace)  # read lazily: checkpoints follow it
    loggers = []
    for logger in trainer.loggers:
        if type(logger) in (TensorBoardLogger, CSVLogger) and Path(logger.save_dir).resolve() == default_root:
            logger = type(logger)(save_dir=str(workspace), name=logger.name)
        loggers.append(logger)
    trainer.loggers = loggers
    log.info("Lightning outputs of this site go to %s", workspace)
