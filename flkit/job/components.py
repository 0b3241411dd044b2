"""Server-side job components with NVFlare's names, as plain settings for flkit's one workflow.

NVFlare job scripts put a controller, a model, a model selector and receivers on the server
with ``job.to(obj, "server")``. flkit has one server workflow (rounds of FedAvg, best-model
selection, optional cross-site evaluation, tracking; or, with an EvalController, one evaluation
of a saved model); each class here is the NVFlare-named way to set part of it, taking NVFlare's
arguments. Arguments with no meaning here are named in
an ``IgnoredArgumentWarning``; behaviour flkit does not have yet is an error naming it.
"""

from __future__ import annotations

import importlib
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from flkit.compat import warn_if_set
from flkit.errors import ConfigError
from flkit.job.checkpoint import load_checkpoint
from flkit.server.config import EVALUATE, check_site_name, parse_stop_cond
from flkit.wire.codec import Params, to_cpu_params


class DataKind(str, Enum):
    """NVFlare's DXO data kinds. flkit needs none of them: each result's params_type (FULL or
    DIFF) says what it holds. The name exists so job scripts that pass it keep running."""

    FL_MODEL = "FL_MODEL"
    WEIGHTS = "WEIGHTS"
    WEIGHT_DIFF = "WEIGHT_DIFF"
    METRICS = "METRICS"
    ANALYTIC = "ANALYTIC"
    COLLECTION = "COLLECTION"
    STATISTICS = "STATISTICS"
    RAW = "RAW"
    APP_DEFINED = "APP_DEFINED"


def later(feature: str) -> str:
    return f"{feature} is not available in this version of flkit yet"


# Why NVFlare arguments have no effect here (one wording, whichever class takes them).
KEEPS_MODELS = "flkit's server keeps the models itself (<workspace>/server/*.safetensors)"
HOLDS_TENSORS = "flkit's server always holds torch tensors"
ALL_AGGREGATED = "every tensor of the model is aggregated"
STREAMED = "results are folded into the running mean as they arrive"
BEST_FILE = "the best model is saved as best_FL_global_model.safetensors"


class FedAvg:
    """NVFlare's FedAvg controller: ``num_clients`` sites per round (a seeded sample when the job
    has more), each of which must answer, for ``num_rounds`` rounds from ``start_round``.
    ``fedprox_mu`` (> 0; None or 0: plain FedAvg) makes it FedProx, as on NVFlare main: every
    training task carries ``meta["fedprox_mu"]`` (the job's strategy becomes ``fedprox``)."""

    strategy_name = "fedavg"  # the flkit strategy this controller runs

    def __init__(
        self,
        *,
        num_clients: int = 3,
        num_rounds: int = 5,
        start_round: int = 0,
        persistor_id: str = "persistor",
        ignore_result_error: bool = False,
        allow_empty_global_weights: bool = False,
        task_check_period: float = 0.5,
        model: Any = None,
        save_filename: str = "FL_global_model.pt",
        aggregator: Any = None,
        stop_cond: str | None = None,
        patience: int | None = None,
        task_name: str = "train",
        exclude_vars: str | None = None,
        aggregation_weights: dict[str, float] | None = None,
        enable_tensor_disk_offload: bool = False,
        fedprox_mu: float | None = None,
        memory_gc_rounds: int = 0,
    ) -> None:
        self.strategy: dict[str, Any] | None = None  # the job's strategy when not plain FedAvg
        if fedprox_mu is not None and fedprox_mu != 0:
            from flkit.strategy.fedprox import check_mu

            try:
                mu = check_mu(fedprox_mu, f"{type(self).__name__}")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if self.strategy_name != "fedavg":
                raise ConfigError(f"{type(self).__name__}(fedprox_mu=...): FedProx goes with FedAvg, not "
                                  f"{self.strategy_name}")
            self.strategy = {"name": "fedprox", "args": {"fedprox_mu": mu}}
        elif self.strategy_name != "fedavg":
            self.strategy = {"name": self.strategy_name, "args": {}}
        if aggregator is not None:
            raise ConfigError(f"FedAvg(aggregator=...): {later('custom aggregators')}; FedAvg's weighted mean is "
                              "built in")
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(f"FedAvg num_clients must be >= 1, got {num_clients!r}")
        parse_stop_cond(stop_cond)
        warn_if_set("FedAvg", locals(), {
            "persistor_id": "persistor", "allow_empty_global_weights": False, "task_check_period": 0.5,
            "save_filename": "FL_global_model.pt", "task_name": "train", "exclude_vars": None,
            "enable_tensor_disk_offload": False,
        }, {
            "persistor_id": KEEPS_MODELS,
            "allow_empty_global_weights": "an empty result is always refused with a clear error",
            "task_check_period": "the server is woken by each answer; there is no polling period",
            "save_filename": "the global model is saved as FL_global_model.safetensors",
            "task_name": "training tasks are always named 'train' (flare.is_train())",
            "exclude_vars": ALL_AGGREGATED,
            "enable_tensor_disk_offload": STREAMED,
        })
        self.stop_cond, self.patience = stop_cond, patience
        self.num_clients = num_clients
        self.num_rounds = num_rounds
        self.start_round = start_round
        self.ignore_result_error = bool(ignore_result_error)
        self.initial_params = None if model is None else model_params(model)
        self.aggregation_weights = dict(aggregation_weights or {})
        self.memory_gc_rounds = memory_gc_rounds

    def workflow(self) -> dict[str, Any]:
        return {
            "num_rounds": self.num_rounds,
            "start_round": self.start_round,
            "clients_per_round": self.num_clients,
            # NVFlare's FedAvg waits for every sampled site; ignore_result_error goes on without failed ones.
            "min_clients": 1 if self.ignore_result_error else self.num_clients,
            "aggregation_weights": self.aggregation_weights,
            "server_memory_gc_rounds": self.memory_gc_rounds,
            "stop_cond": self.stop_cond,
            "patience": self.patience,
        }


