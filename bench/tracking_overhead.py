"""Benchmark: what experiment tracking costs a site's training loop, and the whole round.

Two in-process sites log ``--records`` scalars per round each with ``SummaryWriter.add_scalar``
(bench/tracking_site.py) and otherwise do nothing. The job runs with tracking off (records only
go to the site's tracking.jsonl), with TensorBoard on the server, and with TensorBoard written by
each site itself (client side). It prints, per mode: microseconds per ``add_scalar`` call, its
ratio to the floor (appending the same record as a JSON line to a file, measured in the same
loop), seconds per round, and how many records reached the event files (read back).

    .venv/bin/python bench/tracking_overhead.py [--records 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flkit.job import FedAvgJob, ScriptRunner, TBAnalyticsReceiver

SITE_SCRIPT = Path(__file__).resolve().parent / "tracking_site.py"
SITES = ("site-1", "site-2")


def events_written(folders: list[Path]) -> int:
    """Scalars read back from the event files in ``folders`` (one per site)."""
    total = 0
    for folder in folders:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        total += sum(len(acc.Scalars(tag)) for tag in acc.Tags()["scalars"])
    return total


def run(mode: str, args: argparse.Namespace, root: Path) -> dict:
    job = FedAvgJob(torch.nn.Linear(4, 2), n_clients=len(SITES), num_rounds=args.rounds, name=f"track_{mode}",
                    key_metric=None, analytics_receiver=TBAnalyticsReceiver() if mode == "server" else None)
    if mode == "client":
        job.options["client_tracking"] = [{"type": "tensorboard", "config": {}, "clients": None}]
    job.to_clients(ScriptRunner(str(SITE_SCRIPT), f"--records {args.records}"))
    t0 = time.perf_counter()
    result = job.simulator_run(root / mode, quiet=True)
    wall = time.perf_counter() - t0
    log_us = [m["log_us"] for r in result.rounds for m in r.metrics.values()]
    floor_us = [m["floor_us"] for r in result.rounds for m in r.metrics.values()]
    ws = root / mode
    folders = {"off": [], "server": [ws / "server" / "tb_events" / site for site in SITES],
               "client": [ws / site / "tb_events" / site for site in SITES]}[mode]
    written = events_written(folders)
    return {"mode": mode, "log_us": statistics.median(log_us), "floor_us": statistics.median(floor_us),
            "sec_per_round": statistics.mean(r.seconds for r in result.rounds), "wall_s": wall,
            "records": args.records * args.rounds * len(SITES), "events_written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000, help="scalars each site logs per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(mode, args, Path(tmp)) for mode in ("off", "server", "client")]
    print(f"\n{args.records} add_scalar calls per site per round, {len(SITES)} in-process sites, {args.rounds} rounds")
    print(f"{'tracking':<10} {'us/call':>8} {'floor us':>9} {'x floor':>8} {'s/round':>8} {'wall s':>7} "
          f"{'events':>9} {'of':>9}")
    for row in rows:
        print(f"{row['mode']:<10} {row['log_us']:8.1f} {row['floor_us']:9.1f} {row['log_us'] / row['floor_us']:8.2f} "
              f"{row['sec_per_round']:8.2f} {row['wall_s']:7.1f} {row['events_written']:9d} {row['records']:9d}")
    for row in rows:
        print(json.dumps({"bench": "tracking_overhead", **row}))


if __name__ == "__main__":
    main()
