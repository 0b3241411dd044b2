"""PyTorch Lightning integration: ``import flkit_lightning as flare`` then ``flare.patch(trainer)``.

A Lightning script becomes an FL client with three changes::

    import flkit_lightning as flare
    flare.patch(trainer)
    while flare.is_running():
        trainer.validate(model, datamodule=dm)   # scores the global model (the key metric)
        trainer.fit(model, datamodule=dm)        # trains this round's budget, then sends

The session opens in ``patch()``, which knows the trainer's ranks; the Client API functions
below need it, except ``get_site_name()`` and ``get_job_id()`` (settings the runner gave).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from flkit import api
from flkit.client.settings import current_settings
from flkit.errors import ConfigError, FLKitError
from flkit.model import FLMetaKey, FLModel, MetaKey, ParamsType
from flkit_lightning.callback import FLCallback
from flkit_lightning.trainer_patch import patch

F = TypeVar("F", bound=Callable[..., Any])


def _after_patch(fn: F) -> F:
    """The Client API function ``fn``, with a clear error before patch() opened the session."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if api.current_session() is None:
            raise FLKitError(f"flkit_lightning.{fn.__name__}() before patch(trainer): patch() opens the site's "
                             "session once it knows the trainer's ranks, so call it first")
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


receive = _after_patch(api.receive)
is_running = _after_patch(api.is_running)
is_train = _after_patch(api.is_train)
is_evaluate = _after_patch(api.is_evaluate)
is_submit_model = _after_patch(api.is_submit_model)
get_task_name = _after_patch(api.get_task_name)
system_info = _after_patch(api.system_info)
get_config = _after_patch(api.get_config)
is_dry_run = _after_patch(api.is_dry_run)
log = _after_patch(api.log)
# For NVFlare scripts that send by hand; after patch(), FLCallback answers each task itself.
send = _after_patch(api.send)
shutdown = api.shutdown


def init(rank: int | str | None = None, config_file: str | None = None) -> None:
    """Accepted for NVFlare compatibility; the session opens in ``patch(trainer)``.

    Opening it here would be too early under DDP: before the trainer starts its ranks, a
    process cannot tell whether it is rank 0 (which joins the job) or another rank.
    """
    if config_file is not None:
        raise ConfigError("flkit_lightning.init(config_file=...) is not used; settings come from the job runner")


def get_site_name() -> str:
    """This site's name (known from the runner's settings, before patch())."""
    return current_settings().site_name


def get_job_id() -> str:
    """The job's id (known from the runner's settings, before patch())."""
    return current_settings().job_id


__all__ = [
    "FLCallback",
    "FLMetaKey",
    "FLModel",
    "MetaKey",
    "ParamsType",
    "get_config",
    "get_job_id",
    "get_site_name",
    "get_task_name",
    "init",
    "is_dry_run",
    "is_evaluate",
    "is_running",
    "is_submit_model",
    "is_train",
    "log",
    "patch",
    "receive",
    "send",
    "shutdown",
    "system_info",
]
