"""`flkit server` and `flkit client` as separate processes, the way real machines run a job."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from flkit.job import FedAvgJob, ScriptRunner

from conftest import REPO, SCRIPTS, finish


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("crash_round", [99, 0])
def test_server_and_clients_in_separate_processes(tmp_path, crash_round):
    job = FedAvgJob(name="deploy", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=2)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"),
                                script_args=f"--crash_round {crash_round} --crash_site site-2"))
    job_dir = job.export_job(tmp_path / "jobs")
    port = _free_port()
    flkit = [sys.executable, "-m", "flkit.cli"]
    server = subprocess.Popen(
        [*flkit, "server", str(job_dir), "--host", "127.0.0.1", "--port", str(port), "--insecure", "--token", "s3cret",
         "-w", str(tmp_path / "server")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    clients = [
        subprocess.Popen(
            [*flkit, "client", str(job_dir), "--server", f"127.0.0.1:{port}", "--site", site, "--insecure", "--token", "s3cret",
             "-w", str(tmp_path / site)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for site in ("site-1", "site-2")
    ]
    server_out, *client_outs = finish([server, *clients])
    state = json.loads((tmp_path / "server" / "round_state.json").read_text())
    if crash_round == 99:
        assert server.returncode == 0, server_out
        assert [c.returncode for c in clients] == [0, 0], client_outs
        assert state["status"] == "completed" and state["completed_rounds"] == 2
    else:
        assert server.returncode == 1, server_out
        assert "site-2" in server_out and "deliberate failure" in server_out
        assert clients[1].returncode == 1 and "RuntimeError: deliberate failure" in client_outs[1]
        assert clients[0].returncode == 0, client_outs[0]  # the healthy site is told the job ended
        assert state["status"] == "failed"
