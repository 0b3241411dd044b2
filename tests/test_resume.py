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
from test_cli_deploy import _free_port

from flkit.deploy.provision import provision
from flkit.job import FedAvgJob, ScriptRunner

from conftest import REPO, SCRIPTS, finish

ROUNDS = 5
HOLD_ROUND = 2
FLKIT = [sys.executable, "-m", "flkit.cli"]


def _job(tmp_path: Path, hold_dir: Path | None) -> Path:
    torch.manual_seed(0)
    job = FedAvgJob(name="resume", initial_model=torch.nn.Linear(4, 3), n_clients=2, num_rounds=ROUNDS)
    args = "" if hold_dir is None else f"--hold_round {HOLD_ROUND} --hold_dir {hold_dir}"
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "round_site_update.py"), script_args=args))
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
def test_kill_9_of_the_server_mid_round_and_resume_gives_the_uninterrupted_model(tmp_path):
    # The uninterrupted run.
    port = _free_port()
    kits = _kits(tmp_path / "a", port)
    job_dir = _job(tmp_path / "a", None)
    server = _server(job_dir, kits, port, tmp_path / "a" / "server")
    outs = finish([server, *_clients(job_dir, kits, port, tmp_path / "a")])
    assert server.returncode == 0, outs[0]
    expected = load_file(tmp_path / "a" / "server" / "FL_global_model.safetensors")

    # The same job, its server killed with SIGKILL while round 2's results are held back by the sites.
    port = _free_port()
    kits = _kits(tmp_path / "b", port)
    hold = tmp_path / "b" / "hold"
    hold.mkdir(parents=True)
    job_dir = _job(tmp_path / "b", hold)
    workspace = tmp_path / "b" / "server"
    server = _server(job_dir, kits, port, workspace)
    clients = _clients(job_dir, kits, port, tmp_path / "b")
    _wait_for([hold / "site-1.held", hold / "site-2.held"], server)
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
