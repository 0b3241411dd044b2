"""flkit.job against NVFlare's job API (2.6, 2.7, main) and recipe API: signatures, every NVFlare
argument accepted (the ones without effect named in an IgnoredArgumentWarning, the others changing
job.json), errors that name their cause, the exported folder's layout, and a recipe's folder run
by `flkit simulate`.

NVFlare's signatures here were read from NVFlare's source (the 2.6 branch and main).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flkit
from flkit.errors import ConfigError
from flkit.job import (
    BaseFedJob,
    BaseScriptRunner,
    CrossSiteModelEval,
    CyclicRecipe,
    EvalController,
    ExchangeFormat,
    FedAvg,
    FedAvgJob,
    FedAvgRecipe,
    FedEvalRecipe,
    FedJob,
    FedOptRecipe,
    FedProxRecipe,
    FrameworkType,
    IgnoredArgumentWarning,
    IntimeModelSelector,
    MLflowReceiver,
    PipeConnectType,
    PocEnv,
    ProdEnv,
    PTModel,
    Run,
    ScaffoldRecipe,
    ScriptRunner,
    SimEnv,
    SubprocessLauncher,
    TBAnalyticsReceiver,
    TransferType,
    ValidationJsonGenerator,
    WandBReceiver,
    add_cross_site_evaluation,
    add_experiment_tracking,
    load_job,
    set_per_site_config,
)

from conftest import REPO, SCRIPTS

TRAIN = str(SCRIPTS / "jobapi_train.py")  # answers train, validate and submit_model
WARN_LOOP = SCRIPTS / "jobapi_warn_loop.py"
IGNORED = re.compile(r"^(?P<owner>[\w.-]+): (?P<arg>[\w()]+) is accepted but has no effect in flkit: \S")


# -- helpers -----------------------------------------------------------------------------------


def positional(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]


def keyword_only(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == p.KEYWORD_ONLY]


def default(fn, name: str):
    value = inspect.signature(fn).parameters[name].default
    return getattr(value, "value", value)


def ignored_args(record) -> list[str]:
    """The argument named by each IgnoredArgumentWarning in ``record`` (every message checked)."""
    names = []
    for w in record:
        if issubclass(w.category, IgnoredArgumentWarning):
            match = IGNORED.match(str(w.message))
            assert match, f"unexpected IgnoredArgumentWarning text: {w.message}"
            names.append(match["arg"])
    return sorted(names)


@contextmanager
def no_ignored_warning() -> Iterator[None]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield
    assert ignored_args(record) == [], [str(w.message) for w in record]


def zero_model() -> torch.nn.Linear:
    model = torch.nn.Linear(2, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model


def job_json(folder: Path) -> dict:
    return json.loads((folder / "job.json").read_text())


def export(job, root: Path, **kwargs) -> dict:
    return job_json(job.export_job(root, **kwargs))


def two_site_job(runner: BaseScriptRunner, **kwargs) -> FedAvgJob:
    job = FedAvgJob(zero_model(), 2, 1, **kwargs)
    job.to(runner, "site-1")
    job.to(ScriptRunner(TRAIN), "site-2")
    return job


def quiet_recipe(**kwargs) -> FedAvgRecipe:
    kwargs.setdefault("min_clients", 2)
    kwargs.setdefault("train_script", TRAIN)
    if "model" not in kwargs and "initial_model" not in kwargs and "initial_ckpt" not in kwargs:
        kwargs["model"] = zero_model()
    return FedAvgRecipe(**kwargs)


class _Opaque:
    """Not a tensor: a checkpoint holding one is not tensors-only."""


# -- 1. signatures -----------------------------------------------------------------------------


def test_fedavgjob_signature_is_nvflares():
    assert positional(FedAvgJob) == ["initial_model", "n_clients", "num_rounds", "name", "min_clients",
                                     "mandatory_clients", "key_metric", "key_metric_mode"]
    assert default(FedAvgJob, "name") == "fed_job"
    assert default(FedAvgJob, "key_metric") == "accuracy"
    assert default(FedAvgJob, "mandatory_clients") is None
    # 2.6's two last arguments are still accepted, by keyword.
    assert {"convert_to_fed_event", "analytics_receiver"} <= set(keyword_only(FedAvgJob))


def test_basefedjob_signature_is_26s():
    assert positional(BaseFedJob) == ["initial_model", "name", "min_clients", "mandatory_clients", "key_metric",
                                      "validation_json_generator", "intime_model_selector", "convert_to_fed_event",
                                      "analytics_receiver", "model_persistor", "model_locator"]
    assert {"model_selector", "metrics_artifact_writer", "key_metric_mode"} <= set(keyword_only(BaseFedJob))
    assert default(BaseFedJob, "initial_model") is None
    assert default(BaseFedJob, "name") == "fed_job"
    assert default(BaseFedJob, "min_clients") == 1
    assert default(BaseFedJob, "key_metric") == "accuracy"


def test_fedjob_signature():
    assert positional(FedJob) == ["name", "min_clients", "mandatory_clients"]
    assert default(FedJob, "name") == "fed_job"
    assert default(FedJob, "min_clients") == 1
    assert {"meta_props", "fail_fast"} <= set(keyword_only(FedJob))
    assert positional(FedJob.to)[:3] == ["obj", "target", "id"]


def test_scriptrunner_signature_is_mains_with_nvflare_defaults():
    assert positional(ScriptRunner) == ["script", "script_args", "launch_external_process", "command", "framework",
                                        "server_expected_format", "params_transfer_type", "launch_once",
                                        "launch_timeout", "shutdown_timeout", "memory_gc_rounds", "cuda_empty_cache",
                                        "execution_mode"]
    expected = {"script_args": "", "launch_external_process": False, "command": "python3 -u",
                "framework": "pytorch", "server_expected_format": "numpy", "params_transfer_type": "FULL",
                "launch_once": True, "launch_timeout": 300.0, "shutdown_timeout": 0.0, "memory_gc_rounds": 0,
                "cuda_empty_cache": False, "execution_mode": None}
    assert {name: default(ScriptRunner, name) for name in expected} == expected
    assert {"pipe_connect_type", "task_pipe"} <= set(keyword_only(ScriptRunner))


def test_basescriptrunner_signature_is_26s_then_27s():
    assert positional(BaseScriptRunner) == [
        "script", "script_args", "launch_external_process", "command", "server_expected_format", "framework",
        "params_transfer_type", "executor", "task_pipe", "launcher", "metric_relay", "metric_pipe",
        "pipe_connect_type", "launch_once", "shutdown_timeout", "memory_gc_rounds", "cuda_empty_cache"]
    expected = {"script_args": "", "launch_external_process": False, "command": "python3 -u",
                "server_expected_format": "numpy", "framework": "pytorch", "params_transfer_type": "FULL",
                "executor": None, "task_pipe": None, "launcher": None, "metric_relay": None, "metric_pipe": None,
                "pipe_connect_type": None, "launch_once": True, "shutdown_timeout": 0.0, "memory_gc_rounds": 0,
                "cuda_empty_cache": False, "launch_timeout": 300.0}
    assert {name: default(BaseScriptRunner, name) for name in expected} == expected


def test_the_two_runners_take_framework_in_their_own_positional_place():
    # 2.6's BaseScriptRunner has server_expected_format before framework; ScriptRunner the other way round.
    with no_ignored_warning():
        base = BaseScriptRunner(TRAIN, "", False, "python3 -u", ExchangeFormat.NUMPY, FrameworkType.NUMPY,
                                TransferType.DIFF)
        main = ScriptRunner(TRAIN, "", False, "python3 -u", FrameworkType.NUMPY, ExchangeFormat.NUMPY,
                            TransferType.DIFF)
    for runner in (base, main):
        assert (runner.framework, runner.params_transfer_type) == ("numpy", "DIFF")


def test_subprocesslauncher_signature():
    assert positional(SubprocessLauncher) == ["script", "launch_once", "clean_up_script", "shutdown_timeout"]
    assert default(SubprocessLauncher, "launch_once") is True
    assert default(SubprocessLauncher, "clean_up_script") is None
    assert default(SubprocessLauncher, "shutdown_timeout") == 0.0


def test_simulator_run_signature_is_26s_with_clients_keyword_only():
    assert positional(FedJob.simulator_run) == ["workspace", "n_clients", "threads", "gpu", "log_config"]
    assert "clients" in keyword_only(FedJob.simulator_run)
    for name in ("n_clients", "threads", "gpu", "log_config", "clients"):
        assert default(FedJob.simulator_run, name) is None


RECIPE_ARGS = ["name", "model", "initial_ckpt", "min_clients", "num_rounds", "train_script", "train_args",
               "aggregator", "aggregator_data_kind", "launch_external_process", "command", "server_expected_format",
               "params_transfer_type", "model_persistor", "model_locator", "per_site_config", "launch_once",
               "launch_timeout", "shutdown_timeout", "key_metric", "key_metric_mode", "stop_cond", "patience",
               "best_model_filename", "save_filename", "exclude_vars", "aggregation_weights",
               "server_memory_gc_rounds", "enable_tensor_disk_offload", "client_memory_gc_rounds",
               "cuda_empty_cache"]


def test_fedavgrecipe_is_keyword_only_with_every_nvflare_argument():
    params = inspect.signature(FedAvgRecipe).parameters
    assert positional(FedAvgRecipe) == []
    assert not any(p.kind == p.VAR_POSITIONAL for p in params.values())
    assert set(RECIPE_ARGS) <= set(keyword_only(FedAvgRecipe))
    assert {"framework", "initial_model"} <= set(keyword_only(FedAvgRecipe))  # unified recipe's, 2.7.0's
    for required in ("min_clients", "train_script"):
        assert params[required].default is inspect.Parameter.empty
    expected = {"name": "fedavg", "model": None, "initial_ckpt": None, "num_rounds": 2, "train_args": "",
                "aggregator": None, "launch_external_process": False, "command": "python3 -u",
                "server_expected_format": "numpy", "params_transfer_type": "FULL", "model_persistor": None,
                "model_locator": None, "per_site_config": None, "launch_once": True, "launch_timeout": 300.0,
                "shutdown_timeout": 0.0, "key_metric": "accuracy", "key_metric_mode": None, "stop_cond": None,
                "patience": None, "best_model_filename": None, "save_filename": None, "exclude_vars": None,
                "aggregation_weights": None, "server_memory_gc_rounds": 0, "enable_tensor_disk_offload": False,
                "client_memory_gc_rounds": 0, "cuda_empty_cache": False, "framework": "pytorch"}
    assert {name: default(FedAvgRecipe, name) for name in expected} == expected


def test_algorithm_recipes_have_nvflares_arguments():
    # FedProxRecipe: FedAvgRecipe's arguments and fedprox_mu (NVFlare main)
    assert set(RECIPE_ARGS) | {"fedprox_mu"} <= set(keyword_only(FedProxRecipe))
    assert (default(FedProxRecipe, "name"), default(FedProxRecipe, "fedprox_mu")) == ("fedprox", 0.01)
    assert keyword_only(ScaffoldRecipe) == [
        "name", "model", "initial_ckpt", "min_clients", "num_rounds", "train_script", "train_args",
        "launch_external_process", "command", "server_expected_format", "params_transfer_type",
        "server_memory_gc_rounds", "client_memory_gc_rounds", "torch_cuda_empty_cache"]
    assert keyword_only(FedOptRecipe) == [
        "name", "model", "initial_ckpt", "min_clients", "num_rounds", "train_script", "train_args", "aggregator",
        "launch_external_process", "command", "server_expected_format", "device", "source_model",
        "optimizer_args", "lr_scheduler_args", "server_memory_gc_rounds", "initial_model"]
    assert (default(ScaffoldRecipe, "name"), default(FedOptRecipe, "name")) == ("scaffold", "fedopt")


# NVFlare main's FedEvalRecipe (nvflare/app_opt/pt/recipes/fedeval.py), in its order.
EVAL_RECIPE_ARGS = ["name", "model", "eval_ckpt", "min_clients", "eval_script", "eval_args",
                    "launch_external_process", "command", "server_expected_format", "validation_timeout",
                    "per_site_config", "client_memory_gc_rounds", "cuda_empty_cache"]


def test_fedevalrecipe_is_keyword_only_with_every_nvflare_argument():
    params = inspect.signature(FedEvalRecipe).parameters
    assert positional(FedEvalRecipe) == []
    assert keyword_only(FedEvalRecipe) == [*EVAL_RECIPE_ARGS, "initial_model"]  # and 2.7.0's initial_model
    for required in ("min_clients", "eval_script"):
        assert params[required].default is inspect.Parameter.empty
    # NVFlare requires model and eval_ckpt; flkit evaluates the model's own weights without eval_ckpt.
    expected = {"name": "eval", "model": None, "eval_ckpt": None, "eval_args": "", "launch_external_process": False,
                "command": "python3 -u", "server_expected_format": "numpy", "validation_timeout": 6000,
                "per_site_config": None, "client_memory_gc_rounds": 0, "cuda_empty_cache": False,
                "initial_model": None}
    assert {name: default(FedEvalRecipe, name) for name in expected} == expected
    # NVFlare's EvalController(persistor_id, timeout), with defaults here.
    assert positional(EvalController) == ["persistor_id", "timeout"]
    assert (default(EvalController, "persistor_id"), default(EvalController, "timeout")) == ("persistor", 6000)


def test_envs_are_keyword_only_with_nvflares_names():
    assert positional(SimEnv) == []
    assert set(keyword_only(SimEnv)) >= {"num_clients", "clients", "num_threads", "gpu_config", "log_config",
                                         "workspace_root", "extra"}
    assert {n: default(SimEnv, n) for n in ("num_clients", "clients", "num_threads", "gpu_config", "log_config",
                                             "extra")} == {"num_clients": 0, "clients": None, "num_threads": None,
                                                           "gpu_config": None, "log_config": None, "extra": None}
    assert positional(PocEnv) == []
    assert set(keyword_only(PocEnv)) >= {"num_clients", "clients", "gpu_ids", "use_he", "docker_image",
                                         "project_conf_path", "username", "study", "extra"}
    assert {n: default(PocEnv, n) for n in ("num_clients", "use_he", "project_conf_path", "username", "study")} \
        == {"num_clients": 2, "use_he": False, "project_conf_path": "", "username": "admin@nvidia.com",
            "study": "default"}
    assert positional(ProdEnv)[0] == "startup_kit_location"
    with pytest.raises(TypeError):
        SimEnv(2)  # noqa - keyword-only, as in NVFlare


def test_run_methods():
    assert positional(Run) == ["exec_env", "job_id"]
    assert positional(Run.get_job_id) == []
    assert positional(Run.get_status) == []
    assert positional(Run.abort) == []
    assert positional(Run.get_result) == ["timeout", "clean_up"]
    assert default(Run.get_result, "timeout") == 0.0
    assert default(Run.get_result, "clean_up") is True


def test_recipe_helpers_signatures():
    assert positional(add_experiment_tracking) == ["recipe", "tracking_type", "tracking_config", "client_side",
                                                   "server_side", "clients"]
    assert [default(add_experiment_tracking, n) for n in ("tracking_config", "client_side", "server_side",
                                                          "clients")] == [None, False, True, None]
    assert positional(add_cross_site_evaluation) == ["recipe", "submit_model_timeout", "validation_timeout",
                                                     "participating_clients"]
    assert [default(add_cross_site_evaluation, n) for n in ("submit_model_timeout", "validation_timeout",
                                                            "participating_clients")] == [600, 6000, None]


def test_server_component_signatures_and_defaults():
    assert keyword_only(FedAvg)[:7] == ["num_clients", "num_rounds", "start_round", "persistor_id",
                                        "ignore_result_error", "allow_empty_global_weights", "task_check_period"]
    assert (default(FedAvg, "num_clients"), default(FedAvg, "num_rounds")) == (3, 5)
    assert positional(IntimeModelSelector) == ["weigh_by_local_iter", "aggregation_weights",
                                               "validation_metric_name", "key_metric", "negate_key_metric"]
    assert default(IntimeModelSelector, "key_metric") == "val_accuracy"
    assert positional(CrossSiteModelEval) == [
        "task_check_period", "cross_val_dir", "submit_model_timeout", "validation_timeout", "model_locator_id",
        "formatter_id", "submit_model_task_name", "validation_task_name", "cleanup_models",
        "participating_clients", "wait_for_clients_timeout"]
    assert positional(TBAnalyticsReceiver) == ["tb_folder", "events"]
    assert positional(MLflowReceiver) == ["tracking_uri", "kw_args", "artifact_location", "events",
                                          "buffer_flush_time"]
    assert positional(WandBReceiver) == ["wandb_args", "mode", "events", "process_timeout"]
    assert positional(PTModel)[:3] == ["model", "persistor", "locator"]


# -- 2. every NVFlare argument accepted; no-effect ones named, honoured ones in job.json ----------------


def test_scriptrunner_every_argument(tmp_path):
    with pytest.warns(IgnoredArgumentWarning) as record:
        runner = ScriptRunner(
            script=TRAIN, script_args="--delta 2", launch_external_process=True, command="python3 -u -X utf8",
            framework=FrameworkType.NUMPY, server_expected_format=ExchangeFormat.PYTORCH,
            params_transfer_type=TransferType.DIFF, launch_once=False, launch_timeout=12.5, shutdown_timeout=3.0,
            memory_gc_rounds=2, cuda_empty_cache=True, execution_mode="external_process",
            pipe_connect_type=PipeConnectType.VIA_RELAY, task_pipe=object(),
        )
    assert ignored_args(record) == ["pipe_connect_type", "server_expected_format", "task_pipe"]
    site = export(two_site_job(runner), tmp_path)["sites"]["site-1"]
    assert site == {
        "script": "custom/jobapi_train.py", "script_args": "--delta 2", "launch_external_process": True,
        "command": "python3 -u -X utf8", "framework": "numpy", "params_transfer_type": "DIFF",
        "launch_once": False, "launch_timeout": 12.5, "shutdown_timeout": 3.0, "memory_gc_rounds": 2,
        "cuda_empty_cache": True, "launch_command_line": None, "clean_up_script": None,
    }


def test_scriptrunner_execution_mode_and_no_launch_timeout(tmp_path):
    with no_ignored_warning():
        external = ScriptRunner(TRAIN, execution_mode="external_process", launch_timeout=None)
        inproc = ScriptRunner(TRAIN, execution_mode="in_process")
    assert external.launch_external_process and not inproc.launch_external_process
    assert export(two_site_job(external), tmp_path)["sites"]["site-1"]["launch_timeout"] is None


def test_basescriptrunner_every_argument_with_a_launcher(tmp_path):
    launcher = SubprocessLauncher(script="python3 -u custom/jobapi_train.py --delta 3", launch_once=False,
                                  clean_up_script="python3 -c pass", shutdown_timeout=7.0)
    with pytest.warns(IgnoredArgumentWarning) as record:
        runner = BaseScriptRunner(
            script=TRAIN, script_args="--delta 3", launch_external_process=True, command="python3 -u",
            server_expected_format=ExchangeFormat.PYTORCH, framework=FrameworkType.PYTORCH,
            params_transfer_type=TransferType.DIFF, executor=object(), task_pipe=object(), launcher=launcher,
            metric_relay=object(), metric_pipe=object(), pipe_connect_type=PipeConnectType.VIA_RELAY,
            launch_once=True, shutdown_timeout=0.0, memory_gc_rounds=4, cuda_empty_cache=True,
        )
    assert ignored_args(record) == ["executor", "metric_pipe", "metric_relay", "pipe_connect_type",
                                    "server_expected_format", "task_pipe"]
    site = export(two_site_job(runner), tmp_path)["sites"]["site-1"]
    # The launcher's own settings are the ones used, as NVFlare's given launcher keeps its own.
    assert site["launch_command_line"] == "python3 -u custom/jobapi_train.py --delta 3"
    assert site["clean_up_script"] == "python3 -c pass"
    assert (site["launch_once"], site["shutdown_timeout"]) == (False, 7.0)
    assert (site["params_transfer_type"], site["memory_gc_rounds"], site["cuda_empty_cache"]) == ("DIFF", 4, True)


def test_basescriptrunner_27_arguments_without_a_launcher(tmp_path):
    with no_ignored_warning():
        runner = BaseScriptRunner(TRAIN, launch_external_process=True, launch_once=False, shutdown_timeout=5.0,
                                  memory_gc_rounds=1)
    site = export(two_site_job(runner), tmp_path)["sites"]["site-1"]
    assert (site["launch_once"], site["shutdown_timeout"], site["memory_gc_rounds"]) == (False, 5.0, 1)
    assert site["launch_command_line"] is None and site["command"] == "python3 -u"


def test_launcher_in_process_is_named_and_not_used(tmp_path):
    with pytest.warns(IgnoredArgumentWarning) as record:
        runner = BaseScriptRunner(TRAIN, launcher=SubprocessLauncher("python3 -u custom/x.py", launch_once=False))
    assert ignored_args(record) == ["launcher"]
    assert "in-process" in str(record[0].message)
    site = export(two_site_job(runner), tmp_path)["sites"]["site-1"]
    assert site["launch_command_line"] is None and site["launch_once"] is True


def test_fedavgjob_every_argument(tmp_path):
    with pytest.warns(IgnoredArgumentWarning) as record:
        job = FedAvgJob(initial_model=zero_model(), n_clients=2, num_rounds=3, name="every", min_clients=2,
                        mandatory_clients=["site-1"], key_metric="loss", key_metric_mode="min",
                        convert_to_fed_event=False, analytics_receiver=True)
    assert ignored_args(record) == ["convert_to_fed_event"]
    job.to_clients(ScriptRunner(TRAIN))
    data = export(job, tmp_path)
    workflow = data["workflow"]
    assert data["name"] == "every" and data["n_clients"] == 2
    assert (workflow["num_rounds"], workflow["min_clients"], workflow["mandatory_clients"]) == (3, 2, ["site-1"])
    assert (workflow["key_metric"], workflow["negate_key_metric"]) == ("loss", True)
    assert workflow["tracking"] == [{"type": "tensorboard", "config": {}}]
    assert (tmp_path / "every" / "initial_model.safetensors").is_file()


def test_fedavgjob_key_metric_none_selects_no_model(tmp_path):
    job = FedAvgJob(zero_model(), 2, 1, key_metric=None)
    job.to_clients(ScriptRunner(TRAIN))
    workflow = export(job, tmp_path)["workflow"]
    assert workflow["key_metric"] is None and workflow["tracking"] == []


@pytest.mark.parametrize("mode, negate, expected", [("min", True, True), ("max", False, False),
                                                     (None, True, True), ("min", None, True)])
def test_negate_key_metric_alias_that_agrees(tmp_path, mode, negate, expected):
    job = FedAvgJob(zero_model(), 2, 1, key_metric="loss", key_metric_mode=mode, negate_key_metric=negate)
    job.to_clients(ScriptRunner(TRAIN))
    assert export(job, tmp_path)["workflow"]["negate_key_metric"] is expected


@pytest.mark.parametrize("mode, negate", [("min", False), ("max", True)])
def test_negate_key_metric_alias_that_conflicts(mode, negate):
    with pytest.raises(ConfigError, match="disagree"):
        FedAvgJob(zero_model(), 2, 1, key_metric_mode=mode, negate_key_metric=negate)


def test_basefedjob_every_argument(tmp_path):
    with pytest.warns(IgnoredArgumentWarning) as record:
        job = BaseFedJob(
            initial_model=zero_model(), name="base", min_clients=2, mandatory_clients=["site-2"],
            key_metric="accuracy", validation_json_generator=ValidationJsonGenerator(),
            intime_model_selector=IntimeModelSelector(key_metric="loss", negate_key_metric=True),
            convert_to_fed_event=False, analytics_receiver=MLflowReceiver(tracking_uri="file:///tmp/mlruns"),
            model_persistor=object(), model_locator=object(), metrics_artifact_writer=object(),
        )
    assert ignored_args(record) == ["convert_to_fed_event", "metrics_artifact_writer", "model_locator",
                                    "model_persistor"]
    assert job.to(FedAvg(num_clients=2, num_rounds=2), "server") == "controller"
    job.to(ScriptRunner(TRAIN), "site-1")
    job.to(ScriptRunner(TRAIN), "site-2")
    workflow = export(job, tmp_path)["workflow"]
    assert (workflow["key_metric"], workflow["negate_key_metric"]) == ("loss", True)
    assert workflow["tracking"] == [{"type": "mlflow", "config": {"tracking_uri": "file:///tmp/mlruns"}}]
    assert (workflow["num_rounds"], workflow["mandatory_clients"]) == (2, ["site-2"])


def test_basefedjob_analytics_receiver_true_is_tensorboard(tmp_path):
    job = BaseFedJob(initial_model=zero_model(), analytics_receiver=True)
    job.to(FedAvg(num_clients=1, num_rounds=1), "server")
    job.to_clients(ScriptRunner(TRAIN))
    assert export(job, tmp_path)["workflow"]["tracking"] == [{"type": "tensorboard", "config": {}}]


def test_fedjob_every_argument(tmp_path):
    with pytest.warns(IgnoredArgumentWarning) as record:
        job = FedJob(name="plain", min_clients=2, mandatory_clients=["site-2"], meta_props={"scope": "x"},
                     fail_fast=True)
    assert ignored_args(record) == ["meta_props"]
    job.to(FedAvg(num_clients=2, num_rounds=1), "server")
    job.to(zero_model(), "server")
    job.to(ScriptRunner(TRAIN), "site-1")
    job.to(ScriptRunner(TRAIN), "site-2")
    folder = job.export_job(tmp_path)
    workflow = job_json(folder)["workflow"]
    assert workflow["mandatory_clients"] == ["site-2"]
    assert workflow["min_clients"] is None  # fail_fast: every site of a round must answer
    assert load_job(folder).workflow_config(2).min_clients == 2


def test_fedjob_min_clients_more_than_its_sites_is_refused(tmp_path):
    job = FedJob(min_clients=3)
    job.to(FedAvg(num_clients=2, num_rounds=1), "server")
    job.to(zero_model(), "server")
    job.to(ScriptRunner(TRAIN), "site-1")
    job.to(ScriptRunner(TRAIN), "site-2")
    with pytest.raises(ConfigError, match="min_clients=3"):
        job.export_job(tmp_path)


@pytest.mark.parametrize("ignore_result_error, min_clients", [(False, 2), (True, 1)])
def test_fedjob_with_fedavg_controller(tmp_path, ignore_result_error, min_clients):
    job = FedJob(name="ctl")
    job.to(FedAvg(num_clients=2, num_rounds=3, ignore_result_error=ignore_result_error), "server")
    assert job.to(PTModel(zero_model()), "server") == {"persistor_id": "persistor", "locator_id": "locator"}
    for site in ("site-1", "site-2", "site-3"):
        job.to(ScriptRunner(TRAIN), site)
    workflow = export(job, tmp_path)["workflow"]
    assert (workflow["num_rounds"], workflow["clients_per_round"], workflow["min_clients"]) == (3, 2, min_clients)


def test_fedavg_every_argument(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.warns(IgnoredArgumentWarning) as record:
        controller = FedAvg(
            num_clients=2, num_rounds=3, start_round=1, persistor_id="my_persistor", ignore_result_error=False,
            allow_empty_global_weights=True, task_check_period=0.1, model=model, save_filename="x.pt",
            aggregator=None, stop_cond="accuracy >= 0.9", patience=2, task_name="fit", exclude_vars="bn.*",
            aggregation_weights={"site-1": 2.0}, enable_tensor_disk_offload=True, fedprox_mu=None,
            memory_gc_rounds=2,
        )
    assert ignored_args(record) == ["allow_empty_global_weights", "enable_tensor_disk_offload", "exclude_vars",
                                    "persistor_id", "save_filename", "task_check_period", "task_name"]
    job = FedJob()
    job.to(controller, "server")  # FedAvg(model=...) is the initial model
    job.to(ScriptRunner(TRAIN), "site-1")
    job.to(ScriptRunner(TRAIN), "site-2")
    folder = job.export_job(tmp_path)
    workflow = job_json(folder)["workflow"]
    assert (workflow["start_round"], workflow["clients_per_round"], workflow["min_clients"]) == (1, 2, 2)
    assert (workflow["stop_cond"], workflow["patience"]) == ("accuracy >= 0.9", 2)
    assert workflow["aggregation_weights"] == {"site-1": 2.0}
    assert workflow["server_memory_gc_rounds"] == 2
    saved = load_file(folder / "initial_model.safetensors")
    assert torch.equal(saved["weight"], model.weight.detach()) and torch.equal(saved["bias"], model.bias.detach())


def test_server_components_every_argument(tmp_path):
    with pytest.warns(IgnoredArgumentWarning) as record:
        selector = IntimeModelSelector(weigh_by_local_iter=True, aggregation_weights={"site-1": 2.0},
                                       validation_metric_name="val", key_metric="loss", negate_key_metric=True)
    assert ignored_args(record) == ["aggregation_weights", "validation_metric_name", "weigh_by_local_iter"]
    with pytest.warns(IgnoredArgumentWarning) as record:
        tb = TBAnalyticsReceiver(tb_folder="tbx", events=["analytix_log_stats"])
        mlflow = MLflowReceiver(tracking_uri="file:///tmp/m", kw_args={"experiment_name": "e"},
                                artifact_location="/tmp/a", events=["x"], buffer_flush_time=5)
        wandb = WandBReceiver(wandb_args={"project": "p"}, mode="online", events=["x"], process_timeout=1.0)
    assert ignored_args(record) == ["buffer_flush_time", "events", "events", "events", "process_timeout"]
    with pytest.warns(IgnoredArgumentWarning) as record:
        cse = CrossSiteModelEval(task_check_period=0.1, cross_val_dir="cv", submit_model_timeout=60,
                                 validation_timeout=120, model_locator_id="loc", formatter_id="fmt",
                                 submit_model_task_name="", validation_task_name="val", cleanup_models=True,
                                 participating_clients=["site-1"], wait_for_clients_timeout=30)
        generator = ValidationJsonGenerator(results_dir="r", json_file_name="j.json")
    assert ignored_args(record) == ["cleanup_models", "cross_val_dir", "formatter_id", "json_file_name",
                                    "model_locator_id", "results_dir", "task_check_period", "validation_task_name",
                                    "wait_for_clients_timeout"]
    job = FedJob()
    job.to(FedAvg(num_clients=2, num_rounds=1), "server")
    job.to(zero_model(), "server")
    assert job.to(selector, "server") == "model_selector"
    for receiver in (tb, mlflow, wandb):
        assert job.to(receiver, "server") == "receiver"
    job.to(cse, "server")
    job.to(generator, "server")
    job.to_clients(ScriptRunner(TRAIN))
    workflow = export(job, tmp_path, n_clients=2)["workflow"]
    assert (workflow["key_metric"], workflow["negate_key_metric"]) == ("loss", True)
    assert workflow["tracking"] == [
        {"type": "tensorboard", "config": {"tb_folder": "tbx"}},
        {"type": "mlflow", "config": {"tracking_uri": "file:///tmp/m", "kw_args": {"experiment_name": "e"},
                                      "artifact_location": "/tmp/a"}},
        {"type": "wandb", "config": {"wandb_args": {"project": "p"}, "mode": "online"}},
    ]
    assert workflow["cross_site_eval"] == {"submit_model": False, "participating_clients": ["site-1"],
                                           "submit_model_timeout_s": 60.0, "validation_timeout_s": 120.0}


def test_cross_site_model_eval_defaults_give_full_evaluation(tmp_path):
    job = FedAvgJob(zero_model(), 2, 1)
    job.to(CrossSiteModelEval(), "server")
    job.to_clients(ScriptRunner(TRAIN))
    assert export(job, tmp_path)["workflow"]["cross_site_eval"] == {
        "submit_model": True, "participating_clients": None, "submit_model_timeout_s": 600.0,
        "validation_timeout_s": 6000.0}


def test_ptmodel_every_argument(tmp_path):
    ckpt = tmp_path / "w.safetensors"
    save_file({"weight": torch.full((1, 2), 5.0), "bias": torch.full((1,), 5.0)}, ckpt)
    with pytest.warns(IgnoredArgumentWarning) as record:
        model = PTModel(model=zero_model(), persistor=object(), locator=object(), initial_ckpt=str(ckpt),
                        allow_numpy_conversion=False, best_model_filename="b.pt")
    assert ignored_args(record) == ["allow_numpy_conversion", "best_model_filename", "locator", "persistor"]
    assert torch.equal(model.params["weight"], torch.full((1, 2), 5.0))


def test_fedavgrecipe_every_argument(tmp_path):
    ckpt = tmp_path / "start.safetensors"
    save_file({"weight": torch.full((1, 2), 0.5), "bias": torch.full((1,), 0.5)}, ckpt)
    with pytest.warns(IgnoredArgumentWarning) as record:
        recipe = FedAvgRecipe(
            name="every", model=zero_model(), initial_ckpt=str(ckpt), min_clients=2, num_rounds=3,
            train_script=TRAIN, train_args="--delta 2", aggregator=None, aggregator_data_kind="WEIGHT_DIFF",
            launch_external_process=True, command="python3 -u", framework=FrameworkType.NUMPY,
            server_expected_format=ExchangeFormat.PYTORCH, params_transfer_type=TransferType.DIFF,
            model_persistor=object(), model_locator=object(),
            per_site_config={"site-1": {}, "site-2": {"train_args": "--delta 4", "shutdown_timeout": 9.0}},
            launch_once=False, launch_timeout=30.0, shutdown_timeout=2.0, key_metric="loss", key_metric_mode="min",
            stop_cond="loss <= 0.1", patience=3, best_model_filename="b.pt", save_filename="s.pt",
            exclude_vars="bn.*", aggregation_weights={"site-1": 2.0}, server_memory_gc_rounds=2,
            enable_tensor_disk_offload=True, client_memory_gc_rounds=3, cuda_empty_cache=True,
        )
    assert ignored_args(record) == ["aggregator_data_kind", "best_model_filename", "enable_tensor_disk_offload",
                                    "exclude_vars", "model_locator", "model_persistor", "save_filename",
                                    "server_expected_format"]
    folder = recipe.export(tmp_path / "out")
    data = job_json(folder)
    workflow = data["workflow"]
    assert (workflow["num_rounds"], workflow["clients_per_round"], workflow["min_clients"]) == (3, 2, 2)
    assert (workflow["key_metric"], workflow["negate_key_metric"]) == ("loss", True)
    assert (workflow["stop_cond"], workflow["patience"]) == ("loss <= 0.1", 3)
    assert workflow["aggregation_weights"] == {"site-1": 2.0}
    assert workflow["server_memory_gc_rounds"] == 2
    assert data["clients"] is None and sorted(data["sites"]) == ["site-1", "site-2"]
    one, two = data["sites"]["site-1"], data["sites"]["site-2"]
    for site in (one, two):
        assert (site["launch_external_process"], site["framework"], site["params_transfer_type"]) == \
            (True, "numpy", "DIFF")
        assert (site["launch_once"], site["launch_timeout"], site["memory_gc_rounds"], site["cuda_empty_cache"]) \
            == (False, 30.0, 3, True)
    assert (one["script_args"], one["shutdown_timeout"]) == ("--delta 2", 2.0)
    assert (two["script_args"], two["shutdown_timeout"]) == ("--delta 4", 9.0)
    saved = load_file(folder / "initial_model.safetensors")
    assert torch.equal(saved["weight"], torch.full((1, 2), 0.5))


def test_fedevalrecipe_every_argument(tmp_path):
    ckpt = tmp_path / "saved.pt"
    torch.save({"weight": torch.full((1, 2), 0.5), "bias": torch.full((1,), 0.25)}, ckpt)
    with pytest.warns(IgnoredArgumentWarning) as record:
        recipe = FedEvalRecipe(
            name="every_eval", model=zero_model(), eval_ckpt=str(ckpt), min_clients=2, eval_script=TRAIN,
            eval_args="--delta 2", launch_external_process=True, command="python3 -u -X utf8",
            server_expected_format=ExchangeFormat.PYTORCH, validation_timeout=90,
            per_site_config={"site-1": {}, "site-2": {"eval_args": "--delta 4", "launch_external_process": False}},
            client_memory_gc_rounds=3, cuda_empty_cache=True,
        )
    assert ignored_args(record) == ["server_expected_format"]
    folder = recipe.export(tmp_path / "out")
    data = job_json(folder)
    assert data["workflow"]["mode"] == "evaluate"
    assert (data["workflow"]["num_rounds"], data["workflow"]["min_clients"], data["workflow"]["round_timeout_s"]) \
        == (1, 2, 90.0)
    assert data["eval_ckpt"] == "eval_ckpt/saved.pt" and data["eval_ckpt_source"] == str(ckpt.resolve())
    assert (folder / "eval_ckpt" / "saved.pt").read_bytes() == ckpt.read_bytes()  # the very file
    one, two = data["sites"]["site-1"], data["sites"]["site-2"]
    assert (one["script_args"], one["launch_external_process"], one["command"]) == ("--delta 2", True,
                                                                                  "python3 -u -X utf8")
    assert (two["script_args"], two["launch_external_process"]) == ("--delta 4", False)
    assert all((s["memory_gc_rounds"], s["cuda_empty_cache"]) == (3, True) for s in (one, two))
    params, source = load_job(folder).server_model()
    assert torch.equal(params["weight"], torch.full((1, 2), 0.5)) and source["copied_from"] == str(ckpt.resolve())


def test_fedevalrecipe_27s_initial_model_with_a_checkpoint_attribute(tmp_path):
    ckpt = tmp_path / "pretrained.safetensors"
    save_file({"weight": torch.full((1, 2), 7.0), "bias": torch.zeros(1)}, ckpt)
    model = zero_model()
    model.checkpoint = str(ckpt)  # NVFlare 2.7.0: FedEvalRecipe(initial_model=LitNet(checkpoint=...))
    with no_ignored_warning():
        recipe = FedEvalRecipe(initial_model=model, min_clients=1, eval_script=TRAIN)
    data = job_json(recipe.export(tmp_path / "out"))
    assert data["eval_ckpt"] == "eval_ckpt/pretrained.safetensors" and data["name"] == "eval"
    with pytest.raises(ConfigError, match="model= or initial_model="):
        FedEvalRecipe(model=zero_model(), initial_model=zero_model(), min_clients=1, eval_script=TRAIN)


def test_stop_cond_on_the_key_metric_sets_its_direction():
    with no_ignored_warning():
        lower = quiet_recipe(key_metric="loss", stop_cond="loss < 0.2")
        higher = quiet_recipe(key_metric="accuracy", stop_cond="accuracy >= 0.9")
        other = quiet_recipe(key_metric="accuracy", stop_cond="loss < 0.2")  # another metric: no direction
    assert lower.job.selector.negate_key_metric is True
    assert higher.job.selector.negate_key_metric is False
    assert other.job.selector.negate_key_metric is False


def test_envs_every_argument(tmp_path):
    with no_ignored_warning():
        sim = SimEnv(num_clients=2, clients=["a", "b"], num_threads=1, gpu_config="0", log_config="concise",
                     workspace_root=str(tmp_path), extra={"k": 1})
    assert (sim.clients, sim.num_threads, sim.get_extra_prop("k")) == (["a", "b"], 1, 1)
    with pytest.warns(IgnoredArgumentWarning) as record:
        poc = PocEnv(num_clients=2, clients=["a", "b"], gpu_ids=[0], use_he=False, docker_image="img:1",
                     project_conf_path="project.yml", username="me@example.com", study="s1", extra={})
    assert ignored_args(record) == ["docker_image", "project_conf_path", "study", "username"]
    assert poc.clients == ["a", "b"] and poc.gpu_ids == [0]


def test_no_effect_arguments_at_nvflares_defaults_do_not_warn(tmp_path):
    with no_ignored_warning():
        ScriptRunner(TRAIN, server_expected_format=ExchangeFormat.NUMPY, pipe_connect_type=None, task_pipe=None)
        ScriptRunner(TRAIN, server_expected_format="numpy")
        BaseScriptRunner(TRAIN, server_expected_format="numpy", executor=None, task_pipe=None, launcher=None,
                         metric_relay=None, metric_pipe=None, pipe_connect_type=None)
        FedAvg(num_clients=2, persistor_id="persistor", allow_empty_global_weights=False, task_check_period=0.5,
               save_filename="FL_global_model.pt", task_name="train", exclude_vars=None,
               enable_tensor_disk_offload=False, stop_cond=None, patience=None, fedprox_mu=None, aggregator=None)
        IntimeModelSelector(weigh_by_local_iter=False, aggregation_weights=None,
                            validation_metric_name="initial_metrics")
        TBAnalyticsReceiver(tb_folder="tb_events", events=None)
        MLflowReceiver(events=None, buffer_flush_time=1)
        WandBReceiver(wandb_args={}, events=None, process_timeout=10.0)
        CrossSiteModelEval(task_check_period=0.5, cross_val_dir="cross_site_val", model_locator_id="",
                           formatter_id="", submit_model_task_name="submit_model", validation_task_name="validate",
                           cleanup_models=False, wait_for_clients_timeout=300)
        ValidationJsonGenerator(results_dir="cross_site_val", json_file_name="cross_val_results.json")
        PTModel(zero_model(), persistor=None, locator=None, allow_numpy_conversion=True, best_model_filename=None)
        FedJob(meta_props=None, fail_fast=False)
        BaseFedJob(zero_model(), convert_to_fed_event=None, analytics_receiver=None, model_persistor=None,
                   model_locator=None, metrics_artifact_writer=None)
        FedAvgJob(zero_model(), 2, 1, convert_to_fed_event=None, analytics_receiver=None)
        recipe = quiet_recipe(server_expected_format=ExchangeFormat.NUMPY, model_persistor=None, model_locator=None,
                              stop_cond=None, patience=None, best_model_filename=None, save_filename=None,
                              exclude_vars=None, enable_tensor_disk_offload=False, aggregator=None)
        PocEnv(num_clients=2, use_he=False, docker_image=None, project_conf_path="", username="admin@nvidia.com",
               study="default")
        job = FedJob()
        job.to(ScriptRunner(TRAIN), "site-1", tasks=["*"])
        recipe.export(tmp_path, server_exec_params={}, client_exec_params={})


def test_pipe_connect_type_via_cp_is_nvflares_default_and_does_not_warn():
    with no_ignored_warning():
        ScriptRunner(TRAIN, pipe_connect_type=PipeConnectType.VIA_CP)


def test_aggregator_data_kind_weights_is_nvflares_default_and_does_not_warn():
    with no_ignored_warning():
        quiet_recipe(aggregator_data_kind="WEIGHTS")


# -- 3. where the warning points, and how often it shows --------------------------------------------


def test_warnings_point_at_the_callers_line():
    here = Path(__file__).resolve()
    with pytest.warns(IgnoredArgumentWarning) as record:
        ScriptRunner(TRAIN, pipe_connect_type=PipeConnectType.VIA_RELAY)
        quiet_recipe(exclude_vars="bn.*")  # raised two flkit frames down (recipe -> warn_if_set)
        FedJob().to(ScriptRunner(TRAIN), "site-1", tasks=["train"])
        add_experiment_tracking(quiet_recipe(), "tensorboard", tracking_config={"events": ["x"]})
    assert ignored_args(record) == ["events", "exclude_vars", "pipe_connect_type", "tasks"]
    files = {Path(w.filename).resolve() for w in record if issubclass(w.category, IgnoredArgumentWarning)}
    assert files == {here}


def test_warning_points_at_user_code_in_a_folder_named_like_flkit():
    fake = str(Path(flkit.__file__).resolve().parent) + "_examples/job.py"
    code = compile("ScriptRunner(TRAIN, pipe_connect_type='via_relay')\n", fake, "exec")
    with pytest.warns(IgnoredArgumentWarning) as record:
        exec(code, {"ScriptRunner": ScriptRunner, "TRAIN": TRAIN})
    assert [w.filename for w in record] == [fake]


def test_a_loop_building_one_runner_per_site_warns_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, str(WARN_LOOP)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "sites: site-1,site-2" in proc.stdout
    warning_lines = [line for line in proc.stderr.splitlines() if "IgnoredArgumentWarning" in line]
    line_no = next(i for i, line in enumerate(WARN_LOOP.read_text().splitlines(), 1) if "the warning's line" in line)
    assert warning_lines == [f"{WARN_LOOP}:{line_no}: IgnoredArgumentWarning: ScriptRunner: pipe_connect_type is "
                             "accepted but has no effect in flkit: flkit sites talk to the server over gRPC "
                             "themselves; there is no pipe or relay to configure"]


# -- 4. errors that name their cause ------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: BaseScriptRunner(TRAIN, launcher=object()), "launcher must be a SubprocessLauncher, got object"),
    (lambda: ScriptRunner(TRAIN, execution_mode="bogus"), "execution_mode must be 'in_process' or "
                                                           "'external_process', got 'bogus'"),
    (lambda: ScriptRunner(TRAIN, launch_external_process=True, execution_mode="in_process"),
     "launch_external_process=True and execution_mode='in_process' contradict"),
    (lambda: ScriptRunner(TRAIN, framework=FrameworkType.TENSORFLOW), "framework 'tensorflow' is not supported"),
    (lambda: ScriptRunner(TRAIN, launch_once=False), "launch_once=False .* needs launch_external_process=True"),
    (lambda: ScriptRunner(TRAIN, params_transfer_type="HALF"), "params_transfer_type must be FULL or DIFF"),
    (lambda: FedAvg(fedprox_mu=-0.1), "FedAvg: fedprox_mu must be a finite number > 0"),
    (lambda: FedAvg(aggregator=object()), r"FedAvg\(aggregator=...\): custom aggregators"),
    (lambda: quiet_recipe(aggregator=object()), r"FedAvgRecipe\(aggregator=...\): custom aggregators"),
    (lambda: ProdEnv("no-such-kits"), "kit folder no-such-kits does not exist; create the kits with `flkit provision"),
    (lambda: PocEnv(use_he=True), r"PocEnv\(use_he=True\): homomorphic encryption is not available"),
    (lambda: quiet_recipe(stop_cond="accuracy>=0.9"), "stop_cond must look like 'accuracy >= 0.95'"),
    (lambda: quiet_recipe(key_metric_mode="min", stop_cond="accuracy >= 0.9"),
     "key_metric_mode='min' contradicts stop_cond='accuracy >= 0.9'"),
    (lambda: quiet_recipe(key_metric_mode="median"), "key_metric_mode must be 'max' or 'min'"),
    (lambda: SimEnv(), "SimEnv needs num_clients >= 1 or a list of clients"),
    (lambda: SimEnv(num_clients=3, clients=["a", "b"]), "num_clients=3 but 2 client names"),
    (lambda: SimEnv(clients=["a", "a"]), "names a site twice"),
    (lambda: FedAvgRecipe(min_clients=2, train_script=TRAIN), "needs model=... or initial_ckpt=..."),
    (lambda: quiet_recipe(model=zero_model(), initial_model=zero_model()), "model= or initial_model="),
    (lambda: quiet_recipe(train_script="no/such/script.py"), "script no/such/script.py not found"),
], ids=["launcher", "execution_mode", "mode_conflict", "tensorflow", "launch_once", "transfer_type", "fedprox_mu",
        "aggregator", "recipe_aggregator", "prod_env", "use_he", "stop_cond", "stop_cond_mode", "key_metric_mode",
        "sim_no_clients", "sim_mismatch", "sim_twice", "recipe_no_model", "model_and_initial_model",
        "missing_script"])
def test_errors_name_their_cause(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


@pytest.mark.parametrize("recipe, algorithm", [(CyclicRecipe, "cyclic weight transfer")])
def test_recipes_flkit_lacks_name_their_algorithm(recipe, algorithm):
    with pytest.raises(ConfigError, match=f"{recipe.__name__}: .*{algorithm}.* is not available"):
        recipe(min_clients=2, train_script=TRAIN, model=zero_model())


@pytest.mark.parametrize("site", ["../evil", "a/b", "", ".hidden", "x" * 65, "@bad", "site 1", "..", None])
def test_bad_site_names_are_refused(site):
    with pytest.raises(ConfigError, match="site name .* is not allowed"):
        FedJob().to(ScriptRunner(TRAIN), site)


def test_job_to_errors():
    job = FedJob()
    with pytest.raises(ConfigError, match=r"job.to\(object\(...\), 'server'\): flkit's server takes"):
        job.to(object(), "server")
    with pytest.raises(ConfigError, match="a ScriptRunner runs at a site, not on the server"):
        job.to(ScriptRunner(TRAIN), "server")
    with pytest.raises(ConfigError, match="takes a ScriptRunner .* got FedAvg"):
        job.to(FedAvg(), "site-1")
    with pytest.raises(ConfigError, match="no such file or folder"):
        job.to("no_such_file.txt", "site-1")


def test_export_without_controller_or_model_or_sites(tmp_path):
    no_controller = FedJob()
    no_controller.to(zero_model(), "server")
    no_controller.to_clients(ScriptRunner(TRAIN))
    with pytest.raises(ConfigError, match="has no workflow on the server"):
        no_controller.export_job(tmp_path)
    no_model = FedJob()
    no_model.to(FedAvg(num_clients=1, num_rounds=1), "server")
    no_model.to_clients(ScriptRunner(TRAIN))
    with pytest.raises(ConfigError, match="has no initial model"):
        no_model.export_job(tmp_path)
    no_sites = FedAvgJob(zero_model(), 2, 1)
    with pytest.raises(ConfigError, match="has no sites"):
        no_sites.export_job(tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_tracking_and_cross_site_errors():
    recipe = quiet_recipe()
    with pytest.raises(ConfigError, match=r"tracking_type must be one of \['mlflow', 'tensorboard', 'wandb'\], "
                                          "got 'bogus'"):
        add_experiment_tracking(recipe, "bogus")
    with pytest.raises(ConfigError, match="server_side and client_side are both False"):
        add_experiment_tracking(recipe, "tensorboard", server_side=False, client_side=False)
    with pytest.raises(ConfigError, match="tracking_config for tensorboard: .*'nope'"):
        add_experiment_tracking(recipe, "tensorboard", tracking_config={"nope": 1})
    add_cross_site_evaluation(recipe)
    with pytest.raises(ConfigError, match="cross-site evaluation was already added"):
        add_cross_site_evaluation(recipe)


def test_tracking_client_side_and_cross_site_reach_job_json(tmp_path):
    recipe = quiet_recipe()
    add_experiment_tracking(recipe, "tensorboard", tracking_config={"tb_folder": "tb"}, client_side=True,
                            server_side=False, clients=["site-1"])
    add_experiment_tracking(recipe, "mlflow", tracking_config={"tracking_uri": "file:///tmp/m"})
    add_cross_site_evaluation(recipe, submit_model_timeout=10, validation_timeout=20,
                              participating_clients=["site-2"])
    workflow = job_json(recipe.export(tmp_path))["workflow"]
    assert workflow["tracking"] == [{"type": "mlflow", "config": {"tracking_uri": "file:///tmp/m"}}]
    assert workflow["client_tracking"] == [{"type": "tensorboard", "config": {"tb_folder": "tb"},
                                            "clients": ["site-1"]}]
    assert workflow["cross_site_eval"] == {"submit_model": True, "participating_clients": ["site-2"],
                                           "submit_model_timeout_s": 10.0, "validation_timeout_s": 20.0}


# -- 5. export layout ---------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> Path:
    """A user's project: src/train.py imports local modules (directly, through each other, a package
    with relative imports); unrelated code, data and folders sit beside them."""
    root = tmp_path / "proj"
    files = {
        "src/train.py": "import os\nimport torch\nfrom helper import a\nimport pkg.sub\nfrom pkg import thing\n",
        "src/helper.py": "import util\na = 1\n",
        "src/util.py": "x = 1\n",
        "src/pkg/__init__.py": "from .mod import y\n",
        "src/pkg/mod.py": "from . import deep\ny = 1\n",
        "src/pkg/deep.py": "",
        "src/pkg/sub.py": "",
        "src/pkg/thing.py": "",
        "src/pkg/unused.py": "",
        "src/unrelated.py": "import helper\n",
        "src/data.csv": "a,b\n1,2\n",
        "src/logs/run.py": "",
        "src/checkpoints/model.pt": "",
        "notes.txt": "hello\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    monkeypatch.chdir(root)
    return root


def custom_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder / "custom").as_posix() for p in (folder / "custom").rglob("*") if p.is_file())


def test_script_and_only_its_local_imports_are_exported(project, tmp_path):
    job = FedAvgJob(zero_model(), 2, 1)
    job.to_clients(ScriptRunner("src/train.py"))
    folder = job.export_job(tmp_path / "out")
    assert job_json(folder)["clients"]["script"] == "custom/src/train.py"
    assert custom_files(folder) == ["src/helper.py", "src/pkg/__init__.py", "src/pkg/deep.py", "src/pkg/mod.py",
                                    "src/pkg/sub.py", "src/pkg/thing.py", "src/train.py", "src/util.py"]
    assert (folder / "custom/src/train.py").read_text() == (project / "src/train.py").read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["custom", "initial_model.safetensors", "job.json"]


def test_absolute_script_lands_at_custom_name(project, tmp_path):
    job = FedAvgJob(zero_model(), 2, 1)
    job.to(ScriptRunner(str(project / "src" / "train.py")), "site-1")
    job.to(ScriptRunner("./src/train.py"), "site-2")
    folder = job.export_job(tmp_path / "out")
    sites = job_json(folder)["sites"]
    assert sites["site-1"]["script"] == "custom/train.py"
    assert sites["site-2"]["script"] == "custom/src/train.py"
    assert {"train.py", "helper.py", "util.py", "pkg/mod.py"} <= set(custom_files(folder))
    assert load_job(folder).resolve_sites()["site-1"].script == "custom/train.py"


def test_two_scripts_with_one_destination_are_refused(project, tmp_path):
    other = tmp_path / "other" / "train.py"
    other.parent.mkdir()
    other.write_text("print('other')\n")
    job = FedAvgJob(zero_model(), 2, 1)
    job.to(ScriptRunner(str(project / "src" / "train.py")), "site-1")
    job.to(ScriptRunner(str(other)), "site-2")
    with pytest.raises(ConfigError, match="would both be custom/train.py"):
        job.export_job(tmp_path / "out")


def test_two_local_modules_with_one_destination_are_refused(tmp_path, monkeypatch):
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder, script, text in ((mine, "train.py", "a = 'mine'\n"), (theirs, "run.py", "a = 'theirs'\n")):
        folder.mkdir()
        (folder / script).write_text("from helper import a\n")
        (folder / "helper.py").write_text(text)
    monkeypatch.chdir(mine)
    job = FedAvgJob(zero_model(), 2, 1)
    job.to(ScriptRunner("train.py"), "site-1")
    job.to(ScriptRunner(str(theirs / "run.py")), "site-2")
    with pytest.raises(ConfigError, match=r"would both be custom/helper\.py"):
        job.export_job(tmp_path / "out")


def test_job_to_a_file_copies_it_into_custom(project, tmp_path):
    job = FedAvgJob(zero_model(), 2, 1)
    job.to_clients(ScriptRunner("src/train.py"))
    assert job.to("notes.txt", "site-1") is None
    job.to("src/logs", "@ALL")
    folder = job.export_job(tmp_path / "out")
    assert (folder / "custom" / "notes.txt").read_text() == "hello\n"
    assert (folder / "custom" / "logs" / "run.py").is_file()


def _exported(tmp_path: Path) -> Path:
    job = FedAvgJob(zero_model(), 2, 1, name="victim")
    job.to(ScriptRunner(TRAIN), "site-1")
    job.to(ScriptRunner(TRAIN), "site-2")
    return job.export_job(tmp_path / "jobs")


def test_load_job_refuses_a_script_outside_the_job_folder(tmp_path):
    folder = _exported(tmp_path)
    outside = tmp_path / "outside" / "evil.py"
    outside.parent.mkdir()
    outside.write_text("print('evil')\n")
    for script in ("../../outside/evil.py", str(outside)):
        data = job_json(folder)
        data["sites"]["site-1"]["script"] = script
        (folder / "job.json").write_text(json.dumps(data))
        assert (folder / script).resolve() == outside.resolve()
        with pytest.raises(ConfigError, match="outside the job folder"):
            load_job(folder)


def test_load_job_refuses_a_bad_site_name(tmp_path):
    folder = _exported(tmp_path)
    data = job_json(folder)
    data["sites"]["../x"] = data["sites"].pop("site-1")
    (folder / "job.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="site name '../x' is not allowed"):
        load_job(folder)


def test_load_job_accepts_what_export_wrote(tmp_path):
    job = load_job(_exported(tmp_path))
    assert sorted(job.resolve_sites()) == ["site-1", "site-2"]
    assert set(job.initial_params()) == {"weight", "bias"}


# -- 6. recipe models, checkpoints, per-site config, and a run ---------------------------------------------


@pytest.fixture
def tiny_module(tmp_path: Path, monkeypatch) -> Iterator[str]:
    name = "jobapi_tinynet"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(
        "import torch\n\n\nclass TinyNet(torch.nn.Module):\n"
        "    def __init__(self, n_in=2, n_out=1):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(n_in, n_out)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


@pytest.mark.parametrize("key", ["class_path", "path"])
def test_recipe_model_as_class_path_is_built_now(tmp_path, tiny_module, key):
    recipe = quiet_recipe(model={key: f"{tiny_module}.TinyNet", "args": {"n_in": 3, "n_out": 4}})
    folder = recipe.export(tmp_path / "out")
    saved = load_file(folder / "initial_model.safetensors")
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"fc.weight": (4, 3), "fc.bias": (4,)}
    text = (folder / "job.json").read_text()
    assert tiny_module not in text and "class_path" not in text and "TinyNet" not in text
    assert not (folder / "custom" / f"{tiny_module}.py").exists()


def test_recipe_model_class_path_that_does_not_import(tiny_module):
    with pytest.raises(ConfigError, match="cannot be imported"):
        quiet_recipe(model={"class_path": f"{tiny_module}.Nope"})


def test_initial_model_is_270s_name(tmp_path):
    model = torch.nn.Linear(2, 1)
    folder = quiet_recipe(initial_model=model).export(tmp_path)
    assert torch.equal(load_file(folder / "initial_model.safetensors")["weight"], model.weight.detach())


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((1, 2), value), "bias": torch.full((1,), value)}


@pytest.mark.parametrize("kind", ["safetensors", "state_dict", "nvflare", "no_model"])
def test_initial_ckpt_gives_its_weights(tmp_path, kind):
    path = tmp_path / ("w.safetensors" if kind == "safetensors" else "w.pt")
    if kind == "safetensors":
        save_file(_state(3.0), path)
    elif kind == "state_dict":
        torch.save(_state(3.0), path)
    else:  # NVFlare's PTFileModelPersistor file
        torch.save({"model": _state(3.0), "meta_props": {"round": 4}, "train_conf": {"lr": 0.1}}, path)
    kwargs = {} if kind == "no_model" else {"model": torch.nn.Linear(2, 1)}
    folder = quiet_recipe(initial_ckpt=str(path), **kwargs).export(tmp_path / "out")
    saved = load_file(folder / "initial_model.safetensors")
    assert sorted(saved) == ["bias", "weight"]
    assert all(torch.equal(saved[k], v) for k, v in _state(3.0).items())


@pytest.mark.parametrize("content, message", [
    ({"model": _state(1.0), "extra": _Opaque()}, "is not a tensors-only torch checkpoint"),
    ({"model": {"weight": torch.ones(1, 2), "bias": 1.0}}, "does not hold a state_dict of tensors"),
    ([torch.ones(1)], "does not hold a state_dict of tensors"),
], ids=["pickled_object", "non_tensor_value", "not_a_dict"])
def test_initial_ckpt_that_is_not_tensors_only_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(ConfigError, match=message):
        quiet_recipe(initial_ckpt=str(path))


def test_initial_ckpt_missing_or_lacking_tensors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        quiet_recipe(initial_ckpt=str(tmp_path / "nope.pt"))
    path = tmp_path / "half.safetensors"
    save_file({"weight": torch.ones(1, 2)}, path)
    with pytest.raises(ConfigError, match=r"lacks \['bias'\]"):
        quiet_recipe(model=torch.nn.Linear(2, 1), initial_ckpt=str(path))


@pytest.mark.parametrize("how", ["argument", "function", "method"])
def test_per_site_config_gives_per_site_runners(tmp_path, how):
    config = {"hospital-a": {"train_args": "--delta 2"},
              "hospital-b": {"train_args": "--delta 5", "launch_external_process": True, "command": "python3",
                             "params_transfer_type": "DIFF", "launch_timeout": 20.0}}
    if how == "argument":
        recipe = quiet_recipe(train_args="--delta 1", per_site_config=config)
    else:
        recipe = quiet_recipe(train_args="--delta 1")
        set_per_site_config(recipe, config) if how == "function" else recipe.set_per_site_config(config)
    data = job_json(recipe.export(tmp_path))
    assert data["clients"] is None
    a, b = data["sites"]["hospital-a"], data["sites"]["hospital-b"]
    assert (a["script_args"], a["launch_external_process"], a["params_transfer_type"]) == ("--delta 2", False, "FULL")
    assert (b["script_args"], b["launch_external_process"], b["command"], b["params_transfer_type"],
            b["launch_timeout"]) == ("--delta 5", True, "python3", "DIFF", 20.0)
    assert sorted(load_job(tmp_path / "fedavg").resolve_sites()) == ["hospital-a", "hospital-b"]


def test_per_site_config_errors():
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['lr'\]"):
        quiet_recipe(per_site_config={"site-1": {"lr": 0.1}, "site-2": {}})
    with pytest.raises(ConfigError, match="names 1 site.*min_clients=2"):
        set_per_site_config(quiet_recipe(), {"site-1": {}})
    with pytest.raises(ConfigError, match="site name '../x' is not allowed"):
        set_per_site_config(quiet_recipe(), {"../x": {}, "site-2": {}})
    with pytest.raises(ConfigError, match="framework 'tensorflow' is not supported"):
        set_per_site_config(quiet_recipe(), {"site-1": {"framework": "tensorflow"}, "site-2": {}})


def _round_state(workspace: Path) -> dict:
    return json.loads((workspace / "server" / "round_state.json").read_text())


def test_exported_recipe_runs_with_flkit_simulate(tmp_path):
    recipe = FedAvgRecipe(name="jobapi", model=zero_model(), min_clients=2, num_rounds=2, train_script=TRAIN,
                          train_args="--delta 1")
    add_cross_site_evaluation(recipe)
    folder = recipe.export(tmp_path / "jobs")
    assert folder == tmp_path / "jobs" / "jobapi"
    loaded = load_job(folder)
    assert loaded.clients is not None and loaded.clients.script == "custom/jobapi_train.py"
    ws = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(folder), "-n", "2", "-w", str(ws)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = _round_state(ws)
    assert state["status"] == "completed"
    assert [r["task"] for r in state["history"]] == ["train", "train"]
    final = load_file(ws / "server" / "FL_global_model.safetensors")
    # zeros + 1 per round at both sites, averaged: 2 after two rounds.
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in final.values())
    matrix = json.loads((ws / "server" / "cross_site_val" / "cross_val_results.json").read_text())
    assert sorted(matrix) == ["site-1", "site-2"]
    assert {"site-1", "site-2"} <= set(matrix["site-1"])


def test_recipe_execute_in_simenv_returns_a_run(tmp_path):
    recipe = quiet_recipe(name="simrun", num_rounds=1)
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=str(tmp_path)))
    assert run.get_job_id() == "simrun"
    assert run.get_status() == "FINISHED:COMPLETED"
    result = run.get_result()
    assert result == str(tmp_path / "simrun")
    assert _round_state(Path(result))["status"] == "completed"
    assert run.get_result(timeout=1.0, clean_up=False) == result  # cached after stop
    run.abort()  # nothing to abort any more; must not fail
