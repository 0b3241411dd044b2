"""Load: 200 concurrent sites against one `flkit server` over mutual TLS, on loopback.

Each site has its own Session, gRPC channel, certificate and TLS connection; 4 driver processes
(tests/scripts/load_sites.py) run 50 sites each as threads. One round of FedAvg with a tiny model
must complete with every site's answer and no error anywhere.

That the connections are really separate (gRPC may let channels of one process share a
connection) is checked twice: each driver counts its own established connections to the
server's port (and their distinct local ports) once all its sites hold their task, and this test
samples the server process's connections on that port throughout and counts the distinct peers.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from flkit.deploy.provision import provision
from flkit.job import FedAvgJob, ScriptRunner

from conftest import REPO, SCRIPTS

SITES = 200
DRIVERS = 4
JOB = "load"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerConnections(threading.Thread):
    """Samples the server process's established TCP connections on its port every 0.2 s:
    the most at one time, and every distinct peer (host, port) seen."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.port = port
        self.peak = 0
        self.peers: set[tuple[str, int]] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.2):
            try:
                conns = [c for c in self.proc.net_connections(kind="tcp")
                         if c.laddr and c.laddr.port == self.port and c.raddr and c.status == psutil.CONN_ESTABLISHED]
            except psutil.Error:
                return  # the server has exited
            self.peak = max(self.peak, len(conns))
            self.peers.update((c.raddr.ip, c.raddr.port) for c in conns)


@pytest.mark.slow
def test_200_sites_over_mutual_tls_complete_a_round(tmp_path):
    began = time.monotonic()
    port = _free_port()
    names = [f"site-{i}" for i in range(1, SITES + 1)]
    project = tmp_path / "project.yml"
    project.write_text(json.dumps({"name": "load", "server": {"host": "localhost", "port": port}, "sites": names}))
    kits = tmp_path / "kits"
    provision(project, kits)
    # The sites are driven by load_sites.py: the job's script is never run.
    job = FedAvgJob(name=JOB, initial_model=torch.nn.Linear(4, 2), n_clients=SITES, num_rounds=1,
                    min_clients=SITES)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py")))
    job_dir = job.export_job(tmp_path / "jobs")
    workspace = tmp_path / "server"
    logs = tmp_path / "logs"
    logs.mkdir()
    # With a kit and a to_clients job, `flkit server` serves the project's provisioned sites (all 200).
    server_log = (logs / "server.txt").open("w")
    server = subprocess.Popen([sys.executable, "-m", "flkit.cli", "server", str(job_dir), "--kit", str(kits / "server"),
                               "--host", "127.0.0.1", "--port", str(port), "-w", str(workspace)],
                              cwd=REPO, stdout=server_log, stderr=subprocess.STDOUT, text=True)
    sampler = ServerConnections(server.pid, port)
    sampler.start()
    per = SITES // DRIVERS
    drivers = []
    for d in range(DRIVERS):
        out, err = (logs / f"driver{d}.out").open("w"), (logs / f"driver{d}.err").open("w")
        cmd = [sys.executable, str(SCRIPTS / "load_sites.py"), "--server", f"127.0.0.1:{port}", "--kits", str(kits),
               "--range", f"{d * per + 1}:{(d + 1) * per}", "--job-id", JOB, "--workspace", str(tmp_path / "sites"),
               "--timeout", "120", "--deadline", "150"]
        drivers.append((subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err, text=True), out, err))
    try:
        server.wait(timeout=200)
        for proc, _, _ in drivers:
            proc.wait(timeout=60)
    finally:
        sampler.halt.set()
        for proc in (server, *(p for p, _, _ in drivers)):
            proc.kill()
        for f in (server_log, *(f for _, o, e in drivers for f in (o, e))):
            f.close()
    server_out = (logs / "server.txt").read_text()
    assert server.returncode == 0, server_out[-5000:]
    assert "mutual TLS" in server_out

    reports = []
    for d, (proc, _, _) in enumerate(drivers):
        stdout, stderr = (logs / f"driver{d}.out").read_text(), (logs / f"driver{d}.err").read_text()
        lines = [ln for ln in stdout.splitlines() if ln.startswith('{"driver"')]
        assert lines, f"driver {d} printed no report (rc {proc.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}"
        report = json.loads(lines[-1])
        assert report["errors"] == {}, f"driver {d}: {report['errors']}"
        assert proc.returncode == 0, stderr[-3000:]
        assert report["ok"] == per and all(r["tasks"] == 1 for r in report["per_site"].values())
        reports.append(report)

    state = json.loads((workspace / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 1, state.get("reason")
    first = state["history"][0]
    assert sorted(first["sites"]) == sorted(names)
    assert sorted(first["metrics"]) == sorted(names) and not first["failed"]

    # One TLS connection per site: counted in each driver while all its sites were connected ...
    for report in reports:
        assert report["connections"] == {**report["connections"], "established": per, "local_ports": per}, report
    # ... and at the server: 200 distinct peers, none shared.
    assert len(sampler.peers) == SITES, (len(sampler.peers), sampler.peak)
    elapsed = time.monotonic() - began
    first_task = max(r["first_task_s"] for rep in reports for r in rep["per_site"].values())
    print(f"\n{SITES} sites over mutual TLS ({DRIVERS} drivers): round {first['seconds']:.2f} s, "
          f"last site's first task {first_task:.1f} s after its driver started, "
          f"server connections peak {sampler.peak}, distinct peers {len(sampler.peers)}, whole test {elapsed:.1f} s")