class Scaffold(FedAvg):
    """NVFlare's Scaffold controller (``nvflare.app_common.workflows.scaffold``): FedAvg's rounds
    with SCAFFOLD's control variates (flkit.strategy.scaffold; sites use ``flkit.pt.PTScaffoldHelper``)."""

    strategy_name = "scaffold"


class IntimeModelSelector:
    """NVFlare's model selector: keeps the global model whose sites' mean ``key_metric`` is best."""

    def __init__(self, weigh_by_local_iter: bool = False, aggregation_weights: dict[str, float] | None = None,
                 validation_metric_name: str = "initial_metrics", key_metric: str = "val_accuracy",
                 negate_key_metric: bool = False) -> None:
        warn_if_set("IntimeModelSelector", locals(), {
            "weigh_by_local_iter": False, "aggregation_weights": None, "validation_metric_name": "initial_metrics",
        }, {
            "weigh_by_local_iter": "a round's score is the plain mean over the sites that reported the key metric",
            "aggregation_weights": "a round's score is the plain mean over the sites that reported the key metric",
            "validation_metric_name": "the metrics sent with each result are the ones scored",
        })
        self.key_metric = key_metric
        self.negate_key_metric = bool(negate_key_metric)


class PTModel:
    """NVFlare's PTModel: the initial global model (an ``nn.Module``, a state_dict, or NVFlare's
    ``{"class_path": ..., "args": {...}}``), optionally loaded from ``initial_ckpt``."""

    def __init__(self, model: Any = None, persistor: Any = None, locator: Any = None, *,
                 initial_ckpt: str | None = None, allow_numpy_conversion: bool = True,
                 best_model_filename: str | None = None) -> None:
        warn_if_set("PTModel", locals(), {"persistor": None, "locator": None, "allow_numpy_conversion": True,
                                          "best_model_filename": None}, {
            "persistor": KEEPS_MODELS,
            "locator": KEEPS_MODELS,
            "allow_numpy_conversion": "the server always holds torch tensors",
            "best_model_filename": BEST_FILE,
        })
        if model is None and initial_ckpt is None:
            raise ConfigError("PTModel needs a model or an initial_ckpt")
        own = None if model is None else model_params(model)
        self.params = model_params(own, initial_ckpt)
        # The model's own keys and shapes (meta tensors: no memory), which an evaluated checkpoint must have.
        self.structure = None if own is None else {k: torch.empty_like(v, device="meta") for k, v in own.items()}
        # Training starts from the checkpoint's tensors; an EvalController's job also ships the
        # file itself and evaluates exactly it (``FedJob.export_job``).
        self.initial_ckpt = None if initial_ckpt is None else Path(initial_ckpt)


