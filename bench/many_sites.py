"""Benchmark: seconds per round and memory with many sites in one simulation.

Each configuration runs in a fresh child process: a 10K-parameter model (``Linear(100, 100)``),
in-process sites running ``bench/noop_site.py`` (add 0.001, send back), FedAvg, no final
validation. Prints one row per configuration and the targets of issue 12 that apply to it.

    .venv/bin/python bench/many_sites.py                 # 100 and 1,000 sites, 10,000 with 100 per round
    .venv/bin/python bench/many_sites.py --sites 1000 --rounds 5
    .venv/bin/python bench/many_sites.py --sites 10000 --per-round 100

What "threads" means here: today's in-process path, a thread per site (no heartbeat thread:
in-process sites need none). The pooled backends of issue 12 (a bounded set of workers) are
measured here once they exist.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "BENCH_MANY_SITES "
# (sites, sites per round or None for all): the shapes.
DEFAULT = [(100, None), (1000, None), (10000, 100)]
TARGETS = {(100, None): 0.1, (1000, None): 1.0}  # s/round on threads (issue 12)
PEAK_LIMIT_MIB = 4096  # 10,000 sites, 100 per round: peak memory of the process tree


def run_one(sites: int, per_round: int | None, rounds: int) -> dict:
    import torch

    from flkit.job import FedAvgJob, ScriptRunner

    torch.manual_seed(0)
    job = FedAvgJob(name="many", initial_model=torch.nn.Linear(100, 100), n_clients=sites, num_rounds=rounds,
                    final_validation=False, key_metric=None,
                    **({"clients_per_round": per_round} if per_round else {}))
    job.to_clients(ScriptRunner(script=str(HERE / "noop_site.py")))
    with tempfile.TemporaryDirectory() as ws:
        start = time.perf_counter()
        result = job.simulate(ws, quiet=True)
        wall = time.perf_counter() - start
    seconds = [r.seconds for r in result.rounds]
    steady = seconds[1:] or seconds
    return {"sites": sites, "per_round": per_round, "rounds": rounds, "ok": result.ok, "reason": result.reason,
            "round_s": seconds, "s_per_round": statistics.fmean(steady), "first_round_s": seconds[0] if seconds else None,
            "wall_s": wall, "outside_rounds_s": wall - sum(seconds),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=None, help="one configuration: this many sites")
    parser.add_argument("--per-round", type=int, default=None, help="sites sampled per round (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per job (s/round: mean of rounds 2..N)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: JSON config
    args = parser.parse_args(argv)
    if args.one:
        cfg = json.loads(args.one)
        print(TAG + json.dumps(run_one(cfg["sites"], cfg["per_round"], cfg["rounds"])), flush=True)
        return 0
    configs = [(args.sites, args.per_round)] if args.sites else DEFAULT
    rows = []
    for sites, per_round in configs:
        cfg = json.dumps({"sites": sites, "per_round": per_round, "rounds": args.rounds})
        print(f"... {sites} sites, {per_round or 'all'} per round", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", cfg], capture_output=True,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = next((x for x in done.stdout.splitlines() if x.startswith(TAG)), None)
        if line is None:
            rows.append({"sites": sites, "per_round": per_round, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            continue
        rows.append(json.loads(line[len(TAG):]))
    print(f"many sites, 10K-parameter model, in-process sites (a thread each), {os.cpu_count()} cores, "
          f"{args.rounds} rounds per job")
    print(f"{'sites':>6} {'per round':>9} {'s/round':>8} {'first':>7} {'wall s':>7} {'outside':>8} "
          f"{'peak MiB':>9}  target")
    for r in rows:
        if "error" in r or not r.get("ok"):
            print(f"{r['sites']:>6} {r['per_round'] or 'all':>9}  failed: {r.get('error') or r.get('reason')}")
            continue
        key = (r["sites"], r["per_round"])
        if key in TARGETS:
            limit = TARGETS[key]
            verdict = f"<= {limit:g} s/round: {'PASS' if r['s_per_round'] <= limit else 'MISS'}"
        elif r["per_round"]:
            verdict = f"peak <= {PEAK_LIMIT_MIB} MiB: {'PASS' if r['peak_rss_mib'] <= PEAK_LIMIT_MIB else 'MISS'}"
        else:
            verdict = "-"
        print(f"{r['sites']:>6} {r['per_round'] or 'all':>9} {r['s_per_round']:>8.3f} {r['first_round_s']:>7.3f} "
              f"{r['wall_s']:>7.1f} {r['outside_rounds_s']:>8.1f} {r['peak_rss_mib']:>9.0f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
