"""ScriptRunner: how a site runs the user's script (a job-building object, plain data)."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, fields
from typing import Any

from flkit.errors import ConfigError

FRAMEWORKS = ("pytorch",)


@dataclass
class ScriptRunner:
    """Run ``script`` with ``script_args`` at a site (NVFlare's ScriptRunner arguments).

    In-process (the default) runs the script with runpy in its own thread with its
    own ``sys.argv``. With ``launch_external_process=True`` the site starts
    ``command + script + script_args`` as a process of its own, e.g. with
    ``command="python3 -m torch.distributed.run --nproc_per_node=2 --master_port={PORT}"``
    (``{PORT}``: a free port, or the site's port from job.py's ``--ports``); a leading
    ``python``/``python3`` is the interpreter running flkit. ``launch_once=False`` launches the
    script once per task instead of once per job (external processes only).
    ``init_timeout_s``: an external script that has not called ``flkit.init()`` by then fails
    the site (heavy imports are normal, hence the generous default).
    """

    script: str
    script_args: str = ""
    launch_external_process: bool = False
    command: str = "python3 -u"
    framework: str = "pytorch"
    launch_once: bool = True
    init_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.script:
            raise ConfigError("ScriptRunner needs a script path")
        try:
            shlex.split(self.script_args)
        except ValueError as exc:
            raise ConfigError(f"script_args {self.script_args!r} cannot be parsed: {exc}") from None
        framework = str(getattr(self.framework, "value", self.framework)).lower()
        if framework in ("pt", "torch"):
            framework = "pytorch"
        if framework not in FRAMEWORKS:
            raise ConfigError(f"framework {self.framework!r} is not supported (supported: {', '.join(FRAMEWORKS)})")
        self.framework = framework
        if not self.launch_once and not self.launch_external_process:
            raise ConfigError(
                "launch_once=False (one launch per task) needs launch_external_process=True: an in-process "
                "script runs once for the whole job"
            )
        if self.launch_external_process:
            try:
                if not shlex.split(self.command):
                    raise ConfigError("launch_external_process=True needs a command, e.g. 'python3 -u'")
            except ValueError as exc:
                raise ConfigError(f"command {self.command!r} cannot be parsed: {exc}") from None
        if not self.init_timeout_s > 0:
            raise ConfigError(f"init_timeout_s must be a positive number of seconds, got {self.init_timeout_s!r}")

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.script_args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptRunner:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown ScriptRunner setting(s) {', '.join(unknown)}")
        return cls(**data)
