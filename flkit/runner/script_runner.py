"""ScriptRunner: how a site runs the user's script (a job-building object, plain data).

The constructors take NVFlare's arguments in NVFlare's order: ``ScriptRunner`` as in NVFlare's
main branch (2.7+), ``BaseScriptRunner`` as in 2.6, and ``SubprocessLauncher`` (2.6) as a way
to give the whole launch command. What a runner keeps, and writes into ``job.json``, is only
what flkit acts on (``to_dict``); NVFlare arguments without a meaning here are named in an
``IgnoredArgumentWarning`` when given.
"""

from __future__ import annotations

import shlex
from enum import Enum
from typing import Any

from flkit.compat import warn_if_set, warn_ignored
from flkit.errors import ConfigError
from flkit.model import ParamsType

# NVFlare's TransferType is the same concept as the Client API's ParamsType: one enum here.
TransferType = ParamsType


class FrameworkType(str, Enum):
    """What the script exchanges: torch tensors (PYTORCH) or numpy arrays (NUMPY)."""

    RAW = "raw"
    NUMPY = "numpy"
    PYTORCH = "pytorch"
    TENSORFLOW = "tensorflow"


class ExchangeFormat(str, Enum):
    """NVFlare's format of params on the server side (flkit's server always holds tensors)."""

    RAW = "raw"
    PYTORCH = "pytorch"
    NUMPY = "numpy"
    KERAS_LAYER_WEIGHTS = "keras_layer_weights"


class PipeConnectType(str, Enum):
    """NVFlare's pipe transport for external scripts (flkit's sites talk gRPC directly)."""

    VIA_ROOT = "via_root"
    VIA_CP = "via_cp"
    VIA_RELAY = "via_relay"


_FIELDS = ("script", "script_args", "launch_external_process", "command", "framework", "params_transfer_type",
           "launch_once", "launch_timeout", "shutdown_timeout", "memory_gc_rounds", "cuda_empty_cache",
           "launch_command_line", "clean_up_script")
SUPPORTED_FRAMEWORKS = (FrameworkType.PYTORCH.value, FrameworkType.NUMPY.value)
_NO_PIPES = "flkit sites talk to the server over gRPC themselves; there is no pipe or relay to configure"

# NVFlare arguments that have no meaning in flkit, with the reason given in the warning.
_IGNORED = {
    "server_expected_format": "flkit's server always holds torch tensors; params travel as safetensors whatever the "
                              "script's framework",
    "pipe_connect_type": _NO_PIPES,
    "task_pipe": _NO_PIPES,
    "metric_pipe": _NO_PIPES,
    "metric_relay": _NO_PIPES + "; logged metrics reach the server with the site's own records",
    "executor": "flkit runs the script itself (in a thread, or as the launch command); NVFlare executor objects "
                "are not used",
}
_IGNORED_DEFAULTS = {"server_expected_format": ExchangeFormat.NUMPY, "pipe_connect_type": None, "task_pipe": None,
                     "metric_pipe": None, "metric_relay": None, "executor": None}


class SubprocessLauncher:
    """NVFlare 2.6's launcher: ``script`` is the whole command line that starts the site's script.

    As in NVFlare it runs in the site's folder, where ``custom/`` holds the job's code, so
    ``SubprocessLauncher(script="python3 -u custom/src/train.py")`` works as written.
    ``clean_up_script`` runs after the process ended; ``shutdown_timeout`` is how long the
    script may take to finish by itself once the job ended, before it is stopped.
    """

    def __init__(self, script: str, launch_once: bool | None = True, clean_up_script: str | None = None,
                 shutdown_timeout: float | None = 0.0) -> None:
        _split("SubprocessLauncher script", script, required=True)
        if clean_up_script is not None:
            _split("SubprocessLauncher clean_up_script", clean_up_script, required=True)
        self.script = script
        self.launch_once = True if launch_once is None else bool(launch_once)
        self.clean_up_script = clean_up_script
        self.shutdown_timeout = 0.0 if shutdown_timeout is None else shutdown_timeout


