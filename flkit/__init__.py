"""flkit: turn a PyTorch training script into a federated-learning client.

``import flkit as flare`` gives NVFlare's Client API (init, receive, send,
FLModel, is_running, ...); the job builder lives in ``flkit.job``.
"""

from flkit.api import (
    get_config,
    get_job_id,
    get_site_name,
    get_task_name,
    init,
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
from flkit.client.supervision import start_watchdog as _start_watchdog
from flkit.errors import (
    CommunicationError,
    ConfigError,
    FLKitError,
    JobFailedError,
    ResultRejectedError,
    ValidationError,
)
from flkit.model import FLMetaKey, FLModel, MetaKey, ParamsType

__version__ = "0.1.0"

_start_watchdog()  # only in a process flkit's runner launched: it ends this process if the launcher dies

__all__ = [
    "CommunicationError",
    "ConfigError",
    "FLKitError",
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
