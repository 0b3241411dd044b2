"""NVFlare's recipe helpers: experiment tracking, cross-site evaluation, per-site settings."""

from __future__ import annotations

import importlib.util
from typing import Any

from flkit.errors import ConfigError
from flkit.job.components import RECEIVERS, CrossSiteModelEval
from flkit.job.recipes import Recipe, set_per_site
from flkit.server.config import check_site_name

# The Python package each tracking type needs, and the extra that installs it.
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def add_experiment_tracking(recipe: Recipe, tracking_type: str, tracking_config: dict[str, Any] | None = None,
                            client_side: bool = False, server_side: bool = True,
                            clients: list[str] | None = None) -> None:
    """Write what the sites log (``flare.log``, ``SummaryWriter``, ``MLflowWriter``, ``WandBWriter``)
    with ``tracking_type`` ("tensorboard", "mlflow" or "wandb").

    ``server_side``: the server writes every site's records into the result folder
    (``tb_events/<site>/``, ``mlruns/``, ``wandb/``); ``client_side``: each site (or the listed
    ``clients``) writes its own records into its folder. ``tracking_config`` holds the
    receiver's arguments (TensorBoard: ``tb_folder``; MLflow: ``tracking_uri``, ``kw_args``;
    W&B: ``wandb_args``, ``mode``). A missing library is an error naming the extra to install.
    """
    receiver_cls = RECEIVERS.get(tracking_type)
    if receiver_cls is None:
        raise ConfigError(f"tracking_type must be one of {sorted(RECEIVERS)}, got {tracking_type!r}")
    if not server_side and not client_side:
        raise ConfigError("add_experiment_tracking: server_side and client_side are both False; nothing would "
                          "be tracked")
    package = _PACKAGES[tracking_type]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"tracking_type={tracking_type!r} needs the {package} package: "
                          f"pip install 'flkit[{tracking_type}]'")
    try:
        receiver = receiver_cls(**(tracking_config or {}))
    except TypeError as exc:
        raise ConfigError(f"tracking_config for {tracking_type}: {exc}") from None
    job = recipe.job
    if server_side:
        job.tracking[tracking_type] = receiver.config
    if client_side:
        names = None if clients is None else [check_site_name(c) for c in clients]
        job.options["client_tracking"] = [
            *[s for s in job.options.get("client_tracking", []) if s["type"] != tracking_type],
            {"type": tracking_type, "config": receiver.config, "clients": names},
        ]


def add_cross_site_evaluation(recipe: Recipe, submit_model_timeout: int = 600, validation_timeout: int = 6000,
                              participating_clients: list[str] | None = None) -> None:
    """After training, every site scores the final and best global models and every site's own
    model (the script answers ``flare.is_submit_model()`` with its local model); the matrix is
    printed and saved as ``server/cross_site_val/cross_val_results.json``."""
    _set_cross_site(recipe, CrossSiteModelEval(submit_model_timeout=submit_model_timeout,
                                               validation_timeout=validation_timeout,
                                               participating_clients=participating_clients))


def add_final_global_evaluation(recipe: Recipe, participating_clients: list[str] | None = None,
                                validation_timeout: int = 6000) -> None:
    """After training, every site scores the final and best global models (no site models)."""
    _set_cross_site(recipe, CrossSiteModelEval(validation_timeout=validation_timeout, submit_model_task_name="",
                                               participating_clients=participating_clients))


def _set_cross_site(recipe: Recipe, evaluation: CrossSiteModelEval) -> None:
    if recipe.job.cross_site_eval is not None:
        raise ConfigError("cross-site evaluation was already added to this recipe")
    recipe.job.to_server(evaluation)


def set_per_site_config(recipe: Recipe, config: dict[str, dict[str, Any]]) -> None:
    """Different runner settings per site: ``{"site-1": {"train_args": "--lr 0.1"}, ...}``."""
    set_per_site(recipe, config)
