"""ScriptRunner: how a site runs the user's script (a job-building object, plain data)."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from typing import Any

from flkit.errors import ConfigError

FRAMEWORKS = ("pytorch",)


@dataclass
class ScriptRunner:
    """Run ``script`` with ``script_args`` at a site (NVFlare's ScriptRunner arguments).

    In-process (the default) runs the script with runpy in its own thread with its
    own ``sys.argv``. External-process launch (``launch_external_process=True``,
    ``command``, e.g. ``python3 -m torch.distributed.run ...``) and one launch per task
    (``launch_once=False``) are accepted here so jobs can be written now, but this
    version refuses to build them rather than ignore them.
    """

    script: str
    script_args: str = ""
    launch_external_process: bool = False
    command: str = "python3 -u"
    framework: str = "pytorch"
    launch_once: bool = True

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
        if self.launch_external_process:
            raise ConfigError(
                "launch_external_process=True is not supported yet in this flkit version "
                "(external processes and torch.distributed.run come with the next release); "
                "run the script in-process"
            )
        if not self.launch_once:
            raise ConfigError("launch_once=False is not supported yet in this flkit version")

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.script_args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptRunner:
        return cls(**data)