class EvalController:
    """NVFlare's EvalController (``nvflare.app_opt.pt.recipes.fedeval``, the controller FedEvalRecipe
    puts on the server): an evaluate-only job. The job's model (PTModel's; with ``initial_ckpt``, the
    checkpoint file itself) goes to every site once as a ``validate`` task (``flare.is_evaluate()``)
    and each site's metrics are collected: no training, no aggregation, the model is not changed.
    ``timeout``: seconds the sites have to answer; a site that fails or has not answered by then is
    reported (``server/evaluation.json``), and the job fails only when no site answered."""

    def __init__(self, persistor_id: str = "persistor", timeout: int = 6000) -> None:
        warn_if_set("EvalController", locals(), {"persistor_id": "persistor"}, {"persistor_id": KEEPS_MODELS})
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"EvalController timeout must be a positive number of seconds, got {timeout!r}")
        self.timeout = timeout

    def workflow(self) -> dict[str, Any]:
        return {"mode": EVALUATE, "num_rounds": 1, "round_timeout_s": float(self.timeout)}


class TBAnalyticsReceiver:
    """Write what sites log as TensorBoard event files, one folder per site (``tb_folder/<site>``)."""

    tracking_type = "tensorboard"

    def __init__(self, tb_folder: str = "tb_events", events: list[str] | None = None) -> None:
        _events_warning("TBAnalyticsReceiver", events)
        self.config = {"tb_folder": tb_folder}


class MLflowReceiver:
    """Write what sites log into MLflow runs, one run per site."""

    tracking_type = "mlflow"

    def __init__(self, tracking_uri: str | None = None, kw_args: dict[str, Any] | None = None,
                 artifact_location: str | None = None, events: list[str] | None = None,
                 buffer_flush_time: float = 1) -> None:
        _events_warning("MLflowReceiver", events)
        warn_if_set("MLflowReceiver", locals(), {"buffer_flush_time": 1}, {
            "buffer_flush_time": "records are written as each batch from a site arrives"})
        self.config = {k: v for k, v in (("tracking_uri", tracking_uri), ("kw_args", kw_args),
                                         ("artifact_location", artifact_location)) if v is not None}


class WandBReceiver:
    """Write what sites log into Weights & Biases runs, one run per site (offline by default)."""

    tracking_type = "wandb"

    def __init__(self, wandb_args: dict[str, Any] | None = None, mode: str = "offline",
                 events: list[str] | None = None, process_timeout: float = 10.0) -> None:
        _events_warning("WandBReceiver", events)
        warn_if_set("WandBReceiver", locals(), {"process_timeout": 10.0}, {
            "process_timeout": "W&B runs live in the server process"})
        self.config = {"wandb_args": dict(wandb_args or {}), "mode": mode}


RECEIVERS = {cls.tracking_type: cls for cls in (TBAnalyticsReceiver, MLflowReceiver, WandBReceiver)}


def _events_warning(owner: str, events: list[str] | None) -> None:
    warn_if_set(owner, {"events": events}, {"events": None}, {
        "events": "every record a site logs (flare.log, SummaryWriter, MLflowWriter, WandBWriter) is written"})


class ValidationJsonGenerator:
    """NVFlare's writer of the cross-site matrix; flkit always writes
    ``<workspace>/server/cross_site_val/cross_val_results.json`` when cross-site evaluation runs."""

    def __init__(self, results_dir: str = "cross_site_val", json_file_name: str = "cross_val_results.json") -> None:
        warn_if_set("ValidationJsonGenerator", locals(), {"results_dir": "cross_site_val",
                                                          "json_file_name": "cross_val_results.json"}, {
            "results_dir": "the matrix is written to <workspace>/server/cross_site_val/",
            "json_file_name": "the matrix is written to cross_val_results.json",
        })


