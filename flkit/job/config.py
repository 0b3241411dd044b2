"""The job folder format: ``job.json`` + ``initial_model.safetensors`` + ``custom/`` (the code).

No pickled objects: the config is JSON, the model is safetensors, the scripts are files.
Script paths are relative to the folder and are checked never to leave it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flkit.errors import ConfigError
from flkit.runner.script_runner import BaseScriptRunner, ScriptRunner
from flkit.server.config import WorkflowConfig, check_site_name
from flkit.wire.codec import Params

JOB_FILE = "job.json"
MODEL_FILE = "initial_model.safetensors"
FORMAT_VERSION = 1


def default_min_clients(workflow: dict[str, Any], num_sites: int) -> int:
    """Without ``min_clients``: every site offered a round must answer (NVFlare's FedAvg waits for
    all): ``clients_per_round``, or the ``fraction`` of the sites, or all of them."""
    if workflow.get("clients_per_round") is not None:
        return int(workflow["clients_per_round"])
    fraction = workflow.get("fraction")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1:
        return max(1, math.ceil(fraction * num_sites))
    return max(1, num_sites)


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


@dataclass
class JobConfig:
    """A loaded job folder. Script paths in runners are relative to ``root``."""

    name: str
    workflow: dict[str, Any]
    n_clients: int
    root: Path
    sites: dict[str, BaseScriptRunner] = field(default_factory=dict)
    clients: BaseScriptRunner | None = None  # the runner every site-N uses (job.to_clients)
    # The server's strategy: {"name", "args", "file"?} (flkit.strategy.registry.check_spec); None: FedAvg.
    strategy: dict[str, Any] | None = None

    def resolve_sites(self, n_clients: int | None = None,
                      clients: list[str] | None = None) -> dict[str, BaseScriptRunner]:
        """Site name -> runner. ``n_clients`` changes the count of a to_clients() job (sites
        site-1..site-N); ``clients`` names the sites instead (NVFlare's ``clients=``)."""
        if clients is not None:
            if n_clients is not None and n_clients != len(clients):
                raise ConfigError(f"n_clients={n_clients} but {len(clients)} client names were given")
            out = {}
            for name in clients:
                runner = self.sites.get(check_site_name(name)) or self.clients
                if runner is None:
                    raise ConfigError(f"site {name} has no runner in job '{self.name}' "
                                      f"(sites: {', '.join(self.sites)})")
                out[name] = runner
            if not out:
                raise ConfigError("clients=[] names no site")
            return out
        if self.clients is None:
            if n_clients is not None and n_clients != len(self.sites):
                raise ConfigError(
                    f"job '{self.name}' names its sites ({', '.join(self.sites)}); "
                    f"n_clients={n_clients} cannot change them"
                )
            if not self.sites:
                raise ConfigError(f"job '{self.name}' has no sites: use job.to(runner, 'site-1') or to_clients()")
            return dict(self.sites)
        n = self.n_clients if n_clients is None else n_clients
        if n < 1:
            raise ConfigError(f"n_clients must be >= 1, got {n}")
        out = {name: self.clients for name in site_names(n)}
        out.update(self.sites)
        return out

    def workflow_config(self, num_sites: int) -> WorkflowConfig:
        data = dict(self.workflow)
        if data.get("min_clients") is None:
            data["min_clients"] = default_min_clients(data, num_sites)
        return WorkflowConfig.from_dict(data)

    def make_strategy(self, name: str | None = None, args: dict[str, Any] | None = None) -> Any:
        """The job's strategy (flkit.strategy), built from ``job.json``; ``name``/``args`` replace the
        job's choice (``flkit simulate --strategy``; args alone apply to the job's strategy)."""
        from flkit.strategy import registry

        spec = dict(self.strategy or {"name": "fedavg", "args": {}})
        if name is not None:
            spec = {"name": name, "args": {}, **({"file": spec["file"]} if "file" in spec else {})}
        if args is not None:
            spec["args"] = args
        return registry.from_spec(spec, self.root)

    def script_path(self, runner: BaseScriptRunner) -> Path:
        path = (self.root / runner.script).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ConfigError(f"job '{self.name}': script {runner.script!r} is outside the job folder")
        return path

    def initial_params(self) -> Params:
        from flkit.server.persistor import load_params

        path = self.root / MODEL_FILE
        if not path.is_file():
            raise ConfigError(f"job folder {self.root} has no {MODEL_FILE}")
        return load_params(path)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "workflow": self.workflow,
            "n_clients": self.n_clients,
            "clients": None if self.clients is None else self.clients.to_dict(),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "initial_model": MODEL_FILE,
            **({"strategy": self.strategy} if self.strategy is not None else {}),
        }


def load_job(job_dir: Path) -> JobConfig:
    """Read and check a job folder written by ``export_job``."""
    root = Path(job_dir)
    path = root / JOB_FILE
    if not path.is_file():
        raise ConfigError(f"{root} is not a flkit job folder (no {JOB_FILE})")
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: invalid JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        found = data.get("format") if isinstance(data, dict) else None
        raise ConfigError(f"{path}: unsupported job format {found!r} (expected {FORMAT_VERSION})")
    try:
        job = JobConfig(
            name=data["name"],
            workflow=data["workflow"],
            n_clients=int(data["n_clients"]),
            root=root.resolve(),
            sites={check_site_name(k): ScriptRunner.from_dict(v) for k, v in data.get("sites", {}).items()},
            clients=None if data.get("clients") is None else ScriptRunner.from_dict(data["clients"]),
        )
        if data.get("strategy") is not None:
            from flkit.strategy.registry import check_spec

            job.strategy = check_spec(data["strategy"], job.root)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: malformed job config ({exc})") from None
    for name, runner in job.resolve_sites().items():
        if not job.script_path(runner).is_file():
            raise ConfigError(f"{path}: script {runner.script} of {name} is missing from the job folder")
    job.workflow_config(len(job.resolve_sites()))  # validates the workflow settings
    return job
