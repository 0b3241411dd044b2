"""Bring up a Lightning DDP trainer's ranks at patch() time, before the FL loop starts.

The loop's first ``is_running()`` must already be answered the same on every rank, but
Lightning normally starts the other ranks and the process group only inside the first
``fit()``/``validate()``. So patch() does those two steps early, with Lightning's own
launcher and strategy: with ``python script.py`` Lightning re-runs the script for ranks > 0;
under ``torchrun`` (or SLURM) the ranks exist already and only the group is initialised.
Lightning skips both steps later, as it does for any process group that already exists.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from flkit.client.settings import in_runner_context
from flkit.errors import ConfigError


def world_size(trainer: pl.Trainer) -> int:
    """Ranks the trainer will run on (``trainer.world_size`` reads 1 until the group is set up)."""
    if not isinstance(trainer.strategy, ParallelStrategy):
        return 1
    return trainer.num_nodes * trainer.num_devices


def start_ranks(trainer: pl.Trainer, site: str) -> None:
    """Start the other ranks (unless they exist) and the default process group, now."""
    strategy = trainer.strategy
    if in_runner_context():
        raise ConfigError(
            f"site {site}: Trainer({type(strategy).__name__}, {world_size(trainer)} devices) needs processes of "
            "its own: Lightning re-runs the script for every other rank, and torch.distributed allows one process "
            "group per process, while in-process sites share the launcher's. Run the script as an external "
            "process: ScriptRunner(..., launch_external_process=True), or job.py --launch_process"
        )
    launcher = strategy.launcher
    if launcher is not None and not isinstance(launcher, _SubprocessScriptLauncher):
        raise ConfigError(
            f"site {site}: strategy {type(strategy).__name__} with {type(launcher).__name__} runs each fit() in "
            "fresh processes, which cannot keep the FL loop of the script; use strategy='ddp' (Lightning "
            "re-runs the script for each rank) or launch the script with torchrun"
        )
    if launcher is not None:
        launcher.launch(lambda: None, trainer=trainer)  # starts ranks > 0, unless torchrun/SLURM did
    strategy.setup_environment()  # initialises the default process group on every rank
