"""flkit: turn a PyTorch training script into a federated-learning client.

``import flkit as flare`` gives NVFlare's Client API (init, receive, send,
FLModel, is_running, ...); the job builder lives in ``flkit.job``.

Importing flkit is cheap: the Client API functions (and with them the site Session,
gRPC and torch) load on first use (PEP 562), so ``import flkit.errors`` or the
``flkit`` command's ``--help`` import neither torch nor gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flkit.client.supervision import note_parent as _note_parent
from flkit.errors import (
    CheckFailedError,
    CommunicationError,
    ConfigError,
    FLKitError,
    JobFailedError,
    ResultRejectedError,
    ValidationError,
)
from flkit.model import AlgorithmConstants, FLMetaKey, FLModel, MetaKey, ParamsType

if TYPE_CHECKING:
    from flkit.api import (
        get_config,
        get_job_id,
        get_site_name,
        get_task_name,
        init,
        is_dry_run,
        is_evaluate,
        is_running,
        is_submit_model,
        is_train,
        log,
        receive,
        send,
        shutdown,
        system_info,
    )

__version__ = "0.1.0"

# In a process flkit's runner launched, the orphan watchdog starts at flkit.init(); note the
# parent process now so that it still notices a parent that died before init(). No thread here.
_note_parent()

# Loaded from flkit.api on first access (the module's import brings in the Session, gRPC, torch).
_LAZY_API = frozenset({
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
    "receive",
    "send",
    "shutdown",
    "system_info",
})


def __getattr__(name: str) -> Any:
    if name in _LAZY_API:
        from flkit import api

        value = getattr(api, name)
        globals()[name] = value  # later accesses skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY_API)


__all__ = [
    "CheckFailedError",
    "CommunicationError",
    "ConfigError",
    "FLKitError",
    "AlgorithmConstants",
    "FLMetaKey",
    "FLModel",
    "JobFailedError",
    "MetaKey",
    "ParamsType",
    "ResultRejectedError",
    "ValidationError",
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
    "receive",
    "send",
    "shutdown",
    "system_info",
]