class BaseScriptRunner:
    """Run ``script`` with ``script_args`` at a site (NVFlare 2.6's BaseScriptRunner arguments and order).

    In-process (the default) runs the script with runpy in its own thread with its own
    ``sys.argv``. With ``launch_external_process=True`` the site starts
    ``command custom/<script> script_args`` in its folder ``<workspace>/<site>`` (which holds
    ``custom/``, the job's code), or the launcher's whole command line; ``{PORT}`` in it is a free
    port, or the site's port from job.py's ``--ports``; a leading ``python``/``python3`` is the
    interpreter running flkit.

    - ``framework``: PYTORCH (the script gets torch tensors) or NUMPY (numpy arrays).
    - ``params_transfer_type``: DIFF makes this site send ``trained - received`` (FULL follows the job).
    - ``launch_once=False``: one launch per task instead of one per job (external only).
    - ``launch_timeout``: an external script that has not called ``flare.init()`` by then fails
      the site (heavy imports are normal, hence the generous default); None: no limit.
    - ``shutdown_timeout``: seconds an external script may take to end by itself after the job ended.
    - ``memory_gc_rounds``: run the garbage collector after every N-th answered task;
      ``cuda_empty_cache``: empty the CUDA cache after each one.
    """

    def __init__(
        self,
        script: str,
        script_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_expected_format: str = ExchangeFormat.NUMPY,
        framework: str = FrameworkType.PYTORCH,
        params_transfer_type: str = TransferType.FULL,
        executor: Any = None,
        task_pipe: Any = None,
        launcher: SubprocessLauncher | None = None,
        metric_relay: Any = None,
        metric_pipe: Any = None,
        pipe_connect_type: str | None = None,
        launch_once: bool = True,
        shutdown_timeout: float = 0.0,
        memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        *,
        launch_timeout: float | None = 300.0,
        execution_mode: str | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        owner = type(self).__name__
        if pipe_connect_type is not None and str(getattr(pipe_connect_type, "value", pipe_connect_type)) == "via_cp":
            pipe_connect_type = None  # NVFlare's default, whichever way it is spelled
        warn_if_set(owner, {"server_expected_format": server_expected_format, "pipe_connect_type": pipe_connect_type,
                            "task_pipe": task_pipe, "metric_pipe": metric_pipe, "metric_relay": metric_relay,
                            "executor": executor}, _IGNORED_DEFAULTS, _IGNORED)
        external = _external(launch_external_process, execution_mode)
        if init_timeout_s is not None:  # flkit's earlier name for launch_timeout
            if launch_timeout not in (300.0, init_timeout_s):
                raise ConfigError(f"launch_timeout={launch_timeout} and init_timeout_s={init_timeout_s} disagree; "
                                  "init_timeout_s is an alias: give one")
            launch_timeout = init_timeout_s
        command_line = clean_up = None
        if launcher is not None:
            if not isinstance(launcher, SubprocessLauncher):
                raise ConfigError(f"{owner}: launcher must be a SubprocessLauncher, got {type(launcher).__name__}")
            if not external:
                warn_ignored(owner, "launcher", "launch_external_process is False, so the script runs in-process "
                                                "and no launcher is used")
            else:
                command_line, clean_up = launcher.script, launcher.clean_up_script
                launch_once, shutdown_timeout = launcher.launch_once, launcher.shutdown_timeout
        self._configure(
            script=script, script_args=script_args, launch_external_process=external, command=command,
            framework=framework, params_transfer_type=params_transfer_type, launch_once=launch_once,
            launch_timeout=launch_timeout, shutdown_timeout=shutdown_timeout, memory_gc_rounds=memory_gc_rounds,
            cuda_empty_cache=cuda_empty_cache, launch_command_line=command_line, clean_up_script=clean_up,
        )

    def _configure(self, script: str, script_args: str = "", launch_external_process: bool = False,
                   command: str = "python3 -u", framework: str = "pytorch", params_transfer_type: str = "FULL",
                   launch_once: bool = True, launch_timeout: float | None = 300.0, shutdown_timeout: float = 0.0,
                   memory_gc_rounds: int = 0, cuda_empty_cache: bool = False, launch_command_line: str | None = None,
                   clean_up_script: str | None = None) -> None:
        """Check and keep what flkit acts on (also the path from job.json)."""
        if not script or not isinstance(script, str):
            raise ConfigError("ScriptRunner needs a script path")
        if isinstance(script_args, (list, tuple)):  # NVFlare main accepts argument lists too
            script_args = shlex.join(str(a) for a in script_args)
        if isinstance(command, (list, tuple)):
            command = shlex.join(str(a) for a in command)
        _split("script_args", script_args)
        framework = str(getattr(framework, "value", framework)).lower()
        if framework in ("pt", "torch"):
            framework = FrameworkType.PYTORCH.value
        if framework not in SUPPORTED_FRAMEWORKS:
            raise ConfigError(f"framework {framework!r} is not supported by flkit (supported: "
                              f"{', '.join(SUPPORTED_FRAMEWORKS)}): scripts exchange torch tensors or numpy arrays")
        try:
            transfer = ParamsType(getattr(params_transfer_type, "value", params_transfer_type)).value
        except ValueError:
            raise ConfigError(f"params_transfer_type must be FULL or DIFF, got {params_transfer_type!r}") from None
        if not launch_once and not launch_external_process:
            raise ConfigError(
                "launch_once=False (one launch per task) needs launch_external_process=True: an in-process "
                "script runs once for the whole job"
            )
        if launch_external_process:
            _split("command", command, required=launch_command_line is None)
        if launch_command_line is not None:
            _split("launcher command line", launch_command_line, required=True)
        if launch_timeout is not None and not (isinstance(launch_timeout, (int, float)) and launch_timeout > 0):
            raise ConfigError(f"launch_timeout must be a positive number of seconds or None, got {launch_timeout!r}")
        if not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout < 0:
            raise ConfigError(f"shutdown_timeout must be >= 0 seconds, got {shutdown_timeout!r}")
        if isinstance(memory_gc_rounds, bool) or not isinstance(memory_gc_rounds, int) or memory_gc_rounds < 0:
            raise ConfigError(f"memory_gc_rounds must be a whole number >= 0, got {memory_gc_rounds!r}")
        self.script = script
        self.script_args = script_args
        self.launch_external_process = bool(launch_external_process)
        self.command = command
        self.framework = framework
        self.params_transfer_type = transfer
        self.launch_once = bool(launch_once)
        self.launch_timeout = None if launch_timeout is None else float(launch_timeout)
        self.shutdown_timeout = float(shutdown_timeout)
        self.memory_gc_rounds = memory_gc_rounds
        self.cuda_empty_cache = bool(cuda_empty_cache)
        self.launch_command_line = launch_command_line
        self.clean_up_script = clean_up_script

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.script_args)

    def site_settings(self) -> dict[str, Any]:
        """The parts of this runner the site's Session applies (SiteSettings fields)."""
        return {
            "params_transfer_type": "DIFF" if self.params_transfer_type == "DIFF" else None,
            "framework": self.framework,
            "memory_gc_rounds": self.memory_gc_rounds,
            "cuda_empty_cache": self.cuda_empty_cache,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "script": self.script, "script_args": self.script_args,
            "launch_external_process": self.launch_external_process, "command": self.command,
            "framework": self.framework, "params_transfer_type": self.params_transfer_type,
            "launch_once": self.launch_once, "launch_timeout": self.launch_timeout,
            "shutdown_timeout": self.shutdown_timeout, "memory_gc_rounds": self.memory_gc_rounds,
            "cuda_empty_cache": self.cuda_empty_cache, "launch_command_line": self.launch_command_line,
            "clean_up_script": self.clean_up_script,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScriptRunner:
        """A runner from job.json (what ``to_dict`` wrote); unknown settings are an error."""
        data = dict(data)
        if "init_timeout_s" in data and "launch_timeout" not in data:  # job folders of flkit 0.1
            data["launch_timeout"] = data.pop("init_timeout_s")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown ScriptRunner setting(s) {', '.join(unknown)}")
        runner = ScriptRunner.__new__(ScriptRunner)
        runner._configure(**data)
        return runner

    def replace(self, **changes: Any) -> ScriptRunner:
        """A copy with some settings changed (e.g. the script's path inside an exported job)."""
        return ScriptRunner.from_dict({**self.to_dict(), **changes})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BaseScriptRunner) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items() if v not in (None, "", False, 0, 0.0))
        return f"{type(self).__name__}({shown})"


