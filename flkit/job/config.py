"""The job folder format: ``job.json`` + ``initial_model.safetensors`` + ``custom/`` (the code),
and for an evaluate-only job, optionally the checkpoint it evaluates (``eval_ckpt``).

No pickled objects: the config is JSON, the model is safetensors, the scripts are files.
Every path the folder holds or ``job.json`` names (the sites' scripts, the initial model, the
strategy file, everything under ``custom/``) must resolve, symbolic links followed, to a file
inside the folder; site names are checked (``check_site_name``) before any folder is named after
them. A job folder may come from someone else: a path outside it is a ConfigError naming the
field and the path, never a file read or run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flkit.errors import ConfigError
from flkit.runner.external import CODE_DIR
from flkit.runner.script_runner import BaseScriptRunner, ScriptRunner
from flkit.server.config import EVALUATE, WorkflowConfig, check_site_name
from flkit.wire.codec import Params

JOB_FILE = "job.json"
MODEL_FILE = "initial_model.safetensors"
FORMAT_VERSION = 1
MAX_JOB_NAME_CHARS = 200


def inside(root: Path, relative: object, what: str) -> Path:
    """``root / relative`` with every symbolic link resolved, if that lies inside ``root``; else a
    ConfigError naming ``what`` (the field of job.json) and the path."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        raise ConfigError(f"{what} must be a path inside the job folder {root}, got {relative!r:.100}")
    base = root.resolve()
    try:
        path = (base / relative).resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links, a name too long
        raise ConfigError(f"{what} {relative!r:.100} cannot be resolved: {exc}") from None
    if not path.is_relative_to(base):
        raise ConfigError(f"{what} {relative!r:.100} is outside the job folder {base} (it resolves to {path})")
    return path


