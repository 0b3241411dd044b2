"""Benchmark: what flkit_lightning adds to a Lightning round, per round, for a model of N params.

Plain: one Trainer runs ``--rounds`` x (validate(); fit() of one epoch) in this process, with
the epoch budget raised by hand each round, as FLCallback does. FL: the same module and data in
a FedAvgJob whose ``--sites`` in-process sites run bench/lightning_site.py (patch(trainer), then
validate + fit per round) against the real server (in-process sites use the memory transport:
the global model copy-on-write, no serialisation). The data is 2 random
batches, so the seconds are Lightning's and flkit's own: with 1 site, FL minus plain is what
the federation costs per round (receive, load, send, aggregate, save).

No pass/fail: it prints a table and, last, one JSON line.

    .venv/bin/python bench/lightning_overhead.py [--params 25000000] [--layers 5] [--rounds 5] [--sites 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from flkit.job import FedAvgJob
from flkit.runner.script_runner import ScriptRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lit_bench import BenchModule, loader, trainer  # noqa: E402


def plain_seconds_per_round(args: argparse.Namespace) -> list[float]:
    torch.manual_seed(0)
    model = BenchModule(args.params, args.layers)
    data = loader(model.dim)
    plain = trainer()
    times = []
    for r in range(args.rounds + 1):  # the first round warms up (Lightning's first fit is slower)
        t0 = time.perf_counter()
        plain.validate(model, dataloaders=data, verbose=False)
        plain.fit_loop.max_epochs = r + 1
        plain.fit(model, train_dataloaders=data, val_dataloaders=data)
        times.append(time.perf_counter() - t0)
    return times[1:]


def fl_seconds_per_round(args: argparse.Namespace, workspace: Path) -> list[float]:
    torch.manual_seed(0)
    job = FedAvgJob(name="lit_bench", initial_model=BenchModule(args.params, args.layers), n_clients=args.sites,
                    num_rounds=args.rounds + 1, key_metric="val_loss_epoch", negate_key_metric=True,
                    final_validation=False)
    job.to_clients(ScriptRunner(script=str(HERE / "lightning_site.py"),
                                script_args=f"--params {args.params} --layers {args.layers}"))
    result = job.simulator_run(workspace, quiet=True)
    return [r.seconds for r in result.rounds][1:]  # round 0 includes joining and the first fit's set-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000, help="target parameter count")
    parser.add_argument("--layers", type=int, default=5, help="square Linear layers")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (one more warms up)")
    parser.add_argument("--sites", type=int, default=1, help="in-process FL sites")
    args = parser.parse_args()

    n = sum(p.numel() for p in BenchModule(args.params, args.layers).parameters())
    print(f"model: {args.layers} x Linear, {n:,} params ({n * 4 / 2**20:.1f} MiB), {args.rounds} measured rounds")
    plain = plain_seconds_per_round(args)
    with tempfile.TemporaryDirectory() as tmp:
        fl = fl_seconds_per_round(args, Path(tmp))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"{'':>28} {'mean':>7} {'min':>7} {'max':>7}")
    print(f"{'plain Lightning s/round':>28} {mean(plain):7.3f} {min(plain):7.3f} {max(plain):7.3f}")
    print(f"{f'flkit_lightning s/round ({args.sites} site)':>28} {mean(fl):7.3f} {min(fl):7.3f} {max(fl):7.3f}")
    print(f"{'added by FL per round':>28} {mean(fl) - mean(plain):7.3f}")
    print(json.dumps({"bench": "lightning_overhead", "params": n, "sites": args.sites, "rounds": args.rounds,
                      "plain_s_per_round": round(mean(plain), 4), "fl_s_per_round": round(mean(fl), 4),
                      "added_s_per_round": round(mean(fl) - mean(plain), 4)}))


if __name__ == "__main__":
    main()
