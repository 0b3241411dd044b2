"""Job builder with NVFlare's names: FedAvgJob(...).to(runner, site), export_job, simulator_run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from flkit.errors import ConfigError
from flkit.job.config import JOB_FILE, MODEL_FILE, JobConfig
from flkit.runner.script_runner import ScriptRunner
from flkit.server.config import WorkflowConfig
from flkit.server.persistor import save_params
from flkit.wire.codec import to_cpu_params

# Files copied with a script: the code and small configs next to it, never data.
_COPY_SUFFIXES = {".py", ".json", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".sh"}
_SKIP_DIRS = {"__pycache__", "data", "workspace", "lightning_logs", "wandb", "mlruns"}


class FedJob:
    """A federated job: a workflow, an initial model, and the runner of each site."""

    def __init__(self, name: str, initial_model: torch.nn.Module | dict[str, Any], n_clients: int,
                 workflow: dict[str, Any]) -> None:
        if not name or "/" in name:
            raise ConfigError(f"job name must be a non-empty folder name, got {name!r}")
        if n_clients < 1:
            raise ConfigError(f"n_clients must be >= 1, got {n_clients}")
        if isinstance(initial_model, torch.nn.Module):
            params = initial_model.state_dict()
        elif isinstance(initial_model, dict):
            params = initial_model
        else:
            raise ConfigError(
                f"initial_model must be a torch.nn.Module or a state_dict, got {type(initial_model).__name__}"
            )
        self.name = name
        self.n_clients = n_clients
        self.initial_params = to_cpu_params(params)
        # Check the settings now, not when the job runs.
        WorkflowConfig.from_dict({**workflow, "min_clients": workflow.get("min_clients") or 1})
        self.workflow = workflow
        self._sites: dict[str, ScriptRunner] = {}
        self._clients: ScriptRunner | None = None

    def to(self, obj: ScriptRunner, target: str) -> None:
        """Run ``obj`` at site ``target`` (e.g. "site-1")."""
        if not isinstance(obj, ScriptRunner):
            raise ConfigError(f"job.to() takes a ScriptRunner, got {type(obj).__name__}")
        if target == "server":
            raise ConfigError("the server side of a FedAvgJob is built in; send only ScriptRunners to sites")
        _check_script(obj)
        self._sites[target] = obj

    def to_clients(self, obj: ScriptRunner) -> None:
        """Run ``obj`` at every site (site-1 .. site-N)."""
        if not isinstance(obj, ScriptRunner):
            raise ConfigError(f"job.to_clients() takes a ScriptRunner, got {type(obj).__name__}")
        _check_script(obj)
        self._clients = obj

    def export_job(self, job_root: str | Path) -> Path:
        """Write ``<job_root>/<name>/`` (job.json, initial model, scripts) and return its path."""
        out = Path(job_root) / self.name
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        copied: dict[Path, str] = {}

        def place(runner: ScriptRunner) -> ScriptRunner:
            script = Path(runner.script).resolve()
            src_dir = script.parent
            if src_dir not in copied:
                dest_name = src_dir.name or "scripts"
                while dest_name in copied.values():
                    dest_name += "_"
                _copy_code(src_dir, out / "custom" / dest_name)
                copied[src_dir] = dest_name
            data = runner.to_dict()
            data["script"] = f"custom/{copied[src_dir]}/{script.name}"
            return ScriptRunner.from_dict(data)

        job = JobConfig(
            name=self.name,
            workflow=self.workflow,
            n_clients=self.n_clients,
            root=out,
            sites={site: place(r) for site, r in self._sites.items()},
            clients=None if self._clients is None else place(self._clients),
        )
        job.resolve_sites()  # a job with no runner at all fails here, at export time
        save_params(out / MODEL_FILE, self.initial_params, {"job": self.name})
        (out / JOB_FILE).write_text(json.dumps(job.to_json(), indent=2) + "\n")
        return out

    def simulator_run(self, workspace: str | Path, n_clients: int | None = None, threads: int | None = None,
                      gpu: str | None = None, quiet: bool = False):
        """Export to ``<workspace>/job`` and run it with the local simulator.

        Returns a SimulationResult; raises JobFailedError (after printing the summary) if the job failed.
        """
        from flkit.errors import JobFailedError
        from flkit.sim.simulator import simulate

        workspace = Path(workspace)
        job_dir = self.export_job(workspace / "job")
        result = simulate(job_dir, workspace, n_clients=n_clients, threads=threads, gpu=gpu, quiet=quiet)
        if not result.ok:
            raise JobFailedError(f"job {self.name} failed: {result.reason}")
        return result


class FedAvgJob(FedJob):
    """FedAvg over ``n_clients`` sites for ``num_rounds`` rounds, keeping the best model by ``key_metric``.

    ``min_clients`` defaults to every site. ``params_transfer_type="DIFF"`` makes sites
    send ``trained - received``. ``final_validation`` scores the last global model too.
    """

    def __init__(
        self,
        name: str = "fed_job",
        initial_model: torch.nn.Module | dict[str, Any] | None = None,
        n_clients: int = 2,
        num_rounds: int = 1,
        key_metric: str = "accuracy",
        negate_key_metric: bool = False,
        min_clients: int | None = None,
        params_transfer_type: str = "FULL",
        final_validation: bool = True,
        **workflow_options: Any,
    ) -> None:
        if initial_model is None:
            raise ConfigError("FedAvgJob needs initial_model (an nn.Module or a state_dict)")
        if min_clients is not None and min_clients > n_clients:
            raise ConfigError(f"min_clients={min_clients} is more than n_clients={n_clients}")
        workflow = {
            "num_rounds": num_rounds,
            "min_clients": min_clients,
            "key_metric": key_metric,
            "negate_key_metric": negate_key_metric,
            "params_transfer_type": getattr(params_transfer_type, "value", params_transfer_type),
            "final_validation": final_validation,
            **workflow_options,
        }
        super().__init__(name, initial_model, n_clients, workflow)


def _check_script(runner: ScriptRunner) -> None:
    if not Path(runner.script).is_file():
        raise ConfigError(f"script {runner.script} not found (relative paths are from {Path.cwd()})")


def _copy_code(src: Path, dest: Path) -> None:
    dest = dest.resolve()
    files = [p for p in src.rglob("*") if p.is_file() and p.suffix in _COPY_SUFFIXES]
    for path in files:
        rel = path.relative_to(src)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        if path.resolve().is_relative_to(dest):
            continue  # the export folder itself may sit inside the script's folder
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
