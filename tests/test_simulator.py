"""End to end through the simulator: real gRPC server on loopback, sites running real scripts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flkit.errors import JobFailedError
from flkit.job import FedAvgJob, ScriptRunner
from flkit.server.persistor import load_params

from conftest import REPO, SCRIPTS, with_flkit_import

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet, accuracy, load, train  # noqa: E402


@pytest.mark.slow
def test_nvflare_script_runs_with_only_its_import_changed(tmp_path, monkeypatch):
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_fl.py", tmp_path / "user_code")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    job = FedAvgJob(name="nvflare_compat", initial_model=SmallNet(), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(script), script_args="--epochs 2"))
    result = job.simulator_run(tmp_path / "ws", quiet=True)

    assert result.ok
    assert [r.task for r in result.rounds] == ["train", "train", "train"]  # NVFlare's FedAvg: no extra task
    assert all(len(r.metrics) == 2 for r in result.rounds)
    # Real learning: the last received global model, scored by the sites, beats chance by far.
    assert result.rounds[-1].score > 0.85
    assert result.best_round == max(result.rounds, key=lambda r: r.score).round
    # The best model file is the model that scored best: check it on the test set ourselves.
    best = SmallNet()
    best.load_state_dict(load_params(result.best_model_path))
    _, _, test_x, test_y = load()
    assert abs(accuracy(best, test_x, test_y) - result.best_score) < 1e-6
    # Integer buffers stay integer through aggregation.
    assert load_params(result.global_model_path)["bn.num_batches_tracked"].dtype == torch.int64
    # SummaryWriter.add_scalar recorded each site's losses locally.
    for site in ("site-1", "site-2"):
        records = [json.loads(line) for line in (tmp_path / "ws" / site / "tracking.jsonl").read_text().splitlines()]
        assert records and all(r["key"] == "loss" and r["site"] == site for r in records)


def test_one_site_fl_equals_local_training_bit_for_bit(tmp_path):
    torch.manual_seed(7)
    initial = SmallNet()
    reference = SmallNet()
    reference.load_state_dict(initial.state_dict())
    train_x, train_y, _, _ = load()
    train(reference, train_x, train_y, epochs=1, seed=123)

    job = FedAvgJob(name="bitexact", initial_model=initial, n_clients=1, num_rounds=1, final_validation=False)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "one_round.py")))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    fl = load_params(result.global_model_path)
    for name, value in reference.state_dict().items():
        assert fl[name].dtype == value.dtype
        assert torch.equal(fl[name], value), f"{name} differs"


def test_script_exception_fails_job_with_traceback(tmp_path):
    job = FedAvgJob(name="crash", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"), script_args="--crash_round 1"))
    with pytest.raises(JobFailedError, match="site-2: script crash_in_round.py raised RuntimeError: deliberate"):
        job.simulator_run(tmp_path / "ws", quiet=True)
    state = json.loads((tmp_path / "ws" / "server" / "round_state.json").read_text())
    assert state["status"] == "failed" and state["completed_rounds"] == 1


def test_cli_simulate_exits_nonzero_and_shows_traceback(tmp_path):
    job = FedAvgJob(name="crash_cli", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=2)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"), script_args="--crash_round 0"))
    job_dir = job.export_job(tmp_path / "jobs")
    proc = subprocess.run(
        [sys.executable, "-m", "flkit.cli", "simulate", str(job_dir), "-w", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" in out and 'raise RuntimeError(f"deliberate failure' in out
    assert "job failed" in out


def test_cli_simulate_can_change_the_number_of_sites(tmp_path):
    job = FedAvgJob(name="resize", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=1)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"), script_args="--crash_round 99"))
    job_dir = job.export_job(tmp_path / "jobs")
    proc = subprocess.run(
        [sys.executable, "-m", "flkit.cli", "simulate", str(job_dir), "-n", "3", "-w", str(tmp_path / "ws")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = json.loads((tmp_path / "ws" / "server" / "round_state.json").read_text())
    assert sorted(state["history"][0]["metrics"]) == ["site-1", "site-2", "site-3"]


def test_script_that_never_joins_fails_the_job_at_once(tmp_path):
    job = FedAvgJob(name="noinit", initial_model=torch.nn.Linear(4, 2), n_clients=1, num_rounds=1)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "no_init.py")))
    # The default join timeout is 300 s; the failure must come from the runner's report, not from it.
    with pytest.raises(JobFailedError, match="ended without calling flkit.init"):
        job.simulator_run(tmp_path / "ws", quiet=True)


def test_client_api_answers_during_a_job(tmp_path):
    job = FedAvgJob(name="api", initial_model=torch.nn.Linear(2, 2), n_clients=2, num_rounds=2, final_validation=True)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "api_surface.py"), script_args="--flag 'two words'"))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok
    for site in ("site-1", "site-2"):
        seen = json.loads((tmp_path / "ws" / site / "api.json").read_text())
        assert seen["argv"] == ["--flag", "two words"]  # each site thread has its own argv
        assert seen["info"]["site_name"] == site and seen["info"]["num_sites"] == 2
        assert seen["job_id"] == seen["info"]["job_id"] and seen["job_id"].startswith("api-")
        assert "token" not in seen["config"] and seen["config"]["params_transfer_type"] == "FULL"
        assert seen["tasks"] == [
            ["train", True, False, False, 0, 2, "FULL"],
            ["train", True, False, False, 1, 2, "FULL"],
            ["validate", False, True, False, 2, 2, "FULL"],
        ]
        logged = [json.loads(x) for x in (tmp_path / "ws" / site / "tracking.jsonl").read_text().splitlines()]
        assert [r["value"] for r in logged] == [0, 1, 2]
