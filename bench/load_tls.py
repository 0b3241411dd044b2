"""Benchmark: many sites against one `flkit server` over mutual TLS, on loopback.

For each size (default 50, 100 and 200 sites) this provisions a project with that many sites in a
temporary folder, starts ``flkit server JOB --kit kits/server`` as a process (FedAvg, a
``Linear(4, 2)`` model, every site in every round) and splits the sites over ``--drivers`` processes
of ``tests/scripts/load_sites.py``: every site is a thread with its own Session, gRPC channel,
certificate and TLS connection. While the job runs, the server process is sampled every 0.1 s with
psutil: resident memory, threads, and established connections on its port.

Printed per size: seconds per round (the controller's, from the round_state.json history), the
job's wall-clock (server start to exit, with the drivers' start-up and the sites' joins), the
server's peak RSS and peak thread count, the most connections at once and the distinct peers seen
(one per site when no channel shares a connection), and the sites that failed. Last, one JSON line
per size.

    .venv/bin/python bench/load_tls.py                       # 50, 100, 200 sites, 4 drivers, 2 rounds
    .venv/bin/python bench/load_tls.py --sites 400 --drivers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DRIVER = REPO / "tests" / "scripts" / "load_sites.py"
JOB = "load"


class ServerSampler(threading.Thread):
    """Peak RSS, peak threads and connections of the server process, sampled every 0.1 s."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.port = port
        self.rss = self.threads = self.peak_conns = 0
        self.peers: set[tuple[str, int]] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            try:
                with self.proc.oneshot():
                    self.rss = max(self.rss, self.proc.memory_info().rss)
                    self.threads = max(self.threads, self.proc.num_threads())
                conns = [c for c in self.proc.net_connections(kind="tcp")
                         if c.laddr and c.laddr.port == self.port and c.raddr and c.status == psutil.CONN_ESTABLISHED]
            except psutil.Error:
                return
            self.peak_conns = max(self.peak_conns, len(conns))
            self.peers.update((c.raddr.ip, c.raddr.port) for c in conns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(sites: int, drivers: int, rounds: int, folder: Path) -> dict:
    import torch

    from flkit.deploy.provision import provision
    from flkit.job import FedAvgJob, ScriptRunner

    port = free_port()
    names = [f"site-{i}" for i in range(1, sites + 1)]
    project = folder / "project.yml"
    project.write_text(json.dumps({"name": "load", "server": {"host": "localhost", "port": port}, "sites": names}))
    provision(project, folder / "kits")
    job = FedAvgJob(name=JOB, initial_model=torch.nn.Linear(4, 2), n_clients=sites, num_rounds=rounds,
                    min_clients=sites)
    job.to_clients(ScriptRunner(script=str(HERE / "noop_site.py")))  # never run: the drivers are the sites
    job_dir = job.export_job(folder / "jobs")
    workspace = folder / "server"
    start = time.perf_counter()
    with (folder / "server.txt").open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "flkit.cli", "server", str(job_dir), "--kit",
                                   str(folder / "kits" / "server"), "--host", "127.0.0.1", "--port", str(port),
                                   "-w", str(workspace)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        sampler = ServerSampler(server.pid, port)
        sampler.start()
        bounds = [round(i * sites / drivers) for i in range(drivers + 1)]
        procs = [subprocess.Popen([sys.executable, str(DRIVER), "--server", f"127.0.0.1:{port}", "--kits",
                                   str(folder / "kits"), "--range", f"{lo + 1}:{hi}", "--job-id", JOB,
                                   "--workspace", str(folder / "sites")],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                 for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
        try:
            server.wait(timeout=600)
            wall = time.perf_counter() - start
            outs = [p.communicate(timeout=120)[0] for p in procs]
        finally:
            sampler.halt.set()
            for p in (server, *procs):
                p.kill()
    errors: dict[str, str] = {}
    for out in outs:
        line = next((x for x in reversed(out.splitlines()) if x.startswith('{"driver"')), None)
        if line is None:
            errors["driver"] = "a driver printed no report"
        else:
            errors.update(json.loads(line)["errors"])
    state = json.loads((workspace / "round_state.json").read_text())
    seconds = [r["seconds"] for r in state["history"]]
    return {"bench": "load_tls", "sites": sites, "drivers": len(procs), "rounds": rounds,
            "status": state["status"], "server_rc": server.returncode, "round_s": seconds,
            "s_per_round": statistics.fmean(seconds) if seconds else None, "wall_s": wall,
            "server_peak_rss_mib": sampler.rss / 2**20, "server_peak_threads": sampler.threads,
            "peak_connections": sampler.peak_conns, "distinct_peers": len(sampler.peers),
            "failed_sites": len(errors), "errors": dict(list(errors.items())[:5])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, action="append", default=None,
                        help="sites (repeat for several sizes; default 50, 100, 200)")
    parser.add_argument("--drivers", type=int, default=4, help="driver processes the sites are split over")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per job")
    args = parser.parse_args(argv)
    rows = []
    for sites in args.sites or [50, 100, 200]:
        print(f"... {sites} sites", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as folder:
            rows.append(run_one(sites, args.drivers, args.rounds, Path(folder)))
    print(f"mutual TLS on loopback, Linear(4, 2), {args.drivers} driver processes, {args.rounds} rounds, "
          f"{os.cpu_count()} cores")
    print(f"{'sites':>6} {'s/round':>8} {'rounds (s)':>16} {'wall s':>7} {'srv RSS MiB':>11} {'srv threads':>11} "
          f"{'conns peak':>10} {'peers':>6} {'failed':>6}")
    for r in rows:
        per_round = " ".join(f"{s:.2f}" for s in r["round_s"])
        s_per_round = f"{r['s_per_round']:.2f}" if r["s_per_round"] is not None else "-"
        print(f"{r['sites']:>6} {s_per_round:>8} {per_round:>16} {r['wall_s']:>7.1f} "
              f"{r['server_peak_rss_mib']:>11.0f} {r['server_peak_threads']:>11} {r['peak_connections']:>10} "
              f"{r['distinct_peers']:>6} {r['failed_sites']:>6}")
    for r in rows:
        print(json.dumps(r))
    ok = all(r["status"] == "completed" and r["server_rc"] == 0 and not r["failed_sites"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
