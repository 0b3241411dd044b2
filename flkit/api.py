"""The Client API: NVFlare-compatible functions over the current site's Session.

"Current" means the Session created by ``init()`` in this site's context: each
in-process site thread has its own, and an external process has one. Under
torch.distributed, rank 0 gets a Session (it talks to the server and shares every task
with the other ranks) and ranks > 0 get a FollowerSession (fed by rank 0).
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import asdict
from typing import Any

from flkit.client import ranks, supervision
from flkit.client.current import AnySession, clear_session, handover, set_session
from flkit.client.current import current_session as current_session  # flkit.api.current_session, re-exported
from flkit.client.current import require_session as require_session
from flkit.client.follower import FollowerSession
from flkit.client.session import Session
from flkit.client.settings import current_settings, in_runner_context
from flkit.errors import ConfigError
from flkit.model import FLModel
from flkit.tracking import write_record

_logger = logging.getLogger("flkit.client")


def _resolve_rank(rank: int | str | None) -> tuple[int, int]:
    """(rank, world size): the process group's if initialised, else torchrun's RANK/WORLD_SIZE."""
    if rank is not None:
        try:
            rank = int(rank)
        except ValueError:
            raise ConfigError(f"flkit.init(rank={rank!r}): rank must be an integer") from None
    if in_runner_context():  # an in-process site thread: one process per site, no DDP
        if rank:
            raise ConfigError(f"flkit.init(rank={rank}): in-process sites have a single rank; launch the script "
                              "as an external process (launch_external_process=True) to use torch.distributed")
        return 0, 1
    group = ranks.process_group_rank()
    actual, world = group if group is not None else ranks.env_rank()
    if rank is not None and rank != actual:
        raise ConfigError(f"flkit.init(rank={rank}) but this process is rank {actual} of {world}")
    return actual, world


def init(rank: int | str | None = None, config_file: str | None = None) -> None:
    """Connect this script to its FL job (settings come from the runner or FLKIT_* variables).

    Call it on every rank of a torch.distributed job: rank 0 joins the job for the site,
    the other ranks get tasks from rank 0. Calling it again is harmless. ``config_file`` is
    accepted for NVFlare compatibility and must be None: flkit takes its settings from the runner.
    """
    # Only in a process flkit's runner launched: from now on, this process ends if its launcher
    # (or its parent, e.g. torchrun's agent) dies. Started here, not at `import flkit`.
    supervision.start_watchdog()
    if config_file is not None:
        raise ConfigError("flkit.init(config_file=...) is not used by flkit; settings come from the job runner")
    if current_session() is not None:
        _logger.info("flkit.init() called again; keeping the existing session")
        return
    rank, world = _resolve_rank(rank)
    settings = current_settings()
    session: AnySession
    if rank > 0:
        session = FollowerSession(settings, rank, world)
    else:
        handed = handover()  # a worker pool runs this site-task with a session it opened
        session = Session(settings, distributed=world > 1, transport=None if handed is None else handed.transport,
                          handed=None if handed is None else handed.reply,
                          first_task=None if handed is None else handed.task)
        if handed is not None:
            handed.sessions.append(session)
    set_session(session)
    if not in_runner_context():
        atexit.register(_close_at_exit, session)
        if rank == 0:
            supervision.note_init()
    if world > 1 and ranks.process_group_rank() is not None:
        # Every rank calls init(), so this is the one place every rank meets early: rank 0
        # joins and the others learn the job settings (system_info() works at once).
        if isinstance(session, Session):
            session.share_config()
        else:
            session.connect()


def _close_at_exit(session: AnySession) -> None:
    # Launched by flkit's runner and leaving mid-task (a crash, sys.exit): stay silent, the
    # runner reports the exit status and stderr; leaving would blame the site less precisely.
    silent = supervision.supervised() and (session.holds_unanswered_task or session.settings.max_tasks > 0)
    session.close(silent=silent)


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


def _joined() -> AnySession:
    """The current session, joined: the job settings come from the server."""
    session = require_session()
    if not session.job_config:
        session.connect()
    return session


def system_info() -> dict[str, Any]:
    """Job id, site name and number of sites in the job."""
    session = _joined()
    return {"job_id": session.settings.job_id, "site_name": session.settings.site_name,
            "num_sites": session.job_config.get("num_sites")}


def get_config() -> dict[str, Any]:
    """The site's settings and the job settings the server shared with it."""
    session = _joined()
    cfg = {k: v for k, v in asdict(session.settings).items() if k != "token"}
    return {**cfg, **session.job_config}


def is_dry_run() -> bool:
    """True when this site runs under a pre-flight check (``flkit check``), which runs one train
    task per site to find problems before a long run: the script may train on one batch
    (``if flare.is_dry_run(): break``). A job setting the server shares with the site, so it answers
    alike in threads, worker processes, Ray workers and external processes (every DDP rank too)."""
    return bool(_joined().job_config.get("dry_run", False))


def log(key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
    """Record a metric for this site (written locally to tracking.jsonl in the site workspace)."""
    write_record(require_session(), key, value, data_type, **kwargs)


def shutdown() -> None:
    """Leave the job now (the server stops waiting for this site)."""
    session = current_session()
    if session is None:
        return
    session.close()
    clear_session(session)