def _check_code(root: Path) -> None:
    """Every entry of the job's ``custom/`` (which is copied to each site and run there) lies inside
    the job folder, symbolic links followed."""
    code = root / CODE_DIR
    if not code.is_symlink() and not code.exists():
        return
    inside(root, CODE_DIR, CODE_DIR)
    for folder, dirs, files in os.walk(code):  # links are not followed, but each one is checked
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink():
                inside(root, str(path.relative_to(root)), f"{CODE_DIR}/ entry")


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
    # The initial model's file, relative to ``root`` (job.json's "initial_model").
    initial_model: str = MODEL_FILE
    # An evaluate-only job's saved model, relative to ``root`` (job.json's "eval_ckpt"): a
    # .safetensors file or a tensors-only torch checkpoint with the initial model's keys and
    # shapes. None: the initial model is the one evaluated.
    eval_ckpt: str | None = None
    # Where eval_ckpt was copied from when the job was built (job.json's "eval_ckpt_source"):
    # reported in evaluation.json, never opened.
    eval_ckpt_source: str | None = None

    def __post_init__(self) -> None:
        for name in self.sites:  # folders <workspace>/<site> are named after them
            check_site_name(name)

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

    def script_path(self, runner: BaseScriptRunner, what: str = "script") -> Path:
        """The runner's script (symbolic links resolved), which must lie inside the job folder."""
        return inside(self.root, runner.script, f"job '{self.name}': {what}")

    @property
    def mode(self) -> str:
        return str(self.workflow.get("mode") or "train")

    def _initial_model_path(self) -> Path:
        path = inside(self.root, self.initial_model, f"job '{self.name}': initial_model")
        if not path.is_file():
            raise ConfigError(f"job folder {self.root} has no {self.initial_model}")
        return path

    def initial_params(self) -> Params:
        from flkit.server.persistor import load_params

        return load_params(self._initial_model_path())

    def server_model(self) -> tuple[Params, dict[str, str] | None]:
        """The model the server starts from, and for an evaluate-only job where it came from
        (``{"path", "sha256"}`` of the file read: ``eval_ckpt``, else the initial model), the
        digest being of the very bytes the tensors were read from. ``eval_ckpt`` must have the
        initial model's keys and shapes (a ConfigError names those that differ)."""
        if self.mode != EVALUATE:
            return self.initial_params(), None
        from flkit.job.checkpoint import check_fits, read_model_file

        initial_path = self._initial_model_path()
        what = f"job '{self.name}': initial_model"
        if self.eval_ckpt is None:
            params, digest = read_model_file(initial_path, what)
            return params, {"path": str(initial_path), "sha256": digest}
        path = inside(self.root, self.eval_ckpt, f"job '{self.name}': eval_ckpt")
        params, digest = read_model_file(path, f"job '{self.name}': eval_ckpt")
        check_fits(f"job '{self.name}': eval_ckpt {self.eval_ckpt}", params, self.initial_params())
        source = {"path": str(path), "sha256": digest}
        if self.eval_ckpt_source is not None:
            source["copied_from"] = self.eval_ckpt_source
        return params, source

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "name": self.name,
            "workflow": self.workflow,
            "n_clients": self.n_clients,
            "clients": None if self.clients is None else self.clients.to_dict(),
            "sites": {k: v.to_dict() for k, v in self.sites.items()},
            "initial_model": self.initial_model,
            **({"eval_ckpt": self.eval_ckpt} if self.eval_ckpt is not None else {}),
            **({"eval_ckpt_source": self.eval_ckpt_source} if self.eval_ckpt_source is not None else {}),
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
        name = data["name"]
        if (not isinstance(name, str) or not 0 < len(name) <= MAX_JOB_NAME_CHARS or not name.isprintable()
                or "/" in name or "\\" in name or name in (".", "..")):
            raise ConfigError(f"{path}: job name {name!r:.100} must be a folder name of 1-{MAX_JOB_NAME_CHARS} "
                              "printable characters")
        if not isinstance(data.get("sites", {}), dict):
            raise ConfigError(f"{path}: 'sites' must map site names to runners")
        job = JobConfig(
            name=name,
            workflow=data["workflow"],
            n_clients=int(data["n_clients"]),
            root=root.resolve(),
            sites={check_site_name(k): ScriptRunner.from_dict(v) for k, v in data.get("sites", {}).items()},
            clients=None if data.get("clients") is None else ScriptRunner.from_dict(data["clients"]),
            initial_model=data.get("initial_model", MODEL_FILE),
            eval_ckpt=data.get("eval_ckpt"),
            eval_ckpt_source=data.get("eval_ckpt_source"),
        )
        if job.eval_ckpt_source is not None and (not isinstance(job.eval_ckpt_source, str)
                                                 or len(job.eval_ckpt_source) > 4096):
            raise ConfigError(f"{path}: eval_ckpt_source must be a path (text), got {job.eval_ckpt_source!r:.100}")
        if data.get("strategy") is not None:
            from flkit.strategy.registry import check_spec

            job.strategy = check_spec(data["strategy"], job.root)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{path}: malformed job config ({str(exc)[:200]})") from None
    # Every path the job names, whether or not this run uses it, lies inside the folder.
    runners = [(f"sites.{site}.script", runner) for site, runner in job.sites.items()]
    if job.clients is not None:
        runners.append(("clients.script", job.clients))
    for what, runner in runners:
        if not job.script_path(runner, what).is_file():
            raise ConfigError(f"{path}: {what} {runner.script!r} is missing from the job folder")
    inside(job.root, job.initial_model, f"{path}: initial_model")
    if job.eval_ckpt is not None:
        if job.mode != EVALUATE:
            raise ConfigError(f"{path}: eval_ckpt names the model an evaluate-only job scores; it needs "
                              f"\"workflow\": {{\"mode\": \"{EVALUATE}\"}} (this job's mode is {job.mode!r:.40})")
        if not inside(job.root, job.eval_ckpt, f"{path}: eval_ckpt").is_file():
            raise ConfigError(f"{path}: eval_ckpt {job.eval_ckpt!r:.100} is missing from the job folder")
    _check_code(job.root)
    job.workflow_config(len(job.resolve_sites()))  # validates the workflow settings
    return job
