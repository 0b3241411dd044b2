"""Benchmark: one round of FedAvg with a large model, across processes, and the memory it takes.

``flkit server`` and ``--sites`` ``flkit client`` processes on loopback (plain text, a token: the
cost measured is the model's, not TLS's), one FedAvg round with a float32 model of ``--params``
values in tensors of at most 64M values (``--params 550e6`` is 2.2 GB, beyond protobuf's 2 GiB).
Each site adds 1 in place and sends the model back (bench/large_site.py). FedAvg is left to choose its aggregator (streamed from 256 MiB).

Memory is each process's peak RSS (its kernel high-water mark, VmHWM) above its own baseline: the
peak of the same processes in a control run with a model of 1,000 values. Printed as GB and as a
multiple of the model's size, next to the targets of the deployment issue (server <= 2.5x with
FedAvg, a site's flkit overhead <= 1.5x on top of the script's own copy, i.e. <= 2.5x in all).
Time: the round's seconds (the controller's) and its ratio to one ``torch.Tensor.copy_`` of the
model, measured here.

    .venv/bin/python bench/large_model.py                        # 75M values (300 MB), grpc and shm
    .venv/bin/python bench/large_model.py --params 550e6 --transports grpc
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SITE_SCRIPT = HERE / "large_site.py"
CHUNK = 64 * 2**20  # values per tensor


def high_water_mark(pid: int) -> int:
    """The kernel's peak resident size of ``pid`` so far (VmHWM), in bytes: no peak slips between samples."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak(threading.Thread):
    """The peak RSS of each process in ``pids``: its high-water mark, read every 20 ms until it exits."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.02):
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], high_water_mark(pid))
                except OSError:  # it exited (a zombie has no VmHWM line: 0)
                    pass


class Big(torch.nn.Module):
    def __init__(self, values: int) -> None:
        super().__init__()
        sizes = [CHUNK] * (values // CHUNK) + ([values % CHUNK] if values % CHUNK else [])
        self.parts = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(n)) for n in sizes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(values: int, sites: int, transport: str, root: Path) -> dict[str, object]:
    from flkit.job import FedAvgJob, ScriptRunner

    job = FedAvgJob(name="large", initial_model=Big(values), n_clients=sites, num_rounds=1, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SITE_SCRIPT)))
    job_dir = job.export_job(root / f"job-{values}")
    port, token = free_port(), secrets.token_hex(8)
    env = {**os.environ, "FLKIT_TOKEN": token, "FLKIT_TRANSPORT": transport, "PYTHONUNBUFFERED": "1"}
    flkit = [sys.executable, "-m", "flkit.cli"]
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    ws = root / f"ws-{values}-{transport}"
    with open(logs / f"server-{values}-{transport}.log", "wb") as out:
        server = subprocess.Popen([*flkit, "server", str(job_dir), "--insecure", "--host", "127.0.0.1", "--port",
                                   str(port), "-w", str(ws / "server")], cwd=REPO, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    clients = []
    for i in range(sites):
        with open(logs / f"site-{i + 1}-{values}-{transport}.log", "wb") as out:
            clients.append(subprocess.Popen([*flkit, "client", str(job_dir), "--insecure", "--server",
                                             f"127.0.0.1:{port}", "--site", f"site-{i + 1}", "-w",
                                             str(ws / f"site-{i + 1}")], cwd=REPO, env=env, stdout=out,
                                            stderr=subprocess.STDOUT))
    peak = Peak({"server": server.pid, **{f"site-{i + 1}": c.pid for i, c in enumerate(clients)}})
    peak.start()
    try:
        codes = [p.wait(1800) for p in (server, *clients)]
    finally:
        peak.halt.set()
        for p in (server, *clients):
            p.kill()
    if any(codes):
        raise SystemExit(f"a process failed ({codes}); see {logs}")
    state = json.loads((ws / "server" / "round_state.json").read_text())
    return {"peak": peak.peak, "seconds": state["history"][0]["seconds"]}


def copy_seconds(values: int) -> float:
    a, b = torch.empty(values), torch.empty(values)
    a.fill_(1.0)
    b.fill_(0.0)
    start = time.perf_counter()
    b.copy_(a)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=75e6, help="float32 values in the model")
    parser.add_argument("--sites", type=int, default=2)
    parser.add_argument("--transports", default="grpc,shm")
    args = parser.parse_args()
    values, size = int(args.params), int(args.params) * 4
    rows = []
    with tempfile.TemporaryDirectory(prefix="flkit-large-") as tmp:
        root = Path(tmp)
        copy_s = copy_seconds(values)
        for transport in args.transports.split(","):
            base = run(1000, args.sites, transport, root)
            big = run(values, args.sites, transport, root)
            for name in big["peak"]:
                above = big["peak"][name] - base["peak"][name]
                rows.append((transport, name, big["peak"][name] / 1e9, base["peak"][name] / 1e9, above / 1e9,
                             above / size, big["seconds"], big["seconds"] / copy_s))
    print(f"\nmodel: {values:,} float32 values = {size / 1e9:.2f} GB; {args.sites} sites; one copy_ of it: "
          f"{copy_s * 1000:.0f} ms\n")
    print("| transport | process | peak | baseline | above baseline | x model | target | round s | x copy_ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for transport, name, peak, base, gb, ratio, seconds, ratio_copy in rows:
        target = "<= 2.5 (FedAvg)" if name == "server" else "<= 2.5 (1 script copy + 1.5 flkit)"
        print(f"| {transport} | {name} | {peak:.2f} GB | {base:.2f} GB | {gb:.2f} GB | {ratio:.2f} | {target} | "
              f"{seconds:.2f} | {ratio_copy:.0f} |")


if __name__ == "__main__":
    main()
