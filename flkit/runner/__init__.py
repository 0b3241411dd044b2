"""Running users' unchanged scripts as FL sites."""

from flkit.runner.script_runner import ScriptRunner

__all__ = ["ScriptRunner"]