class CrossSiteModelEval:
    """NVFlare's cross-site evaluation after training: every site scores the final and the best
    global model and (``submit_model_task_name`` not empty) every site's own model."""

    def __init__(self, task_check_period: float = 0.5, cross_val_dir: str = "cross_site_val",
                 submit_model_timeout: int = 600, validation_timeout: int = 6000, model_locator_id: str = "",
                 formatter_id: str = "", submit_model_task_name: str = "submit_model",
                 validation_task_name: str = "validate", cleanup_models: bool = False,
                 participating_clients: list[str] | None = None, wait_for_clients_timeout: int = 300) -> None:
        warn_if_set("CrossSiteModelEval", locals(), {
            "task_check_period": 0.5, "cross_val_dir": "cross_site_val", "model_locator_id": "",
            "formatter_id": "", "validation_task_name": "validate", "cleanup_models": False,
            "wait_for_clients_timeout": 300,
        }, {
            "task_check_period": "the server is woken by each answer; there is no polling period",
            "cross_val_dir": "the matrix is written to <workspace>/server/cross_site_val/",
            "model_locator_id": "the server's models are the final and the best global model",
            "formatter_id": "the matrix is printed as a table and written as JSON",
            "validation_task_name": "validation tasks are always named 'validate' (flare.is_evaluate())",
            "cleanup_models": "submitted site models are kept in cross_site_val/models/",
            "wait_for_clients_timeout": "cross-site evaluation runs with the sites still in the job",
        })
        if submit_model_task_name not in ("", "submit_model", None):
            raise ConfigError("CrossSiteModelEval submit_model_task_name must be 'submit_model' or '' (no site "
                              f"models), got {submit_model_task_name!r}")
        self.config = {
            "submit_model": bool(submit_model_task_name),
            "participating_clients": None if participating_clients is None
            else [check_site_name(s) for s in participating_clients],
            "submit_model_timeout_s": float(submit_model_timeout),
            "validation_timeout_s": float(validation_timeout),
        }


# -- the initial model ---------------------------------------------------------


def model_params(model: Any, initial_ckpt: str | Path | None = None) -> Params:
    """CPU tensors of the initial global model.

    ``model``: an ``nn.Module``, a state_dict, or ``{"class_path": "pkg.module.Class", "args": {...}}``
    (built here, at job-building time, so no class path reaches the job folder).
    ``initial_ckpt``: a ``.safetensors`` file, or a torch checkpoint read with ``weights_only=True``
    (tensors only, never arbitrary objects); its tensors replace the model's.
    """
    if isinstance(model, dict) and ("class_path" in model or "path" in model) and \
            not all(isinstance(v, torch.Tensor) for v in model.values()):
        model = _build(model)
    if isinstance(model, torch.nn.Module):
        params = model.state_dict()
    elif isinstance(model, dict):
        params = model
    elif model is None:
        params = None
    else:
        raise ConfigError(f"the initial model must be a torch.nn.Module, a state_dict or "
                          f"{{'class_path': ..., 'args': {{...}}}}, got {type(model).__name__}")
    if initial_ckpt is not None:
        loaded = _load_checkpoint(Path(initial_ckpt))
        if params is not None:
            missing = sorted(set(params) - set(loaded))
            if missing:
                raise ConfigError(f"initial_ckpt {initial_ckpt} lacks {missing[:5]} of the model's tensors")
        params = loaded if params is None else {**params, **{k: loaded[k] for k in params}}
    return to_cpu_params(params)


def _build(spec: dict[str, Any]) -> torch.nn.Module:
    path = spec.get("class_path", spec.get("path"))
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"model class_path must be 'module.Class', got {path!r}")
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"model class_path {path!r} cannot be imported: {exc}") from None
    args = spec.get("args") or {}
    if not isinstance(args, dict):
        raise ConfigError(f"model args must be a dict, got {type(args).__name__}")
    model = cls(**args)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model class_path {path!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_checkpoint(path: Path) -> Params:
    return load_checkpoint(path, "initial_ckpt")
