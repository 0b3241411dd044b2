"""Running users' unchanged scripts as FL sites: in this process, or as external processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flkit.client.settings import SiteSettings
from flkit.runner.external import ExternalSite
from flkit.runner.in_process import InProcessSite
from flkit.runner.script_runner import BaseScriptRunner, ScriptRunner

__all__ = ["ExternalSite", "InProcessSite", "ScriptRunner", "site_for"]


def site_for(settings: SiteSettings, runner: BaseScriptRunner, script: Path, job_root: Path | None = None,
             gpu: str | None = None) -> InProcessSite | ExternalSite:
    """The site object that runs ``runner``'s script as ``runner`` asks (not started yet).

    ``gpu``: the CUDA device (or comma-separated devices) the site uses; ``job_root``: the job
    folder whose ``custom/`` code an external site copies into its own folder.
    """
    settings = replace(settings, **runner.site_settings())
    if runner.launch_external_process:
        if settings.transport == "memory":  # another process cannot share the server's memory
            settings = replace(settings, transport="auto")
        return ExternalSite(settings, runner, script, job_root=job_root, gpu=gpu)
    return InProcessSite(settings, script, runner.argv, gpu=gpu)