class ScriptRunner(BaseScriptRunner):
    """Run ``script`` with ``script_args`` at a site (NVFlare main's ScriptRunner arguments and order).

    The same runner as ``BaseScriptRunner`` (see it for every setting); NVFlare 2.6's
    ``pipe_connect_type`` and ``task_pipe`` are accepted by keyword and have no effect.
    ``execution_mode="in_process"|"external_process"`` is main's other way of saying
    ``launch_external_process``.
    """

    def __init__(
        self,
        script: str,
        script_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        framework: str = FrameworkType.PYTORCH,
        server_expected_format: str = ExchangeFormat.NUMPY,
        params_transfer_type: str = TransferType.FULL,
        launch_once: bool = True,
        launch_timeout: float | None = 300.0,
        shutdown_timeout: float = 0.0,
        memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        execution_mode: str | None = None,
        *,
        pipe_connect_type: str | None = None,
        task_pipe: Any = None,
        init_timeout_s: float | None = None,
    ) -> None:
        super().__init__(
            script, script_args, launch_external_process, command, server_expected_format=server_expected_format,
            framework=framework, params_transfer_type=params_transfer_type, task_pipe=task_pipe,
            pipe_connect_type=pipe_connect_type, launch_once=launch_once, shutdown_timeout=shutdown_timeout,
            memory_gc_rounds=memory_gc_rounds, cuda_empty_cache=cuda_empty_cache, launch_timeout=launch_timeout,
            execution_mode=execution_mode, init_timeout_s=init_timeout_s,
        )


def _external(launch_external_process: bool, execution_mode: str | None) -> bool:
    if execution_mode is None:
        return bool(launch_external_process)
    mode = str(getattr(execution_mode, "value", execution_mode))
    if mode not in ("in_process", "external_process"):
        raise ConfigError(f"execution_mode must be 'in_process' or 'external_process', got {execution_mode!r}")
    if launch_external_process and mode == "in_process":
        raise ConfigError("launch_external_process=True and execution_mode='in_process' contradict each other")
    return mode == "external_process"


def _split(what: str, text: Any, required: bool = False) -> list[str]:
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string, got {type(text).__name__}")
    try:
        parts = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(f"{what} {text!r} cannot be parsed: {exc}") from None
    if required and not parts:
        raise ConfigError(f"{what} is empty")
    return parts
