"""Where a site's script finds its job: the runner's context, or environment variables.

The in-process runner runs several sites in one process, so it cannot use
``os.environ``; it puts each site's settings in a ContextVar for that site's
thread. An external process (or ``flkit client``) passes the same keys as
environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, fields
from typing import Any

from flkit.errors import ConfigError

ENV_PREFIX = "FLKIT_"


@dataclass(frozen=True)
class SiteSettings:
    """Everything a site needs to reach its job's server."""

    server: str
    site_name: str
    job_id: str
    # The job's shared secret over plain gRPC; empty with a startup kit (``kit``).
    token: str
    workspace: str = "."
    # This site's startup kit folder (``flkit provision``): mutual TLS, and the site is who its
    # certificate says. None: plain gRPC with ``token`` (the simulator, --insecure).
    kit: str | None = None
    # How long to keep trying to (re)connect before a call gives up with a clear error.
    connect_timeout_s: float = 60.0
    # Default wait of receive()/is_running() for the next task; None waits until the job ends.
    receive_timeout_s: float | None = None
    # Upper bound for one upload or download of a model.
    transfer_timeout_s: float = 600.0
    # Tasks this process answers before is_running() says False; 0 means no limit. The
    # external-process runner sets 1 for launch_once=False (one launch per task).
    max_tasks: int = 0
    # Where this process notes the id of each task the server accepted its answer to (set by the
    # launcher of launch_once=False, which so tells a launch that answered from one that did not).
    answered_file: str | None = None
    # Under torch.distributed: while rank 0 waits for a task (a site not sampled for many rounds),
    # it tells the other ranks at least this often (and at a third of the process group's timeout),
    # so their wait in the collective never reaches that timeout.
    rank_keepalive_s: float = 60.0
    # The site's own ScriptRunner settings (NVFlare's names):
    # FULL or DIFF for this site's results; None follows the job's params_transfer_type.
    params_transfer_type: str | None = None
    # "pytorch": the script receives torch tensors; "numpy": numpy arrays.
    framework: str = "pytorch"
    # Run the garbage collector after every N-th answered task (0: never).
    memory_gc_rounds: int = 0
    # Empty the CUDA cache after each answered task (when CUDA is in use).
    cuda_empty_cache: bool = False
    # How params reach the server: "auto" (memory when the server is in this process, shared
    # memory when it is on this host, else gRPC), "memory", "shm" or "grpc" (flkit.transport.factory).
    transport: str = "auto"

    def to_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[ENV_PREFIX + f.name.upper()] = str(value)
        return out

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SiteSettings:
        required = ("server", "site_name", "job_id") + (() if env.get(ENV_PREFIX + "KIT") else ("token",))
        missing = [ENV_PREFIX + k.upper() for k in required if not env.get(ENV_PREFIX + k.upper())]
        if missing:
            raise ConfigError(
                f"flkit.init(): this script is not running inside an FL job ({', '.join(missing)} not set). "
                "Start it through a job (e.g. `python job.py ...`, `flkit simulate JOB_DIR`) or `flkit client`."
            )
        # Any: each value is converted to its own field's type below, which mypy cannot follow
        # through ``fields()``; the dataclass's constructor takes them by name.
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            if f.name.endswith("_s"):
                try:
                    values[f.name] = None if raw.lower() in ("", "none") else float(raw)
                except ValueError:
                    raise ConfigError(f"{ENV_PREFIX + f.name.upper()}={raw!r} is not a number of seconds") from None
            elif isinstance(f.default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ConfigError(f"{ENV_PREFIX + f.name.upper()}={raw!r} is not true or false")
                values[f.name] = raw.lower() in ("1", "true", "yes")
            elif isinstance(f.default, int):
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(f"{ENV_PREFIX + f.name.upper()}={raw!r} is not a whole number") from None
            else:
                values[f.name] = raw
        return cls(**values)


_runner_settings: ContextVar[SiteSettings | None] = ContextVar("flkit_site_settings", default=None)


def set_context_settings(settings: SiteSettings | None) -> None:
    """Used by the in-process runner inside a site's own context."""
    _runner_settings.set(settings)


def current_settings() -> SiteSettings:
    """The settings of the site this code runs for (runner context first, then the environment)."""
    settings = _runner_settings.get()
    return settings if settings is not None else SiteSettings.from_env(os.environ)


def in_runner_context() -> bool:
    return _runner_settings.get() is not None
