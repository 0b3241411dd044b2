"""NVFlare's recipe API (2.7+): a recipe is a job built from a few arguments, run in an env.

``FedAvgRecipe(...)`` builds a ``FedJob`` (a FedAvg controller, the initial model, a model
selector, one ScriptRunner for every site) and ``recipe.execute(env)`` deploys it in a
``SimEnv`` or ``PocEnv``. Recipes are a thin layer over the job builder: everything they
set is a job component, and ``recipe.job`` is the job. ``FedEvalRecipe`` builds an evaluate-only
job (PTModel + EvalController, as NVFlare's does).

The recipe's ``min_clients`` is NVFlare's: the number of sites each round uses (a seeded
sample when the env has more sites), all of which must answer.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flkit.compat import warn_if_set, warn_ignored
from flkit.errors import ConfigError
from flkit.job.checkpoint import check_fits, load_checkpoint
from flkit.job.components import (
    ALL_AGGREGATED,
    BEST_FILE,
    HOLDS_TENSORS,
    KEEPS_MODELS,
    STREAMED,
    DataKind,
    EvalController,
    FedAvg,
    IntimeModelSelector,
    PTModel,
    Scaffold,
    later,
    model_params,
)
from flkit.job.fed_job import FedJob, key_metric_direction
from flkit.runner.script_runner import ExchangeFormat, FrameworkType, ScriptRunner, TransferType
from flkit.server.config import check_site_name, parse_stop_cond

if TYPE_CHECKING:
    from flkit.job.envs import ExecEnv, Run

# The runner settings set_per_site_config may change, with their ScriptRunner names.
_PER_SITE_KEYS = {"train_script": "script", "train_args": "script_args", "launch_external_process": None,
                  "command": None, "framework": None, "server_expected_format": None, "params_transfer_type": None,
                  "launch_once": None, "launch_timeout": None, "shutdown_timeout": None}


class Recipe:
    """A job plus the NVFlare recipe methods: ``execute(env)``, ``export(job_dir)``."""

    # The runner settings set_per_site_config takes, with their ScriptRunner names (None: the same).
    per_site_keys: dict[str, str | None] = _PER_SITE_KEYS

    def __init__(self, job: FedJob) -> None:
        self.job = job
        self.name = job.name
        self.min_clients = job.min_clients
        self.runner = job._clients  # what every site runs; per-site settings vary it

    def execute(self, env: ExecEnv, server_exec_params: dict[str, Any] | None = None,
                client_exec_params: dict[str, Any] | None = None) -> Run:
        """Deploy the job in ``env`` and return its Run (SimEnv: after the simulation finished;
        PocEnv: at once, with the server and sites running as processes)."""
        from flkit.job.envs import Run

        _exec_params(type(self).__name__, server_exec_params, client_exec_params)
        self.finalize()
        job_id = env.deploy(self.job)
        return Run(env, job_id)

    def run(self, env: ExecEnv, server_exec_params: dict[str, Any] | None = None,
            client_exec_params: dict[str, Any] | None = None) -> Run:
        """The same as ``execute`` (NVFlare 2.8's name)."""
        return self.execute(env, server_exec_params, client_exec_params)

    def export(self, job_dir: str | Path, server_exec_params: dict[str, Any] | None = None,
               client_exec_params: dict[str, Any] | None = None, env: ExecEnv | None = None) -> Path:
        """Write the job folder ``<job_dir>/<name>/`` that ``flkit simulate`` runs (``-n`` sets the
        number of sites; default: the env's, else min_clients)."""
        _exec_params(type(self).__name__, server_exec_params, client_exec_params)
        self.finalize()
        n = None if env is None else env.num_sites
        return self.job.export_job(job_dir, n_clients=n or self.min_clients)

    def finalize(self) -> None:
        """Hook for recipes that complete their job at the last moment (nothing to do for FedAvg)."""

    def process_env(self, env: ExecEnv) -> None:
        """NVFlare's hook to adapt a job to its env; flkit jobs run unchanged in every env."""

    def enable_log_streaming(self, *file_names: str) -> None:
        warn_ignored(type(self).__name__, "enable_log_streaming()",
                     "each site's output is printed with a [site] prefix and external sites keep "
                     "<workspace>/<site>/output.log")

    def set_per_site_config(self, config: dict[str, dict[str, Any]]) -> None:
        """Different runner settings per site (``train_script``, ``train_args``, ``command``...); the
        named sites are then the job's sites."""
        set_per_site(self, config)


def set_per_site(recipe: Recipe, config: dict[str, dict[str, Any]]) -> None:
    """Replace the job's sites by the named ones, each running ``recipe.runner`` with its overrides."""
    base = recipe.runner
    keys = recipe.per_site_keys
    if base is None:
        raise ConfigError(f"{type(recipe).__name__} has no runner to vary per site")
    if not isinstance(config, dict) or not config:
        raise ConfigError("per-site config must be {site: {setting: value}} with at least one site")
    if len(config) < recipe.min_clients:
        raise ConfigError(f"per-site config names {len(config)} site(s); min_clients={recipe.min_clients} needs "
                          "at least that many")
    runners = {}
    for site, overrides in config.items():
        check_site_name(site)
        if site in ("server", "@ALL"):
            raise ConfigError(f"per-site config is for sites, not {site!r}")
        unknown = sorted(set(overrides) - set(keys))
        if unknown:
            raise ConfigError(f"per-site config of {site}: unknown setting(s) {unknown} "
                              f"(known: {sorted(keys)})")
        kwargs = {(keys[k] or k): v for k, v in overrides.items()}
        server_format = kwargs.pop("server_expected_format", None)
        if server_format is not None:
            warn_if_set(site, {"server_expected_format": server_format},
                        {"server_expected_format": ExchangeFormat.NUMPY},
                        {"server_expected_format": HOLDS_TENSORS})
        runners[site] = base.replace(**kwargs)
    recipe.job._sites.clear()  # a second call replaces the first
    for site, runner in runners.items():
        recipe.job.to(runner, site)
    recipe.job._clients = None  # the named sites are the job's sites


def _exec_params(owner: str, server: dict[str, Any] | None, client: dict[str, Any] | None) -> None:
    for name, value in (("server_exec_params", server), ("client_exec_params", client)):
        if value:
            warn_ignored(owner, name, "flkit's server and sites take no extra app configuration")


def infer_key_metric_mode(key_metric: str | None, key_metric_mode: str | None, stop_cond: str | None) -> str:
    """NVFlare's rule: without a mode, a stop_cond on the key metric says the direction
    (``<``/``<=``: lower is better); a mode that contradicts it is an error."""
    parsed = parse_stop_cond(stop_cond)
    implied = None
    if parsed is not None and parsed.metric == key_metric and parsed.op != "=":
        implied = "min" if parsed.op in ("<", "<=") else "max"
    if key_metric_mode is None:
        return implied or "max"
    mode = str(getattr(key_metric_mode, "value", key_metric_mode)).lower()
    if implied is not None and mode != implied:
        raise ConfigError(f"key_metric_mode={mode!r} contradicts stop_cond={stop_cond!r}")
    return mode


class FedAvgRecipe(Recipe):
    """FedAvg with NVFlare's FedAvgRecipe arguments (keyword-only, as in NVFlare).

    ``min_clients`` sites take part in each round, each of which must answer. ``model``: an
    nn.Module, a state_dict, or ``{"class_path": ..., "args": {...}}`` (2.7.0's
    ``initial_model=`` is accepted too); ``initial_ckpt``: weights to start from (.safetensors,
    or a tensors-only torch checkpoint). ``train_script``/``train_args``: what every site runs
    (``per_site_config`` varies it per site). ``key_metric``/``key_metric_mode`` pick the best
    global model. ``aggregation_weights``: a factor per site on FedAvg's weight.
    """

    def __init__(
        self,
        *,
        name: str = "fedavg",
        model: Any = None,
        initial_ckpt: str | None = None,
        min_clients: int,
        num_rounds: int = 2,
        train_script: str,
        train_args: str = "",
        aggregator: Any = None,
        aggregator_data_kind: Any = DataKind.WEIGHTS,
        launch_external_process: bool = False,
        command: str = "python3 -u",
        framework: str = FrameworkType.PYTORCH,
        server_expected_format: str = ExchangeFormat.NUMPY,
        params_transfer_type: str = TransferType.FULL,
        model_persistor: Any = None,
        model_locator: Any = None,
        per_site_config: dict[str, dict[str, Any]] | None = None,
        launch_once: bool = True,
        launch_timeout: float | None = 300.0,
        shutdown_timeout: float = 0.0,
        key_metric: str | None = "accuracy",
        key_metric_mode: str | None = None,
        stop_cond: str | None = None,
        patience: int | None = None,
        best_model_filename: str | None = None,
        save_filename: str | None = None,
        exclude_vars: str | None = None,
        aggregation_weights: dict[str, float] | None = None,
        server_memory_gc_rounds: int = 0,
        enable_tensor_disk_offload: bool = False,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        initial_model: Any = None,
    ) -> None:
        owner = type(self).__name__
        if aggregator is not None:
            raise ConfigError(f"{owner}(aggregator=...): {later('custom aggregators')}; FedAvg's weighted mean is "
                              "built in")
        if initial_model is not None:
            if model is not None:
                raise ConfigError(f"{owner}: give model= or initial_model= (2.7.0's name), not both")
            model = initial_model
        if model is None and initial_ckpt is None:
            why = " (a custom model_persistor cannot stand in for it in flkit)" if model_persistor else ""
            raise ConfigError(f"{owner} needs model=... or initial_ckpt=...{why}")
        mode = infer_key_metric_mode(key_metric, key_metric_mode, stop_cond)
        warn_if_set(owner, locals(), {
            "aggregator_data_kind": DataKind.WEIGHTS, "server_expected_format": ExchangeFormat.NUMPY,
            "model_persistor": None,
            "model_locator": None, "best_model_filename": None,
            "save_filename": None, "exclude_vars": None, "enable_tensor_disk_offload": False,
        }, {
            "aggregator_data_kind": "each result's params_type (FULL or DIFF) says what it holds",
            "server_expected_format": HOLDS_TENSORS,
            "model_persistor": KEEPS_MODELS,
            "model_locator": KEEPS_MODELS,
            "best_model_filename": BEST_FILE,
            "save_filename": BEST_FILE,
            "exclude_vars": ALL_AGGREGATED,
            "enable_tensor_disk_offload": STREAMED,
        })
        if not isinstance(min_clients, int) or min_clients < 1:
            raise ConfigError(f"{owner}: min_clients must be >= 1, got {min_clients!r}")
        job = FedJob(name=name, min_clients=min_clients)
        job.to_server(PTModel(model, initial_ckpt=initial_ckpt))
        job.to_server(self._controller(num_clients=min_clients, num_rounds=num_rounds,
                                       aggregation_weights=aggregation_weights, memory_gc_rounds=server_memory_gc_rounds,
                                       stop_cond=stop_cond, patience=patience))
        if key_metric:
            job.to_server(IntimeModelSelector(key_metric=key_metric,
                                              negate_key_metric=key_metric_direction(mode, None)))
        job.to_clients(ScriptRunner(
            script=train_script, script_args=train_args, launch_external_process=launch_external_process,
            command=command, framework=framework, params_transfer_type=params_transfer_type,
            launch_once=launch_once, launch_timeout=launch_timeout, shutdown_timeout=shutdown_timeout,
            memory_gc_rounds=client_memory_gc_rounds, cuda_empty_cache=cuda_empty_cache,
        ))
        super().__init__(job)
        if per_site_config:
            self.set_per_site_config(per_site_config)

    def _controller(self, **kwargs: Any) -> FedAvg:
        """The server's controller (a recipe for another algorithm on FedAvg's rounds changes it)."""
        return FedAvg(**kwargs)


class FedEvalRecipe(Recipe):
    """NVFlare's FedEvalRecipe (keyword-only, NVFlare's arguments): an evaluate-only job. The model
    goes to every site once as a ``validate`` task (``flare.is_evaluate()`` is True in the script);
    each site's metrics are collected, printed as a table and written to
    ``<workspace>/server/evaluation.json`` with the model's file and its sha256. Nothing is
    trained, aggregated or changed.

    ``model``: an nn.Module, a state_dict or ``{"class_path": ..., "args": {...}}`` (2.7.0's
    ``initial_model=``, whose ``checkpoint`` attribute names the checkpoint when ``eval_ckpt`` is
    not given); ``eval_ckpt``: the saved model to evaluate, a ``.safetensors`` file or a
    tensors-only torch checkpoint (``torch.load(weights_only=True)``) with exactly the model's keys
    and shapes (a mismatch is an error naming the keys). flkit reads it when the recipe is built and
    ships the file in the job folder, so it must exist here (NVFlare also takes an absolute path
    that only the server has). Without ``eval_ckpt`` the model's own weights are evaluated (NVFlare
    requires one). ``min_clients``: the sites needed to start; sites that fail or do not answer
    within ``validation_timeout`` seconds are reported, and the job fails only when none answered.
    ``eval_script``/``eval_args`` and the runner's ``launch_external_process``, ``command``,
    ``client_memory_gc_rounds``, ``cuda_empty_cache``: what every site runs (``per_site_config``:
    ``{site: {"eval_script", "eval_args", "launch_external_process", "command"}}``).
    """

    per_site_keys = {"eval_script": "script", "eval_args": "script_args", "launch_external_process": None,
                     "command": None, "server_expected_format": None}

    def __init__(
        self,
        *,
        name: str = "eval",
        model: Any = None,
        eval_ckpt: str | None = None,
        min_clients: int,
        eval_script: str,
        eval_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_expected_format: str = ExchangeFormat.NUMPY,
        validation_timeout: int = 6000,
        per_site_config: dict[str, dict[str, Any]] | None = None,
        client_memory_gc_rounds: int = 0,
        cuda_empty_cache: bool = False,
        initial_model: Any = None,
    ) -> None:
        owner = type(self).__name__
        if initial_model is not None:
            if model is not None:
                raise ConfigError(f"{owner}: give model= or initial_model= (2.7.0's name), not both")
            model = initial_model
            if eval_ckpt is None:
                eval_ckpt = getattr(initial_model, "checkpoint", None)
        if model is None and eval_ckpt is None:
            raise ConfigError(f"{owner} needs model=... (its weights are evaluated) or eval_ckpt=... (the saved "
                              "model to evaluate), or both")
        warn_if_set(owner, locals(), {"server_expected_format": ExchangeFormat.NUMPY},
                    {"server_expected_format": HOLDS_TENSORS})
        if not isinstance(min_clients, int) or isinstance(min_clients, bool) or min_clients < 1:
            raise ConfigError(f"{owner}: min_clients must be >= 1, got {min_clients!r}")
        structure = None if model is None else model_params(model)
        if eval_ckpt is not None:
            if not isinstance(eval_ckpt, (str, Path)) or not Path(eval_ckpt).is_file():
                raise ConfigError(f"{owner}: eval_ckpt {eval_ckpt!r} does not exist here; flkit reads the "
                                  "checkpoint when the recipe is built and ships it in the job folder (a path that "
                                  "only the server has cannot be used)")
            if structure is not None:
                check_fits(f"{owner}: eval_ckpt {eval_ckpt}", load_checkpoint(Path(eval_ckpt), "eval_ckpt"),
                           structure)
        job = FedJob(name=name, min_clients=min_clients)
        comp_ids = job.to_server(PTModel(structure, initial_ckpt=eval_ckpt))
        job.to_server(EvalController(persistor_id=comp_ids["persistor_id"], timeout=validation_timeout))
        job.to_clients(ScriptRunner(
            script=eval_script, script_args=eval_args, launch_external_process=launch_external_process,
            command=command, memory_gc_rounds=client_memory_gc_rounds, cuda_empty_cache=cuda_empty_cache,
        ))
        super().__init__(job)
        self.eval_ckpt = eval_ckpt
        if per_site_config:
            self.set_per_site_config(per_site_config)


class _Later(Recipe):
    """A recipe NVFlare has whose algorithm flkit does not have yet: the name imports, and
    building it says so (instead of running something else)."""

    algorithm = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise ConfigError(f"{type(self).__name__}: {later(self.algorithm)}; FedAvgRecipe is available")


class FedProxRecipe(FedAvgRecipe):
    """FedProx with NVFlare's FedProxRecipe arguments: FedAvgRecipe's, and ``fedprox_mu`` (> 0,
    default 0.01), sent in every training task's ``meta["fedprox_mu"]``. A script adds
    ``flkit.pt.PTFedProxLoss(mu)(model, global_model)`` to its loss; a Lightning trainer patched with
    ``flare.patch`` applies it by itself."""

    def __init__(self, *, name: str = "fedprox", fedprox_mu: float = 0.01, **kwargs: Any) -> None:
        from flkit.strategy.fedprox import check_mu

        try:
            self.fedprox_mu = check_mu(fedprox_mu, type(self).__name__)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        super().__init__(name=name, **kwargs)

    def _controller(self, **kwargs: Any) -> FedAvg:
        return FedAvg(fedprox_mu=self.fedprox_mu, **kwargs)


def _with_fedavg_arguments(cls: type, name: str, extra: list[inspect.Parameter]) -> None:
    """Give ``cls`` (which passes ``**kwargs`` on to FedAvgRecipe) the signature NVFlare's has:
    FedAvgRecipe's keyword-only arguments, its own ``name`` default, and ``extra``."""
    params = [p.replace(default=name) if p.name == "name" else p
              for p in inspect.signature(FedAvgRecipe).parameters.values()]
    cls.__signature__ = inspect.Signature(params + extra)  # type: ignore[attr-defined]


_with_fedavg_arguments(FedProxRecipe, "fedprox",
                       [inspect.Parameter("fedprox_mu", inspect.Parameter.KEYWORD_ONLY, default=0.01,
                                          annotation=float)])


class ScaffoldRecipe(FedAvgRecipe):
    """SCAFFOLD with NVFlare's ScaffoldRecipe arguments (flkit.strategy.scaffold): sites use
    ``flkit.pt.PTScaffoldHelper`` as NVFlare's do. NVFlare's recipe keeps no best model; this one
    keeps the best by ``accuracy`` when the sites send it, as FedAvgRecipe does."""

    def __init__(
        self,
        *,
        name: str = "scaffold",
        model: Any = None,
        initial_ckpt: str | None = None,
        min_clients: int,
        num_rounds: int = 2,
        train_script: str,
        train_args: str = "",
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_expected_format: str = ExchangeFormat.NUMPY,
        params_transfer_type: str = TransferType.FULL,
        server_memory_gc_rounds: int = 0,
        client_memory_gc_rounds: int = 0,
        torch_cuda_empty_cache: bool = False,
    ) -> None:
        super().__init__(name=name, model=model, initial_ckpt=initial_ckpt, min_clients=min_clients,
                         num_rounds=num_rounds, train_script=train_script, train_args=train_args,
                         launch_external_process=launch_external_process, command=command,
                         server_expected_format=server_expected_format, params_transfer_type=params_transfer_type,
                         server_memory_gc_rounds=server_memory_gc_rounds,
                         client_memory_gc_rounds=client_memory_gc_rounds, cuda_empty_cache=torch_cuda_empty_cache)

    def _controller(self, **kwargs: Any) -> FedAvg:
        return Scaffold(**kwargs)


# FedOptRecipe's server optimiser (NVFlare: a torch.optim class path): the torch.optim classes flkit
# knows, and the flkit strategy with the arguments each of their arguments becomes. Nothing else is
# accepted: no class path reaches job.json.
_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    # torch.optim.SGD(lr, momentum) on the gradient -(mean - global): FedAvgM
    "SGD": ("fedavgm", {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}),
    "Adam": ("fedadam", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}),
    "Adagrad": ("fedadagrad", {"lr": 1e-2, "eps": 1e-10, "lr_decay": 0.0, "weight_decay": 0.0,
                               "initial_accumulator_value": 0.0}),
}
# NVFlare's PTFedOptModelShareableGenerator's default optimiser (with no momentum: FedAvg's step).
_DEFAULT_OPTIMIZER = {"path": "torch.optim.SGD", "args": {"lr": 1.0}}


