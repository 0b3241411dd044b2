"""The simulator's own options as the README states them: gpu strings, log_config, and a
workspace that an earlier run wrote starting clean (and nothing else being removed)."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch

from flkit.errors import ConfigError
from flkit.job import FedAvgJob, ScriptRunner
from flkit.sim.simulator import apply_log_config, parse_gpus

from conftest import SCRIPTS

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("gpu", ["0,x", "[0,1", "[0,1],2", "0,,1", "gpu0"])
def test_a_malformed_gpu_string_is_an_error_naming_it(gpu):
    with pytest.raises(ConfigError, match="gpu must be device ids like '0,1' or groups like"):
        parse_gpus(gpu)


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
@pytest.mark.parametrize("gpu", ["0", "0,1", "[0,1],[2,3]"])
def test_gpu_without_cuda_warns_and_runs_on_the_cpu(gpu):
    with pytest.warns(UserWarning, match="CUDA is not available on this machine; the sites run on the CPU"):
        assert parse_gpus(gpu) == []


@pytest.fixture
def flkit_logging():
    logger, root = logging.getLogger("flkit"), logging.getLogger()
    saved = (logger.level, logger.handlers[:], logger.propagate, root.level, root.handlers[:])
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:], logger.propagate = saved[1], saved[2]
    root.setLevel(saved[3])
    root.handlers[:] = saved[4]


@pytest.mark.parametrize(("config", "level"), [("DEBUG", logging.DEBUG), ("warning", logging.WARNING),
                                               ("verbose", logging.DEBUG), ("full", logging.INFO),
                                               ("concise", logging.WARNING), ("msg_only", logging.WARNING)])
def test_log_config_takes_levels_and_nvflare_modes(flkit_logging, config, level):
    apply_log_config(config)
    assert flkit_logging.level == level


def test_log_config_takes_a_json_dictconfig_file(flkit_logging, tmp_path):
    path = tmp_path / "log.json"
    path.write_text(json.dumps({"version": 1, "incremental": False, "disable_existing_loggers": False,
                                "loggers": {"flkit": {"level": "ERROR"}}}))
    apply_log_config(str(path))
    assert flkit_logging.level == logging.ERROR
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a usable logging dictConfig"):
        apply_log_config(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="no level, no NVFlare log mode"):
        apply_log_config("chatty")


def _job() -> FedAvgJob:
    job = FedAvgJob(torch.nn.Linear(2, 2), n_clients=2, num_rounds=1, name="rerun", key_metric=None)
    job.to_clients(ScriptRunner(str(SCRIPTS / "api_surface.py")))  # logs one record per task
    return job


def test_a_workspace_an_earlier_run_wrote_starts_clean(tmp_path):
    ws = tmp_path / "ws"
    (ws / "notes").mkdir(parents=True)
    (ws / "notes" / "mine.txt").write_text("keep me")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _job().simulator_run(ws, quiet=True)
        (ws / "site-1" / "leftover.txt").write_text("from run 1")
        _job().simulator_run(ws, quiet=True)
    for site in ("site-1", "site-2"):  # only the second run's records, not both runs' appended
        assert len((ws / site / "tracking.jsonl").read_text().splitlines()) == 1
    assert not (ws / "site-1" / "leftover.txt").exists()
    assert (ws / "notes" / "mine.txt").read_text() == "keep me"  # a folder flkit did not write stays


def test_a_job_folder_inside_a_site_folder_is_refused(tmp_path):
    from flkit.sim.simulator import simulate

    job_dir = _job().export_job(tmp_path / "ws" / "site-1")
    with pytest.raises(ConfigError, match="lies in <workspace>/site-1, which the simulator writes"):
        simulate(job_dir, tmp_path / "ws", quiet=True)
    assert (job_dir / "job.json").is_file()
