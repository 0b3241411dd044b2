"""Benchmark: seconds per round and memory with many sites in one simulation.

Each configuration runs in a fresh child process: a 10K-parameter model (``Linear(100, 100)``),
sites running ``bench/noop_site.py`` (add 0.001, send back), FedAvg, no final validation, on
the simulator's ``processes`` backend (its default) and on ``threads``, with as many workers as
cores. Prints one row per configuration and the targets of issue 12 that apply to it; "peak" is
the largest sum of the resident memory of the simulator and its worker processes.

    .venv/bin/python bench/many_sites.py                 # 100 and 1,000 sites, 10,000 with 100 per round
    .venv/bin/python bench/many_sites.py --sites 1000 --rounds 5 --backend threads
    .venv/bin/python bench/many_sites.py --sites 10000 --per-round 100
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "BENCH_MANY_SITES "
# (sites, sites per round or None for all): the shapes.
DEFAULT = [(100, None), (1000, None), (10000, 100)]
# s/round (issue 12), by backend.
TARGETS = {("threads", 100, None): 0.1, ("threads", 1000, None): 1.0,
           ("processes", 100, None): 0.3, ("processes", 1000, None): 3.0}
PEAK_LIMIT_MIB = 4096  # 10,000 sites, 100 per round: peak memory of the process tree


class TreePeak(threading.Thread):
    """The largest sum of resident memory of this process and its children, sampled every 50 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.05):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)


def pure_work(sites: int, repeats: int = 5) -> float:
    """Seconds of the round's own arithmetic on this machine now, the fastest of ``repeats``: per site a
    copy of the 10K-parameter model, the site's +0.001, and the weighted sum into the aggregate."""
    import torch

    model = torch.nn.Linear(100, 100).state_dict()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in model.items()}
        for _ in range(sites):
            for k, v in model.items():
                total[k].add_(v.clone().add_(0.001), alpha=1.0 / sites)
        best = min(best, time.perf_counter() - start)
    return best


def run_one(sites: int, per_round: int | None, rounds: int, backend: str) -> dict:
    import torch

    from flkit.job import FedAvgJob, ScriptRunner

    torch.manual_seed(0)
    job = FedAvgJob(name="many", initial_model=torch.nn.Linear(100, 100), n_clients=sites, num_rounds=rounds,
                    final_validation=False, key_metric=None,
                    **({"clients_per_round": per_round} if per_round else {}))
    job.to_clients(ScriptRunner(script=str(HERE / "noop_site.py")))
    pure = pure_work(sites if per_round is None else per_round)
    peak = TreePeak()
    peak.start()
    with tempfile.TemporaryDirectory() as ws:
        start = time.perf_counter()
        result = job.simulate(ws, quiet=True, backend=backend)
        wall = time.perf_counter() - start
    peak.stop.set()
    peak.join()
    seconds = [r.seconds for r in result.rounds]
    steady = seconds[1:] or seconds
    return {"backend": backend, "sites": sites, "per_round": per_round, "rounds": rounds, "ok": result.ok,
            "reason": result.reason,
            "round_s": seconds, "s_per_round": statistics.fmean(steady), "first_round_s": seconds[0] if seconds else None,
            "wall_s": wall, "outside_rounds_s": wall - sum(seconds),
            "peak_rss_mib": peak.peak / 2**20, "pure_s": pure}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=None, help="one configuration: this many sites")
    parser.add_argument("--per-round", type=int, default=None, help="sites sampled per round (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per job (s/round: mean of rounds 2..N)")
    parser.add_argument("--backend", choices=("processes", "threads"), action="append", default=None,
                        help="the simulator's backend (repeat for both; default: processes and threads)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: JSON config
    args = parser.parse_args(argv)
    if args.one:
        cfg = json.loads(args.one)
        print(TAG + json.dumps(run_one(cfg["sites"], cfg["per_round"], cfg["rounds"], cfg["backend"])), flush=True)
        return 0
    configs = [(args.sites, args.per_round)] if args.sites else DEFAULT
    backends = args.backend or ["processes", "threads"]
    rows = []
    for (sites, per_round), backend in [(c, b) for c in configs for b in backends]:
        cfg = json.dumps({"sites": sites, "per_round": per_round, "rounds": args.rounds, "backend": backend})
        print(f"... {sites} sites, {per_round or 'all'} per round, {backend}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", cfg], capture_output=True,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((x for x in done.stdout.splitlines() if x.startswith(TAG)), None)
        if line is None:
            rows.append({"backend": backend, "sites": sites, "per_round": per_round,
                         "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(line[len(TAG):]))
    print(f"many sites, 10K-parameter model, {os.cpu_count()} cores (as many workers), {args.rounds} rounds per job")
    print(f"{'backend':>9} {'sites':>6} {'per round':>9} {'s/round':>8} {'x pure':>7} {'first':>7} {'wall s':>7} "
          f"{'outside':>8} {'peak MiB':>9}  target")
    for r in rows:
        if "error" in r or not r.get("ok"):
            print(f"{r['backend']:>9} {r['sites']:>6} {r['per_round'] or 'all':>9}  failed: "
                  f"{r.get('error') or r.get('reason')}")
            continue
        key = (r["backend"], r["sites"], r["per_round"])
        if key in TARGETS:
            limit = TARGETS[key]
            verdict = f"<= {limit:g} s/round: {'PASS' if r['s_per_round'] <= limit else 'MISS'}"
        elif r["per_round"]:
            verdict = f"peak <= {PEAK_LIMIT_MIB} MiB: {'PASS' if r['peak_rss_mib'] <= PEAK_LIMIT_MIB else 'MISS'}"
        else:
            verdict = "-"
        print(f"{r['backend']:>9} {r['sites']:>6} {r['per_round'] or 'all':>9} {r['s_per_round']:>8.3f} "
              f"{r['s_per_round'] / r['pure_s']:>7.0f} {r['first_round_s']:>7.3f} "
              f"{r['wall_s']:>7.1f} {r['outside_rounds_s']:>8.1f} {r['peak_rss_mib']:>9.0f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
