"""The simulator's worker backends: the same job on threads, processes and Ray, with more sites than
workers; isolation of site-tasks on the process backends; a worker killed mid-task."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from flkit.errors import ConfigError
from flkit.job import FedAvgJob, ScriptRunner
from flkit.server.persistor import load_params
from flkit.sim.site_task import task_seed

# Each site answers with params + 1; it reads its per-round config from the meta, writes a file in
# its working directory, and reports a helper module's global counter and a draw of its RNG.
SCRIPT = """
import os
import random

import counter_helper

import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    counter_helper.COUNT += 1
    with open("seen.txt", "a") as f:
        f.write(f"{flare.get_site_name()} {model.current_round}\\n")
    if os.environ.get("KILL_SITE") == flare.get_site_name() and model.current_round == 0:
        os.kill(os.getpid(), 9)  # SIGKILL of the worker process, mid-task
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()},
                             metrics={"count": counter_helper.COUNT, "draw": random.random()}))
"""
HELPER = "COUNT = 0\n"


def _job(tmp_path, n_clients: int, num_rounds: int = 2, **kwargs) -> FedAvgJob:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "site.py").write_text(SCRIPT)
    (src / "counter_helper.py").write_text(HELPER)
    job = FedAvgJob(name="backends", initial_model={"w": torch.zeros(3, 3)}, n_clients=n_clients,
                    num_rounds=num_rounds, key_metric=None, final_validation=False, seed=7, **kwargs)
    job.to_clients(ScriptRunner(script=str(src / "site.py")))
    return job


@pytest.mark.parametrize("backend", ["threads", "processes", pytest.param("ray", marks=pytest.mark.slow)])
def test_every_backend_runs_more_sites_than_workers_to_the_exact_model(tmp_path, monkeypatch, backend):
    if backend == "ray":
        pytest.importorskip("ray", reason='the Ray backend needs the flkit[ray] extra (part of "dev")')
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    result = _job(tmp_path, n_clients=5).simulator_run(tmp_path / "ws", threads=2, quiet=True, backend=backend)
    assert [sorted(r.metrics) for r in result.rounds] == [[f"site-{i}" for i in range(1, 6)]] * 2
    assert torch.equal(load_params(result.global_model_path)["w"], torch.full((3, 3), 2.0))
    if backend == "threads":  # the sites share the simulator's working directory
        assert len((tmp_path / "cwd" / "seen.txt").read_text().splitlines()) == 10
    else:  # each site in its own folder, whichever worker ran it
        assert not (tmp_path / "cwd" / "seen.txt").exists()
        for i in range(1, 6):
            lines = (tmp_path / "ws" / f"site-{i}" / "seen.txt").read_text().splitlines()
            assert lines == [f"site-{i} 0", f"site-{i} 1"]


def test_isolated_site_tasks_share_no_module_globals_and_draw_from_their_own_seed(tmp_path):
    result = _job(tmp_path, n_clients=6).simulator_run(tmp_path / "ws", threads=2, quiet=True)
    for record in result.rounds:
        for site, metrics in record.metrics.items():
            assert metrics["count"] == 1, (record.round, site, metrics)  # fresh helper module every task
            expected = random.Random(task_seed(7, site, record.round, "train")).random()
            assert metrics["draw"] == pytest.approx(expected)


def test_threads_share_module_globals_which_is_why_processes_are_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the threads backend leaves the working directory as it is
    monkeypatch.delitem(sys.modules, "counter_helper", raising=False)  # an earlier test's sites counted too
    result = _job(tmp_path, n_clients=6).simulator_run(tmp_path / "ws", threads=2, quiet=True, backend="threads")
    counts = [m["count"] for r in result.rounds for m in r.metrics.values()]
    # One helper module for all twelve site-tasks: the last to answer saw every increment.
    assert len(counts) == 12 and max(counts) == 12


def test_a_worker_killed_mid_task_fails_only_that_site_task(tmp_path, monkeypatch):
    monkeypatch.setenv("KILL_SITE", "site-2")
    job = _job(tmp_path, n_clients=4, min_clients=3)
    result = job.simulator_run(tmp_path / "ws", threads=2, quiet=True)
    first, second = result.rounds
    assert sorted(first.metrics) == ["site-1", "site-3", "site-4"]
    assert list(first.failed) == ["site-2"] and "SIGKILL" in first.failed["site-2"], first.failed
    assert sorted(second.metrics) == ["site-1", "site-2", "site-3", "site-4"]  # the site itself lives on
    assert torch.equal(load_params(result.global_model_path)["w"], torch.full((3, 3), 2.0))
    state = json.loads((tmp_path / "ws" / "server" / "round_state.json").read_text())
    assert state["status"] == "completed"


def test_with_no_more_sites_than_workers_each_script_runs_once_for_the_job(tmp_path):
    result = _job(tmp_path, n_clients=2, num_rounds=3).simulator_run(tmp_path / "ws", threads=2, quiet=True)
    counts = {site: [r.metrics[site]["count"] for r in result.rounds] for site in ("site-1", "site-2")}
    assert counts == {"site-1": [1, 2, 3], "site-2": [1, 2, 3]}  # one script, one module, for the whole job


def test_flkit_simulate_takes_the_backend_and_the_workers(tmp_path):
    job_dir = _job(tmp_path, n_clients=3).export_job(tmp_path / "jobs")
    done = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(job_dir), "-w", str(tmp_path / "ws"),
                           "--backend", "processes", "--workers", "2"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 site(s) on processes backend, 2 worker(s)" in done.stdout
    assert (tmp_path / "ws" / "site-3" / "seen.txt").read_text().splitlines() == ["site-3 0", "site-3 1"]
    bad = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(job_dir), "--backend", "fibers"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'fibers' is not one of 'processes', 'threads', 'ray'" in bad.stderr


def test_a_backend_that_does_not_exist_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="backend must be one of processes, threads, ray, got 'fibers'"):
        _job(tmp_path, n_clients=3).simulator_run(tmp_path / "ws", quiet=True, backend="fibers")


def test_a_script_that_calls_shutdown_at_its_end_is_no_failure(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "polite.py").write_text(
        "import flkit as flare\n\nflare.init()\nwhile flare.is_running():\n    model = flare.receive()\n"
        "    flare.send(flare.FLModel(params=model.params, metrics={'accuracy': 0.5}))\nflare.shutdown()\n")
    job = FedAvgJob(name="polite", initial_model={"w": torch.zeros(2)}, n_clients=3, num_rounds=2, key_metric=None)
    job.to_clients(ScriptRunner(script=str(tmp_path / "src" / "polite.py")))
    for backend in ("processes", "threads"):
        result = job.simulator_run(tmp_path / backend, threads=2, quiet=True, backend=backend)
        assert result.site_errors == {}, (backend, result.site_errors)
