"""A site killed with SIGKILL mid-round: the round completes with the others after the heartbeat
timeout, and the site, started again, joins from the next round on. Followed with `flkit status`'s
call (an admin certificate) on a real mutual-TLS deployment of `flkit server` and `flkit client`."""

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

from flkit.deploy.kit import load_kit
from flkit.deploy.provision import provision
from flkit.job import FedAvgJob, ScriptRunner
from flkit.runner.ports import free_port
from flkit.transport.grpc_transport import GrpcTransport

from conftest import REPO, SCRIPTS

FLKIT = [sys.executable, "-m", "flkit.cli"]


def _wait(condition, what: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            assert p.poll() is None, f"a process ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _client(job_dir: Path, kits: Path, site: str, port: int, tmp_path: Path) -> subprocess.Popen:
    log = open(tmp_path / f"{site}.log", "ab")  # noqa: SIM115 (the process owns it)
    return subprocess.Popen([*FLKIT, "client", str(job_dir), "--kit", str(kits / site), "--server",
                             f"127.0.0.1:{port}", "-w", str(tmp_path / site)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_a_site_killed_mid_round_is_dropped_and_joins_again_at_a_later_round(tmp_path):
    port = free_port()
    project = tmp_path / "project.yml"
    project.write_text(json.dumps({"name": "loss", "server": {"host": "localhost", "port": port},
                                   "sites": ["site-1", "site-2", "site-3"], "admins": ["admin"]}))
    kits = tmp_path / "kits"
    provision(project, kits)
    hold = tmp_path / "hold"
    hold.mkdir()
    job = FedAvgJob(name="loss", initial_model=torch.nn.Linear(3, 2), n_clients=3, num_rounds=5, min_clients=2,
                    heartbeat_interval_s=0.5, heartbeat_timeout_s=3.0)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "round_site_update.py"),
                                script_args=f"--hold site-3@1 --hold site-1@3 --hold site-2@3 --hold_dir {hold}"))
    job_dir = job.export_job(tmp_path / "jobs")
    server_log = tmp_path / "server.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen([*FLKIT, "server", str(job_dir), "--host", "127.0.0.1", "--port", str(port),
                                   "--kit", str(kits / "server"), "-w", str(tmp_path / "server")],
                                  cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    clients = {site: _client(job_dir, kits, site, port, tmp_path) for site in ("site-1", "site-2", "site-3")}
    admin = GrpcTransport(f"127.0.0.1:{port}", load_kit(kits / "admin"))
    try:
        _wait(lambda: (hold / "site-3.r1.held").exists(), "site-3 in round 1", [server])
        os.kill(clients["site-3"].pid, signal.SIGKILL)
        clients["site-3"].wait()
        # Round 1 ends without site-3 once its heartbeat lapses; round 2 runs; sites 1 and 2 hold in round 3.
        _wait(lambda: (hold / "site-1.r3.held").exists() and (hold / "site-2.r3.held").exists(),
              "round 3", [server])
        state = admin.status(10, 10.0)
        assert state["round"] == 3 and state["phase"] == "running"
        sites = {s["name"]: s for s in state["sites"]}
        assert sites["site-3"]["status"] == "failed" and "heartbeat" in sites["site-3"]["failure"]

        clients["site-3"] = _client(job_dir, kits, "site-3", port, tmp_path)  # back, mid-round 3
        _wait(lambda: {s["name"]: s for s in admin.status(1, 10.0)["sites"]}["site-3"]["status"] == "joined",
              "site-3 to join again", [server, clients["site-3"]])
        (hold / "go-site-1").touch()
        (hold / "go-site-2").touch()
        assert server.wait(120) == 0, server_log.read_text()
        for site, proc in clients.items():
            assert proc.wait(60) == 0, (tmp_path / f"{site}.log").read_text()
    finally:
        admin.close()
        for proc in (server, *clients.values()):
            proc.kill()
    history = json.loads((tmp_path / "server" / "round_state.json").read_text())["history"]
    assert [r["round"] for r in history] == [0, 1, 2, 3, 4]
    answered = [sorted(r["metrics"]) for r in history]
    assert answered == [["site-1", "site-2", "site-3"], ["site-1", "site-2"], ["site-1", "site-2"],
                        ["site-1", "site-2"], ["site-1", "site-2", "site-3"]]
    assert "heartbeat" in history[1]["failed"]["site-3"]
