"""Job builder with NVFlare's names: FedJob, BaseFedJob, FedAvgJob; to(), export_job, simulator_run.

A job is the server's workflow (rounds, model selection, tracking, cross-site evaluation; or
an evaluate-only run), an initial model and the runner of each site. ``to(obj, target)`` takes
NVFlare's objects: runners for sites; a FedAvg or an EvalController controller, a model, a
selector, receivers or a cross-site evaluation for the server. ``export_job`` writes plain
JSON, safetensors and the scripts (with the local modules they import) into a folder that
``flkit simulate`` and ``flkit server``/``flkit client`` run.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from flkit.compat import warn_if_set, warn_ignored
from flkit.errors import ConfigError
from flkit.job.checkpoint import check_fits
from flkit.job.code import CODE_DIR, copy_script, script_destination
from flkit.job.components import (
    KEEPS_MODELS,
    RECEIVERS,
    CrossSiteModelEval,
    EvalController,
    FedAvg,
    IntimeModelSelector,
    PTModel,
    ValidationJsonGenerator,
    model_params,
)
from flkit.job.config import JOB_FILE, MODEL_FILE, JobConfig, default_min_clients
from flkit.runner.script_runner import BaseScriptRunner
from flkit.server.config import WorkflowConfig, check_site_name
from flkit.server.persistor import save_params
from flkit.wire.codec import Params

ALL_SITES = "@ALL"
SERVER = "server"
# Where an evaluate-only job's checkpoint goes in the job folder (not custom/: sites get custom/).
EVAL_CKPT_DIR = "eval_ckpt"
# Settings of flkit's workflow a job may set directly (the rest come from components; the mode
# from the controller: FedAvg trains, EvalController evaluates).
_OPTIONS = {f.name for f in fields(WorkflowConfig)} - {"num_rounds", "min_clients", "key_metric", "mode",
                                                       "negate_key_metric", "tracking", "cross_site_eval"}


def key_metric_direction(key_metric_mode: str | None, negate_key_metric: bool | None) -> bool:
    """True when lower is better. ``key_metric_mode`` ("max"/"min") is the name; ``negate_key_metric``
    is kept as an alias and must agree when both are given."""
    negate = None
    if key_metric_mode is not None:
        mode = str(getattr(key_metric_mode, "value", key_metric_mode)).lower()
        if mode not in ("max", "min"):
            raise ConfigError(f"key_metric_mode must be 'max' or 'min', got {key_metric_mode!r}")
        negate = mode == "min"
    if negate_key_metric is not None:
        if negate is not None and negate != bool(negate_key_metric):
            raise ConfigError(f"key_metric_mode={key_metric_mode!r} and negate_key_metric={negate_key_metric} "
                              "disagree (negate_key_metric is an alias: give one)")
        negate = bool(negate_key_metric)
    return bool(negate)


class FedJob:
    """A federated job (NVFlare's FedJob): put components on the server and runners on sites with ``to``.

    ``min_clients``: the fewest sites the job needs (the controller decides how many answer
    each round); ``mandatory_clients``: sites the job cannot run without. ``fail_fast=True``
    fails the job as soon as any site fails. ``strategy``: the server's strategy (flkit.strategy),
    a registered name with ``strategy_args`` (JSON values) or an instance of a registered class;
    a custom one's file (``strategy_file``, or the file that defines its class) is exported with
    the job. Further keywords set flkit's workflow directly (``params_transfer_type``,
    ``final_validation``, ``clients_per_round`` or ``fraction`` (the sites offered each round,
    a sample seeded by ``seed``), ``join_timeout_s``, ``round_timeout_s``, ``heartbeat_interval_s``,
    ``heartbeat_timeout_s``).
    """

    def __init__(self, name: str = "fed_job", min_clients: int = 1, mandatory_clients: list[str] | None = None,
                 *, meta_props: dict[str, Any] | None = None, fail_fast: bool = False,
                 strategy: Any = None, strategy_args: dict[str, Any] | None = None,
                 strategy_file: str | Path | None = None, **workflow_options: Any) -> None:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ConfigError(f"job name must be a non-empty folder name, got {name!r}")
        if not isinstance(min_clients, int) or min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {min_clients!r}")
        if meta_props:
            warn_ignored(type(self).__name__, "meta_props", "flkit jobs have no meta.json; job.json holds the job")
        unknown = sorted(set(workflow_options) - _OPTIONS)
        if unknown:
            raise ConfigError(f"{type(self).__name__} got unknown argument(s) {unknown}; flkit workflow settings "
                              f"are {sorted(_OPTIONS)}")
        self.name = name
        self.min_clients = min_clients
        self.fail_fast = bool(fail_fast)
        self.options: dict[str, Any] = dict(workflow_options)
        self.options["mandatory_clients"] = [check_site_name(s) for s in mandatory_clients or []]
        self.initial_params: Params | None = None
        # PTModel's initial_ckpt and the model's own tensors (keys, shapes): an EvalController's job
        # ships the checkpoint and evaluates exactly it.
        self.initial_ckpt: Path | None = None
        self._structure: Params | None = None
        self.controller: FedAvg | EvalController | None = None
        self.rounds: dict[str, Any] | None = None  # num_rounds/min_clients set by FedAvgJob or a controller
        self.selector: IntimeModelSelector | None = None
        self.tracking: dict[str, dict[str, Any]] = {}  # type -> receiver config
        self.cross_site_eval: dict[str, Any] | None = None
        self._sites: dict[str, BaseScriptRunner] = {}
        self._clients: BaseScriptRunner | None = None
        self._resources: list[Path] = []  # files and folders copied into custom/ (every site gets custom/)
        # The strategy job.json names ({"name", "args"}; None: FedAvg) and the file defining it, if custom.
        self.strategy, self._strategy_source = _strategy_spec(strategy, strategy_args, strategy_file)

    # -- placing components ---------------------------------------------------

    def to(self, obj: Any, target: str, id: str | None = None, **kwargs: Any) -> Any:  # noqa: A002 - NVFlare's name
        """Put ``obj`` on ``target``: "server", a site name, or "@ALL" (every site).

        Sites take a ScriptRunner (or a file/folder path to ship with the code); the server
        takes a FedAvg controller, the initial model (nn.Module, state_dict or PTModel), an
        IntimeModelSelector, a TensorBoard/MLflow/W&B receiver, or a CrossSiteModelEval.
        Returns ``id`` (or the component's kind) as NVFlare returns a component id.
        """
        if target == SERVER:
            return self._to_server(obj, id, kwargs)
        if target != ALL_SITES:
            check_site_name(target)
        if isinstance(obj, (str, Path)):
            path = Path(obj)
            if not path.exists():
                raise ConfigError(f"job.to({str(obj)!r}, {target!r}): no such file or folder")
            self._resources.append(path.resolve())
            return None
        if not isinstance(obj, BaseScriptRunner):
            raise ConfigError(f"job.to(..., {target!r}) takes a ScriptRunner (or a file path) for a site, got "
                              f"{type(obj).__name__}; server components go to 'server'")
        tasks = kwargs.pop("tasks", None)
        if kwargs:
            raise ConfigError(f"job.to(ScriptRunner, ...) got unknown argument(s) {sorted(kwargs)}")
        if tasks not in (None, ["*"], ("*",)):
            warn_ignored("FedJob.to", "tasks", "a site's script answers every task it is given (train, validate, "
                                               "submit_model)")
        _check_script(obj)
        if target == ALL_SITES:
            self._clients = obj
        else:
            self._sites[target] = obj
        return {}

    def to_server(self, obj: Any, id: str | None = None, **kwargs: Any) -> Any:  # noqa: A002
        return self.to(obj, SERVER, id, **kwargs)

    def to_clients(self, obj: Any, id: str | None = None, **kwargs: Any) -> Any:  # noqa: A002
        """Run ``obj`` at every site (site-1..site-N, or the names the simulator is given)."""
        return self.to(obj, ALL_SITES, id, **kwargs)

    def as_id(self, obj: Any) -> str:
        """NVFlare's component reference; flkit components are referenced by what they are."""
        return type(obj).__name__

    def _to_server(self, obj: Any, id: str | None, kwargs: dict[str, Any]) -> Any:  # noqa: A002
        if kwargs:
            raise ConfigError(f"job.to(..., 'server') got unknown argument(s) {sorted(kwargs)}")
        if isinstance(obj, (str, Path)):
            warn_ignored("FedJob.to", f"the file {str(obj)!r} for the server", "flkit's server runs no job code "
                                                                               "or files; only sites get custom/")
            return None
        if isinstance(obj, (FedAvg, EvalController)):
            if isinstance(obj, FedAvg) and obj.strategy is not None:  # FedAvg(fedprox_mu=...), Scaffold(...)
                if self.strategy is not None and self.strategy != obj.strategy:
                    raise ConfigError(f"job '{self.name}' has strategy {self.strategy['name']!r}, but its "
                                      f"{type(obj).__name__} controller runs {obj.strategy['name']!r}: give one")
                self.strategy, self._strategy_source = dict(obj.strategy), None
            self._set_controller(obj)
            if isinstance(obj, FedAvg) and obj.initial_params is not None:
                self._set_model(obj.initial_params)
            kind = "controller"
        elif isinstance(obj, (torch.nn.Module, dict)):
            self._set_model(model_params(obj))
            kind = "persistor"
        elif isinstance(obj, PTModel):
            self._set_model(obj.params, obj.initial_ckpt, obj.structure)
            return {"persistor_id": "persistor", "locator_id": "locator"}
        elif isinstance(obj, IntimeModelSelector):
            self.selector = obj
            kind = "model_selector"
        elif isinstance(obj, tuple(RECEIVERS.values())):
            self.tracking[obj.tracking_type] = obj.config
            kind = "receiver"
        elif isinstance(obj, CrossSiteModelEval):
            self.cross_site_eval = obj.config
            kind = "controller"
        elif isinstance(obj, ValidationJsonGenerator):
            kind = "json_generator"
        elif isinstance(obj, BaseScriptRunner):
            raise ConfigError("a ScriptRunner runs at a site, not on the server: job.to(runner, 'site-1')")
        else:
            raise ConfigError(
                f"job.to({type(obj).__name__}(...), 'server'): flkit's server takes a FedAvg controller, the initial "
                "model (nn.Module, state_dict, PTModel), IntimeModelSelector, TBAnalyticsReceiver, MLflowReceiver, "
                "WandBReceiver, CrossSiteModelEval or ValidationJsonGenerator"
            )
        return id or kind

    def _set_controller(self, controller: FedAvg | EvalController) -> None:
        """One workflow per job: training (FedAvg) or an evaluate-only run (EvalController)."""
        training = self.rounds is not None or isinstance(self.controller, FedAvg)
        if (isinstance(controller, EvalController) and training) or \
                (isinstance(controller, FedAvg) and isinstance(self.controller, EvalController)):
            raise ConfigError(f"job '{self.name}' has one workflow on the server: FedAvg (training) or "
                              "EvalController (evaluate-only), not both")
        self.controller = controller

    def _set_model(self, params: Params, ckpt: Path | None = None, structure: Params | None = None) -> None:
        self.initial_params, self.initial_ckpt, self._structure = params, ckpt, structure

    # -- what the job is --------------------------------------------------------

    def workflow(self, num_sites: int | None = None) -> dict[str, Any]:
        """The workflow settings job.json gets (checked now, not when the job runs)."""
        if self.rounds is not None:
            data = dict(self.rounds)
        elif self.controller is not None:
            data = self.controller.workflow()
        else:
            raise ConfigError(f"job '{self.name}' has no workflow on the server: job.to(FedAvg(num_clients=..., "
                              "num_rounds=...), 'server'), or use FedAvgJob; or EvalController() for an "
                              "evaluate-only job")
        if isinstance(self.controller, EvalController):
            data["min_clients"] = self.min_clients  # the sites needed to start (NVFlare's FedEvalRecipe)
        if self.fail_fast:
            data["min_clients"] = None  # every site must answer
        data["key_metric"] = None if self.selector is None else self.selector.key_metric
        data["negate_key_metric"] = False if self.selector is None else self.selector.negate_key_metric
        data["tracking"] = [{"type": kind, "config": config} for kind, config in self.tracking.items()]
        data["cross_site_eval"] = self.cross_site_eval
        data.update(self.options)
        check = dict(data)
        if check.get("min_clients") is None:
            check["min_clients"] = default_min_clients(check, num_sites or 1)
        WorkflowConfig.from_dict(check)
        return data

    def export_job(self, job_root: str | Path, n_clients: int | None = None) -> Path:
        """Write ``<job_root>/<name>/`` (job.json, initial model, the scripts under custom/) and return it."""
        if self.initial_params is None:
            raise ConfigError(f"job '{self.name}' has no initial model: give initial_model=..., or "
                              "job.to(model, 'server')")
        sites, clients = self._sites, self._clients
        if not sites and clients is None:
            raise ConfigError(f"job '{self.name}' has no sites: use job.to(runner, 'site-1') or to_clients()")
        needed = [self.min_clients, self.controller.num_clients if isinstance(self.controller, FedAvg) else 1]
        count = n_clients or (len(sites) if clients is None else max(len(sites), *needed))
        if self.min_clients > count:
            raise ConfigError(f"job '{self.name}' needs min_clients={self.min_clients} sites but has {count}")
        workflow = self.workflow(count)
        eval_ckpt = self._eval_ckpt()
        out = Path(job_root) / self.name
        if out.exists():
            if not (out / JOB_FILE).is_file() and any(out.iterdir()):
                raise ConfigError(f"{out} exists and is not a job folder flkit exported (no {JOB_FILE}); "
                                  "refusing to replace it: export elsewhere or give the job another name")
            shutil.rmtree(out)  # an earlier export of a job (or an empty folder)
        out.mkdir(parents=True)
        placed: dict[Path, Path] = {}  # file in the job folder -> its source

        def place(runner: BaseScriptRunner) -> BaseScriptRunner:
            dest = script_destination(runner.script)
            copy_script(Path(runner.script), out, dest, placed)
            return runner.replace(script=str(dest))

        job = JobConfig(
            name=self.name,
            workflow=workflow,
            n_clients=count,
            root=out,
            sites={site: place(r) for site, r in sites.items()},
            clients=None if clients is None else place(clients),
            strategy=None if self.strategy is None else dict(self.strategy),
        )
        if job.strategy is not None and self._strategy_source is not None:
            dest = Path(CODE_DIR) / self._strategy_source.name
            if (out / dest).exists() and (out / dest).read_bytes() != self._strategy_source.read_bytes():
                raise ConfigError(f"strategy file {self._strategy_source} would replace {dest} of the job: "
                                  "rename one of them")
            (out / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self._strategy_source, out / dest)
            job.strategy["file"] = dest.as_posix()
        for path in self._resources:
            target = out / CODE_DIR / path.name
            if path.is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        if eval_ckpt is not None:  # the very file: evaluation.json names its sha256
            job.eval_ckpt = (Path(EVAL_CKPT_DIR) / eval_ckpt.name).as_posix()
            job.eval_ckpt_source = str(eval_ckpt.resolve())
            (out / EVAL_CKPT_DIR).mkdir()
            shutil.copyfile(eval_ckpt, out / job.eval_ckpt)
        # No fsync: an export is made again from the script that defines the job (0.1-0.3 s per 100 MB).
        save_params(out / MODEL_FILE, self.initial_params, {"job": self.name}, durable=False)
        (out / JOB_FILE).write_text(json.dumps(job.to_json(), indent=2) + "\n")
        return out

    def _eval_ckpt(self) -> Path | None:
        """The checkpoint an evaluate-only job ships (PTModel's initial_ckpt), checked to have exactly
        the model's keys and shapes; None when the job trains or evaluates the model it was given."""
        if not isinstance(self.controller, EvalController) or self.initial_ckpt is None:
            return None
        if not self.initial_ckpt.is_file():
            raise ConfigError(f"eval_ckpt {self.initial_ckpt} does not exist (any more)")
        if self._structure is not None:
            from flkit.job.checkpoint import load_checkpoint

            check_fits(f"eval_ckpt {self.initial_ckpt}", load_checkpoint(self.initial_ckpt, "eval_ckpt"),
                       self._structure)
        return self.initial_ckpt

    def simulator_run(self, workspace: str | Path | None = None, n_clients: int | None = None,
                      threads: int | None = None, gpu: str | None = None, log_config: str | None = None, *,
                      clients: list[str] | None = None, quiet: bool = False, backend: str = "processes",
                      dry_run: bool = False, check_timeout_s: float | None = None):
        """Export to ``<workspace>/job`` and run it with the simulator (NVFlare 2.6's argument order).

        ``n_clients``: sites site-1..site-N of a to_clients() job; ``clients``: their names instead.
        ``backend``: where the sites' scripts run: "processes" (a pool of worker processes; each
        site-task runs in ``<workspace>/<site>`` with fresh module globals and a seeded RNG),
        "threads" (threads of this process, which share its globals) or "ray" (``flkit[ray]``).
        ``threads``: the number of workers (default: this machine's cores); with more sites than
        workers, a site's script runs once per task on a free worker. ``gpu``: CUDA devices given
        to the sites round-robin ("0,1", or groups "[0,1],[2,3]"); without CUDA a warning, and the
        sites run on the CPU. ``log_config``: a level name, NVFlare's mode ("concise", "full",
        "verbose"...) or a logging config file (JSON). Returns a SimulationResult; raises
        JobFailedError (after printing the summary) if the job failed.

        ``dry_run=True``: a pre-flight check instead (``flkit check``): one train task per site,
        every problem of each result listed (``simulate``). Returns the SimulationResult, whose
        ``check`` holds the findings, when no site has an error (warnings, such as a missing
        NUM_STEPS_CURRENT_ROUND, are printed and kept there); else raises CheckFailedError, a
        JobFailedError whose message lists each error and whose ``report`` holds the findings.
        ``check_timeout_s`` (default 300): how long each site may take to join and to answer.
        Without ``workspace``, a dry run works in a temporary folder, removed afterwards.
        """
        from flkit.errors import CheckFailedError, JobFailedError

        result = self.simulate(workspace, n_clients, threads, gpu, log_config, clients=clients, quiet=quiet,
                               backend=backend, dry_run=dry_run, check_timeout_s=check_timeout_s)
        if result.check is not None and not result.ok:
            raise CheckFailedError(f"pre-flight check of job {self.name}: {result.reason}\n"
                                   f"{result.check.problems()}", result.check)
        if not result.ok:
            raise JobFailedError(f"job {self.name} failed: {result.reason}")
        return result

    def simulate(self, workspace: str | Path | None = None, n_clients: int | None = None,
                 threads: int | None = None, gpu: str | None = None, log_config: str | None = None, *,
                 clients: list[str] | None = None, quiet: bool = False, backend: str = "processes",
                 dry_run: bool = False, check_timeout_s: float | None = None):
        """``simulator_run`` without the raise: the SimulationResult of a failed job too (SimEnv's Run)."""
        from flkit.sim.check import check_workspace
        from flkit.sim.simulator import simulate

        if workspace is None and not dry_run:
            raise ConfigError(f"job {self.name}: simulator_run needs a workspace (only a dry run makes a temporary "
                              "one)")
        with check_workspace(workspace) as folder:
            job_dir = self.export_job(folder / "job", n_clients=n_clients or (len(clients) if clients else None))
            return simulate(job_dir, folder, n_clients=n_clients, threads=threads, gpu=gpu, quiet=quiet,
                            clients=clients, log_config=log_config, backend=backend, dry_run=dry_run,
                            check_timeout_s=check_timeout_s)


class BaseFedJob(FedJob):
    """NVFlare's BaseFedJob: a FedJob with a model selector by ``key_metric`` and the initial
    model on the server; add a controller with ``job.to(FedAvg(...), "server")``.

    ``key_metric=None`` (or "") selects no best model; ``key_metric_mode="min"`` (alias
    ``negate_key_metric=True``) when lower is better. ``analytics_receiver=True`` (or a receiver
    object) writes what sites log as TensorBoard files (or MLflow/W&B runs).
    """

    def __init__(
        self,
        initial_model: Any = None,
        name: str = "fed_job",
        min_clients: int = 1,
        mandatory_clients: list[str] | None = None,
        key_metric: str | None = "accuracy",
        validation_json_generator: Any = None,
        intime_model_selector: IntimeModelSelector | None = None,
        convert_to_fed_event: Any = None,
        analytics_receiver: Any = None,
        model_persistor: Any = None,
        model_locator: Any = None,
        *,
        model_selector: IntimeModelSelector | None = None,
        metrics_artifact_writer: Any = None,
        key_metric_mode: str | None = None,
        negate_key_metric: bool | None = None,
        **workflow_options: Any,
    ) -> None:
        super().__init__(name, min_clients, mandatory_clients, **workflow_options)
        owner = type(self).__name__
        if convert_to_fed_event is True:  # NVFlare's meaning of True is its default
            convert_to_fed_event = None
        warn_if_set(owner, {"convert_to_fed_event": convert_to_fed_event, "model_persistor": model_persistor,
                            "model_locator": model_locator, "metrics_artifact_writer": metrics_artifact_writer},
                    {"convert_to_fed_event": None, "model_persistor": None, "model_locator": None,
                     "metrics_artifact_writer": None}, {
            "convert_to_fed_event": "logged records always reach the server's receivers",
            "model_persistor": KEEPS_MODELS,
            "model_locator": KEEPS_MODELS,
            "metrics_artifact_writer": "each round's metrics are in <workspace>/server/round_state.json",
        })
        if intime_model_selector is not None and model_selector is not None:
            raise ConfigError(f"{owner}: give intime_model_selector (2.6's name) or model_selector (main's), not both")
        selector = intime_model_selector or model_selector
        if selector is not None:
            if not isinstance(selector, IntimeModelSelector):
                raise ConfigError(f"{owner}: the model selector must be an IntimeModelSelector, got "
                                  f"{type(selector).__name__}")
            self.selector = selector
        elif key_metric:
            self.selector = IntimeModelSelector(key_metric=key_metric,
                                                negate_key_metric=key_metric_direction(key_metric_mode,
                                                                                       negate_key_metric))
        if validation_json_generator is not None:
            self.to_server(validation_json_generator)
        if analytics_receiver is True:
            self.tracking["tensorboard"] = {}
        elif analytics_receiver not in (None, False):
            self.to_server(analytics_receiver)
        if initial_model is not None:
            self.to_server(initial_model if isinstance(initial_model, PTModel) else PTModel(initial_model))


class FedAvgJob(BaseFedJob):
    """FedAvg over ``n_clients`` sites for ``num_rounds`` rounds (NVFlare's FedAvgJob arguments and order).

    Every site takes part in every round. ``min_clients``: the fewest answers a round needs
    (default: every site, as NVFlare's FedAvg waits for all); ``mandatory_clients``: sites that
    must join and answer. ``key_metric`` picks the best global model (``key_metric_mode="min"``
    for losses; ``None``: no selection). flkit's own keywords: ``params_transfer_type``
    ("DIFF": sites send ``trained - received``), ``final_validation`` (score the last global model
    with one more task; off, as NVFlare sends none), ``cross_site_eval`` (after training every
    site scores every model), ``analytics_receiver`` (True: TensorBoard files; or a receiver), the timeouts
    (``join_timeout_s``, ``round_timeout_s``, ``heartbeat_interval_s``, ``heartbeat_timeout_s``).
    """

    def __init__(
        self,
        initial_model: Any = None,
        n_clients: int = 2,
        num_rounds: int = 1,
        name: str = "fed_job",
        min_clients: int | None = None,
        mandatory_clients: list[str] | None = None,
        key_metric: str | None = "accuracy",
        key_metric_mode: str | None = None,
        *,
        convert_to_fed_event: Any = None,
        analytics_receiver: Any = None,
        negate_key_metric: bool | None = None,
        cross_site_eval: bool = False,
        **workflow_options: Any,
    ) -> None:
        if initial_model is None:
            raise ConfigError("FedAvgJob needs initial_model (an nn.Module or a state_dict)")
        if not isinstance(n_clients, int) or n_clients < 1:
            raise ConfigError(f"n_clients must be >= 1, got {n_clients!r}")
        if min_clients is not None and min_clients > n_clients:
            raise ConfigError(f"min_clients={min_clients} is more than n_clients={n_clients}")
        super().__init__(initial_model, name, min_clients or 1, mandatory_clients, key_metric,
                         convert_to_fed_event=convert_to_fed_event, analytics_receiver=analytics_receiver,
                         key_metric_mode=key_metric_mode, negate_key_metric=negate_key_metric,
                         **workflow_options)
        self.n_clients = n_clients
        self.rounds = {"num_rounds": num_rounds, "min_clients": min_clients}
        if cross_site_eval:
            self.to_server(CrossSiteModelEval())

    def export_job(self, job_root: str | Path, n_clients: int | None = None) -> Path:
        return super().export_job(job_root, n_clients or self.n_clients)



def _strategy_spec(strategy: Any, args: dict[str, Any] | None,
                   file: str | Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The job's strategy as job.json names it, built once now so a bad name or argument fails
    here; and the file to export with it (a custom strategy's)."""
    from flkit.strategy import registry
    from flkit.strategy.base import Strategy

    if strategy is None:
        if args is not None or file is not None:
            raise ConfigError("strategy_args and strategy_file go with strategy=<name>")
        return None, None
    source = None if file is None else Path(file).resolve()
    if source is not None:
        if not source.is_file() or source.suffix != ".py":
            raise ConfigError(f"strategy_file {file} is not a Python file")
        registry.load_file(source)
    if isinstance(strategy, Strategy):
        if args is not None:
            raise ConfigError("strategy_args go with a strategy name; a Strategy instance carries its own arguments")
        instance = strategy
    elif isinstance(strategy, str):
        instance = registry.create(strategy, args)
    else:
        raise ConfigError(f"strategy must be a registered name or a Strategy instance, got {type(strategy).__name__}")
    spec = registry.spec_of(instance)
    return spec, source or _defining_file(type(instance))


def _defining_file(cls: type) -> Path | None:
    """The file that defines a custom strategy class (None for flkit's own), to export with the job."""
    module = cls.__module__
    if module == "flkit" or module.startswith("flkit."):
        return None
    if module == "__main__":
        raise ConfigError(f"strategy {cls.__name__} is defined in the script that builds the job: put it in a file "
                          "of its own and pass strategy_file=... (the job folder carries that file)")
    path = getattr(sys.modules.get(module), "__file__", None)
    if path is None or not Path(path).is_file():
        raise ConfigError(f"cannot find the file that defines strategy {cls.__name__}: pass strategy_file=...")
    return Path(path).resolve()


def _check_script(runner: BaseScriptRunner) -> None:
    if not Path(runner.script).is_file():
        raise ConfigError(f"script {runner.script} not found (relative paths are from {Path.cwd()})")
