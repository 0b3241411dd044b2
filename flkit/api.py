"""The Client API: NVFlare-compatible functions over the current site's Session.

"Current" means the Session created by ``init()`` in this site's context: each
in-process site thread has its own, and an external process has one.
"""

from __future__ import annotations

import atexit
import logging
import os
from contextvars import ContextVar
from dataclasses import asdict
from typing import Any

from flkit.client.session import Session
from flkit.client.settings import current_settings, in_runner_context
from flkit.errors import ConfigError, FLKitError
from flkit.model import FLModel

_logger = logging.getLogger("flkit.client")

_session_var: ContextVar[Session | None] = ContextVar("flkit_session", default=None)
# For a standalone process (external launch, `flkit client`): threads the script starts
# do not inherit ContextVars, so they find the process's one session here.
_process_session: Session | None = None


def _dist_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return int(os.environ.get("RANK", "0"))


def init(rank: int | str | None = None, config_file: str | None = None) -> None:
    """Connect this script to its FL job (settings come from the runner or FLKIT_* variables).

    Calling it again is harmless. ``config_file`` is accepted for NVFlare compatibility and
    must be None: flkit takes its settings from the runner.
    """
    global _process_session
    if config_file is not None:
        raise ConfigError("flkit.init(config_file=...) is not used by flkit; settings come from the job runner")
    if current_session() is not None:
        _logger.info("flkit.init() called again; keeping the existing session")
        return
    if int(rank if rank is not None else _dist_rank()) != 0:
        raise ConfigError(
            "flkit.init() on a non-zero torch.distributed rank: DDP support (rank-0 exchange and broadcast) "
            "is not available in this version"
        )
    session = Session(current_settings())
    _session_var.set(session)
    if not in_runner_context():
        _process_session = session
        atexit.register(session.close)


def current_session() -> Session | None:
    """This site's Session, or None before ``init()`` (used by the runner to close it)."""
    return _session_var.get() or (None if in_runner_context() else _process_session)


def require_session() -> Session:
    """This site's Session; a clear error if ``init()`` was not called."""
    session = current_session()
    if session is None:
        raise FLKitError("flkit.init() has not been called in this site")
    return session


def receive(timeout: float | None = None) -> FLModel | None:
    """Wait for the next task (at most ``timeout`` seconds); None when the job has ended or on timeout."""
    return require_session().receive(timeout)


def send(model: FLModel, clear_cache: bool = True) -> None:
    """Send the answer to the current task (trained params and/or metrics)."""
    require_session().send(model, clear_cache)


def is_running() -> bool:
    """True while the job has another task for this site (waits for it to know)."""
    return require_session().is_running()


def get_task_name() -> str:
    return require_session().task_name


def is_train() -> bool:
    return get_task_name() == "train"


def is_evaluate() -> bool:
    return get_task_name() == "validate"


def is_submit_model() -> bool:
    return get_task_name() == "submit_model"


def get_site_name() -> str:
    return require_session().settings.site_name


def get_job_id() -> str:
    return require_session().settings.job_id


def system_info() -> dict[str, Any]:
    """Job id, site name and number of sites in the job."""
    session = require_session()
    if not session.job_config:
        session.connect()  # num_sites comes from the server
    return {"job_id": session.settings.job_id, "site_name": session.settings.site_name,
            "num_sites": session.job_config.get("num_sites")}


def get_config() -> dict[str, Any]:
    """The site's settings and the job settings the server shared with it."""
    session = require_session()
    if not session.job_config:
        session.connect()
    cfg = {k: v for k, v in asdict(session.settings).items() if k != "token"}
    return {**cfg, **session.job_config}


def log(key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
    """Record a metric for this site (written locally to tracking.jsonl in the site workspace)."""
    from flkit.tracking import write_record

    write_record(require_session(), key, value, data_type, **kwargs)


def shutdown() -> None:
    """Leave the job now (the server stops waiting for this site)."""
    global _process_session
    session = current_session()
    if session is None:
        return
    session.close()
    _session_var.set(None)
    if _process_session is session:
        _process_session = None