def fedopt_strategy(optimizer_args: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The flkit strategy (name, arguments) for NVFlare's FedOpt ``optimizer_args``: torch.optim.SGD
    becomes fedavgm, Adam fedadam (bias-corrected: exactly torch's Adam), Adagrad fedadagrad; any other
    path, or an argument those strategies cannot honour (nesterov, weight decay, amsgrad...), is refused."""
    if not isinstance(optimizer_args, (dict, type(None))):
        raise ConfigError(f"FedOptRecipe: optimizer_args must be a dict {{'path': ..., 'args': {{...}}}}, got "
                          f"{optimizer_args!r:.100}")
    spec = dict(optimizer_args or _DEFAULT_OPTIMIZER)  # (NVFlare: an empty one is its default too)
    unknown = set(spec) - {"path", "name", "args", "config_type"}
    if unknown:
        raise ConfigError(f"FedOptRecipe: optimizer_args has unknown keys {sorted(unknown)} "
                          "(path or name, args, config_type)")
    if spec.get("config_type", "dict") != "dict":
        raise ConfigError(f"FedOptRecipe: optimizer_args config_type must be 'dict', got {spec['config_type']!r}")
    path = spec.get("path", spec.get("name"))
    if isinstance(path, str) and path in _OPTIMIZERS:  # NVFlare's {"name": "SGD"} form
        path = f"torch.optim.{path}"
    kind = path[len("torch.optim."):] if isinstance(path, str) and path.startswith("torch.optim.") else None
    if kind not in _OPTIMIZERS:
        raise ConfigError(f"FedOptRecipe: the server optimiser {path!r} is not available; flkit runs "
                          f"{', '.join('torch.optim.' + k for k in _OPTIMIZERS)} as registered strategies "
                          "(no class path is loaded from a job)")
    name, defaults = _OPTIMIZERS[kind]
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"FedOptRecipe: optimizer_args['args'] must be a dict, got {args!r:.100}")
    bad = sorted(set(args) - set(defaults))
    if bad:
        raise ConfigError(f"FedOptRecipe: torch.optim.{kind} arguments {bad} are not known here "
                          f"(known: {sorted(defaults)})")
    merged = {**defaults, **args}
    for key in ("dampening", "weight_decay", "nesterov", "amsgrad", "lr_decay", "initial_accumulator_value"):
        if key in merged and merged[key] != defaults[key]:
            raise ConfigError(f"FedOptRecipe: torch.optim.{kind}({key}={merged[key]!r}) is not available on the "
                              f"server; only its default ({defaults[key]!r})")
    if name == "fedavgm":
        return name, {"server_learning_rate": merged["lr"], "server_momentum": merged["momentum"]}
    if name == "fedadam":
        betas = merged["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"FedOptRecipe: torch.optim.Adam betas must be two numbers, got {betas!r}")
        return name, {"eta": merged["lr"], "beta_1": betas[0], "beta_2": betas[1], "tau": merged["eps"],
                      "bias_correction": True}
    return name, {"eta": merged["lr"], "tau": merged["eps"]}


class FedOptRecipe(FedAvgRecipe):
    """FedOpt with NVFlare's FedOptRecipe arguments: FedAvg's rounds, then a server optimiser step
    on the pseudo-gradient (flkit.strategy.fedopt). ``optimizer_args={"path": "torch.optim.SGD",
    "args": {"lr": 1.0, "momentum": 0.6}}`` runs FedAvgM (NVFlare's default, ``{"lr": 1.0}`` without
    momentum, is FedAvg's step); ``torch.optim.Adam`` FedAdam; ``torch.optim.Adagrad`` FedAdagrad; other paths are refused (see ``fedopt_strategy``).
    As NVFlare's, sites send their result as a DIFF. ``lr_scheduler_args`` is refused (server
    learning-rate schedules are not available); ``device``: the server steps on its CPU. ``model`` (or
    2.7.0's ``initial_model``) and ``initial_ckpt`` as for FedAvgRecipe."""

    def __init__(
        self,
        *,
        name: str = "fedopt",
        model: Any = None,
        initial_ckpt: str | None = None,
        min_clients: int,
        num_rounds: int = 2,
        train_script: str,
        train_args: str = "",
        aggregator: Any = None,
        launch_external_process: bool = False,
        command: str = "python3 -u",
        server_expected_format: str = ExchangeFormat.NUMPY,
        device: str | None = None,
        source_model: str = "model",
        optimizer_args: dict[str, Any] | None = None,
        lr_scheduler_args: dict[str, Any] | None = None,
        server_memory_gc_rounds: int = 0,
        initial_model: Any = None,
    ) -> None:
        owner = type(self).__name__
        if lr_scheduler_args is not None:
            raise ConfigError(f"{owner}(lr_scheduler_args=...): {later('server learning-rate schedules')}")
        self.strategy_spec = fedopt_strategy(optimizer_args)
        warn_if_set(owner, {"device": device, "source_model": source_model}, {"device": None, "source_model": "model"},
                    {"device": "the server's optimiser steps on its CPU, where the global model is",
                     "source_model": "the recipe's initial_model is the job's model"})
        super().__init__(name=name, model=model, initial_model=initial_model, initial_ckpt=initial_ckpt,
                         server_memory_gc_rounds=server_memory_gc_rounds, min_clients=min_clients, num_rounds=num_rounds,
                         train_script=train_script, train_args=train_args, aggregator=aggregator,
                         launch_external_process=launch_external_process, command=command,
                         server_expected_format=server_expected_format, params_transfer_type=TransferType.DIFF)
        from flkit.strategy import registry

        registry.create(*self.strategy_spec)  # its arguments are checked now, not when the job runs
        self.job.strategy = {"name": self.strategy_spec[0], "args": self.strategy_spec[1]}


class CyclicRecipe(_Later):
    algorithm = "cyclic weight transfer"


class FedAvgRecipeWithHE(_Later):
    algorithm = "homomorphic encryption"


class SwarmLearningRecipe(_Later):
    algorithm = "swarm learning"

