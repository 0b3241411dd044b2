"""Benchmark: flkit's per-round overhead and peak memory with no-op sites.

Runs a FedAvgJob in the local simulator (every site a thread of this process, the real
gRPC server on loopback) with a plain float32 model of about ``--params`` parameters and
sites that only add 0.001 to the weights (bench/noop_site.py). There is no training, so
the seconds per round are the framework's own cost: encode, transfer, decode, validate,
aggregate and persist the model. Peak RSS is the whole process (server and all sites).

No pass/fail: it prints a table and, last, one JSON line for machines.

    .venv/bin/python bench/round_overhead.py [--params 25000000] [--sites 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from flkit.job import FedAvgJob
from flkit.runner.script_runner import ScriptRunner
from flkit.wire.codec import decode_params, encode_params

SITE_SCRIPT = Path(__file__).resolve().parent / "noop_site.py"
MIB = 1024 * 1024


def build_model(target_params: int, layers: int) -> torch.nn.Module:
    """``layers`` x Linear(d, d) with d chosen so the total is about ``target_params``."""
    per_layer = target_params / layers
    dim = max(1, round((-1 + math.sqrt(1 + 4 * per_layer)) / 2))  # d*d + d weights+bias per layer
    return torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return float("nan")
    return pages * resource.getpagesize() / MIB


def codec_reference(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Seconds for one encode and one decode of the model (the floor of one transfer's CPU work)."""
    t0 = time.perf_counter()
    blob = encode_params(state)
    t1 = time.perf_counter()
    decoded = decode_params(blob)
    t2 = time.perf_counter()
    del blob, decoded
    return t1 - t0, t2 - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=25_000_000, help="target parameter count (default 25M)")
    ap.add_argument("--layers", type=int, default=5, help="number of square Linear layers (default 5)")
    ap.add_argument("--sites", type=int, default=2, help="number of no-op sites (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="number of FedAvg rounds (default 5)")
    ap.add_argument("--workspace", default=None,
                    help="job workspace (default: a new temporary folder); a folder that existed is never removed")
    ap.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    args = ap.parse_args(argv)

    if args.workspace:
        workspace = Path(args.workspace)
        created = not workspace.exists()  # never delete a folder that was there before
        workspace.mkdir(parents=True, exist_ok=True)
    else:
        workspace, created = Path(tempfile.mkdtemp(prefix="flkit-bench-")), True
    remove = created and not args.keep

    torch.manual_seed(0)
    model = build_model(args.params, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model_mib = model_bytes / MIB
    dim = model[0].in_features
    rss_before = current_rss_mib()
    peak_before = peak_rss_mib()

    print(f"model: {args.layers} x Linear({dim}, {dim}) = {n_params:,} params, {model_mib:.1f} MiB float32")
    print(f"sites: {args.sites}, rounds: {args.rounds}, workspace: {workspace}")
    print(f"torch threads: {torch.get_num_threads()}, python {sys.version.split()[0]}, torch {torch.__version__}")
    print(f"RSS before the job: {rss_before:.0f} MiB (peak so far {peak_before:.0f} MiB, "
          f"{peak_before / model_mib:.1f} x model)")

    try:
        job = FedAvgJob(name="bench", initial_model=model, n_clients=args.sites, num_rounds=args.rounds,
                        final_validation=False)
        job.to_clients(ScriptRunner(script=str(SITE_SCRIPT)))
        t0 = time.perf_counter()
        result = job.simulator_run(workspace, quiet=True)
        wall_s = time.perf_counter() - t0
        peak_after = peak_rss_mib()
        rss_after = current_rss_mib()

        # Reference, measured after the job so it cannot raise the job's peak RSS.
        enc_s, dec_s = codec_reference(model.state_dict())
    finally:
        if remove:
            shutil.rmtree(workspace, ignore_errors=True)

    secs = [r.seconds for r in result.rounds]
    train_secs = [r.seconds for r in result.rounds if r.task == "train"]
    mean = sum(train_secs) / len(train_secs) if train_secs else float("nan")
    in_rounds = sum(secs)

    print()
    print(f"{'round':>5}  {'task':<8} {'seconds':>8}")
    for r in result.rounds:
        print(f"{r.round:>5}  {r.task:<8} {r.seconds:>8.3f}")
    print()
    print(f"sec/round (train) mean: {mean:.3f}   min {min(train_secs, default=float('nan')):.3f}   "
          f"max {max(train_secs, default=float('nan')):.3f}")
    print(f"wall (simulator_run):   {wall_s:.3f} s  ({in_rounds:.3f} s in rounds, "
          f"{wall_s - in_rounds:.3f} s export/start/shutdown)")
    print(f"codec reference:        encode {enc_s:.3f} s, decode {dec_s:.3f} s per model copy")
    print(f"peak RSS:               {peak_after:.0f} MiB = {peak_after / model_mib:.1f} x model "
          f"({(peak_after - rss_before) / model_mib:.1f} x model above the pre-job RSS); "
          f"RSS after the job {rss_after:.0f} MiB")
    print(f"workspace {'removed (--keep keeps it)' if remove else 'kept: ' + str(workspace)}")

    print(json.dumps({
        "bench": "round_overhead",
        "params": n_params,
        "sites": args.sites,
        "rounds": args.rounds,
        "sec_per_round_mean": round(mean, 4),
        "sec_per_round": [round(s, 4) for s in train_secs],
        "wall_s": round(wall_s, 4),
        "peak_rss_mib": round(peak_after, 1),
        "rss_before_mib": round(rss_before, 1),
        "model_mib": round(model_mib, 2),
        "encode_s": round(enc_s, 4),
        "decode_s": round(dec_s, 4),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
