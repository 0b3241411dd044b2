"""Resume after a crash: kill -9 of `flkit server` mid-round, restart with --resume, and the job
ends with the very model an uninterrupted run makes (no round lost, none counted twice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flkit.deploy.provision import provision
from flkit.job import FedAvgJob, ScriptRunner
from flkit.runner.ports import free_port

from conftest import REPO, SCRIPTS, finish

ROUNDS = 5
HOLD_ROUND = 2
FLKIT = [sys.executable, "-m", "flkit.cli"]


def _job(tmp_path: Path, hold_dir: Path | None, per_task: bool = False) -> Path:
    torch.manual_seed(0)
    job = FedAvgJob(name="resume", initial_model=torch.nn.Linear(4, 3), n_clients=2, num_rounds=ROUNDS)
    args = "" if hold_dir is None else f"--hold_round {HOLD_ROUND} --hold_dir {hold_dir}"
    launch = {"launch_external_process": True, "launch_once": False} if per_task else {}
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "round_site_update.py"), script_args=args, **launch))
    return job.export_job(tmp_path / ("held" if hold_dir else "plain"))


def _kits(tmp_path: Path, port: int) -> Path:
    project = tmp_path / "project.yml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    project.write_text(json.dumps({"name": "resume", "server": {"host": "localhost", "port": port},
                                   "sites": ["site-1", "site-2"]}))
    provision(project, tmp_path / "kits")
    return tmp_path / "kits"


def _server(job_dir: Path, kits: Path, port: int, workspace: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*FLKIT, "server", str(job_dir), "--host", "127.0.0.1", "--port", str(port),
                             "--kit", str(kits / "server"), "-w", str(workspace), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _clients(job_dir: Path, kits: Path, port: int, tmp_path: Path) -> list[subprocess.Popen]:
    return [subprocess.Popen([*FLKIT, "client", str(job_dir), "--kit", str(kits / site), "--server",
                              f"127.0.0.1:{port}", "-w", str(tmp_path / site), "--connect-timeout", "120"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for site in ("site-1", "site-2")]


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{paths} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("per_task", [False, True], ids=["script-once", "launch-per-task"])
def test_kill_9_of_the_server_mid_round_and_resume_gives_the_uninterrupted_model(tmp_path, per_task):
    """With launch_once=False each task is a launch of its own: a launch that answered a round the
    resumed server runs again (its model was not on disk yet) is launched again, not failed."""
    # The uninterrupted run.
    port = free_port()
    kits = _kits(tmp_path / "a", port)
    job_dir = _job(tmp_path / "a", None)
    server = _server(job_dir, kits, port, tmp_path / "a" / "server")
    outs = finish([server, *_clients(job_dir, kits, port, tmp_path / "a")])
    assert server.returncode == 0, outs[0]
    expected = load_file(tmp_path / "a" / "server" / "FL_global_model.safetensors")

    # The same job, its server killed with SIGKILL while round 2's results are held back by the sites.
    port = free_port()
    kits = _kits(tmp_path / "b", port)
    hold = tmp_path / "b" / "hold"
    hold.mkdir(parents=True)
    job_dir = _job(tmp_path / "b", hold, per_task)
    workspace = tmp_path / "b" / "server"
    server = _server(job_dir, kits, port, workspace)
    clients = _clients(job_dir, kits, port, tmp_path / "b")
    _wait_for([hold / "site-1.held", hold / "site-2.held"], server)
    _wait_for([workspace / "round_state.json"], server)  # the writer thread saved a round (it lags under load)
    os.kill(server.pid, signal.SIGKILL)
    server.communicate()
    state = json.loads((workspace / "round_state.json").read_text())
    # The writer thread may not have saved the last round(s) yet (it coalesces them): the resume goes
    # on from the newest round on disk and runs the later ones again.
    saved = state["global_model_round"]
    assert state["status"] == "running" and saved <= HOLD_ROUND - 1 and state["completed_rounds"] == saved + 1

    # A plain restart would overwrite the interrupted run: refused, with the way out.
    refused = subprocess.run([*FLKIT, "server", str(job_dir), "--port", str(port), "--kit", str(kits / "server"),
                              "-w", str(workspace)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--resume" in refused.stderr

    server = _server(job_dir, kits, port, workspace, "--resume")
    (hold / "go").touch()  # the sites send round 2's results to the restarted server
    outs = finish([server, *clients])
    assert server.returncode == 0, outs[0]
    assert [c.returncode for c in clients] == [0, 0], outs[1:]
    assert f"resumed after round {saved}" in outs[0]

    state = json.loads((workspace / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == ROUNDS
    assert [r["round"] for r in state["history"]] == list(range(ROUNDS))  # none lost, none twice
    final = load_file(workspace / "FL_global_model.safetensors")
    assert final.keys() == expected.keys()
    for name in expected:  # bit for bit
        assert torch.equal(final[name], expected[name]), name


def _model(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


@pytest.mark.parametrize("crash", ["after_models", "after_state", "after_rename"])
def test_a_crash_anywhere_in_a_save_leaves_one_consistent_round(tmp_path, crash):
    """The writer's steps are: models under staged names, the round state, the names. Stopping after
    any step leaves a folder load_saved_run reads as one round: the old one, or the new one."""
    from flkit.server.persistor import (
        BEST_MODEL_FILE,
        GLOBAL_MODEL_FILE,
        Persistor,
        load_saved_run,
        save_params,
        staged_path,
        write_json,
    )

    persistor = Persistor(tmp_path)
    persistor.save_best(_model(0.5), 1, "accuracy", 0.9)
    persistor.save_global(_model(1.0), 1, {"job_id": "j", "completed_rounds": 2, "history": []})
    persistor.close()
    # round 2's save, stopped part-way (what the writer does, step by step)
    save_params(staged_path(tmp_path / BEST_MODEL_FILE), _model(1.0), {"round": 2})
    save_params(staged_path(tmp_path / GLOBAL_MODEL_FILE), _model(2.0), {"round": 2})
    if crash in ("after_state", "after_rename"):
        write_json(tmp_path / "round_state.json", {"job_id": "j", "completed_rounds": 3, "history": [],
                                                   "global_model_round": 2})
    if crash == "after_rename":
        for name in (BEST_MODEL_FILE, GLOBAL_MODEL_FILE):
            staged_path(tmp_path / name).replace(tmp_path / name)
    saved = load_saved_run(tmp_path)
    expect = 1 if crash == "after_models" else 2
    assert saved.round == expect
    assert torch.equal(saved.global_params["w"], _model(float(expect))["w"])
    assert not any(p.name.endswith(".staged") for p in tmp_path.iterdir())
    best = load_file(tmp_path / BEST_MODEL_FILE)["w"]
    assert torch.equal(best, _model(0.5 if crash == "after_models" else 1.0)["w"])


def test_a_result_sent_again_while_the_first_is_folded_in_is_acknowledged_and_folded_once(tmp_path):
    """The site's first call timed out while the server was still folding its result in; the same
    result sent again waits for the first one's outcome and is acknowledged, never folded twice."""
    import threading

    from flkit.messages import Result
    from flkit.server.config import WorkflowConfig
    from flkit.server.server import FLServer
    from flkit.strategy.fedavg import FedAvg, WeightedMean
    from flkit.transport.grpc_transport import GrpcTransport

    folding, release = threading.Event(), threading.Event()
    added: list[str] = []

    class SlowMean(WeightedMean):
        def add(self, result):
            added.append(result.site)
            folding.set()
            release.wait(30)
            super().add(result)

    class SlowFedAvg(FedAvg):
        def aggregator(self, round_num):
            return SlowMean()

    initial = {"w": torch.zeros(4)}
    srv = FLServer(WorkflowConfig.from_dict({"num_rounds": 1, "min_clients": 1}), ["site-1"], initial,
                   tmp_path / "server", job_id="j", token="t", strategy=SlowFedAvg(), shared_memory=False)
    srv.start()
    link = GrpcTransport(srv.address)
    try:
        sid = link.join("site-1", "j", "t", timeout=10).session_id
        task = link.get_task(sid, 5, timeout=10)
        result = Result(task.task_id, params_type="FULL", params={"w": torch.ones(4)}, metrics={"accuracy": 1.0})
        replies = []
        first = threading.Thread(target=lambda: replies.append(link.submit(sid, result, timeout=30)))
        first.start()
        assert folding.wait(10)
        second = threading.Thread(target=lambda: replies.append(link.submit(sid, result, timeout=30)))
        second.start()
        second.join(0.5)
        assert second.is_alive()  # waits for the first send's outcome
        release.set()
        first.join(30)
        second.join(30)
        assert [r.accepted for r in replies] == [True, True], replies
        assert added == ["site-1"]  # folded once
        assert srv.wait(30) is not None and not srv.outcome.failed
        assert torch.equal(srv.controller.global_params["w"], torch.ones(4))
    finally:
        release.set()
        link.close()
        srv.stop()
