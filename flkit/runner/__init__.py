"""Running users' unchanged scripts as FL sites: in this process, or as external processes."""

from __future__ import annotations

from pathlib import Path

from flkit.client.settings import SiteSettings
from flkit.runner.external import ExternalSite
from flkit.runner.in_process import InProcessSite
from flkit.runner.script_runner import ScriptRunner

__all__ = ["ExternalSite", "InProcessSite", "ScriptRunner", "site_for"]


def site_for(settings: SiteSettings, runner: ScriptRunner, script: Path,
             gpu: int | None = None) -> InProcessSite | ExternalSite:
    """The site object that runs ``runner``'s script as ``runner`` asks (not started yet)."""
    if runner.launch_external_process:
        return ExternalSite(settings, script, runner.argv, runner.command, launch_once=runner.launch_once,
                            init_timeout_s=runner.init_timeout_s, gpu=gpu)
    return InProcessSite(settings, script, runner.argv, gpu=gpu)
