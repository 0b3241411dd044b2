"""Benchmark: flkit's per-round overhead and peak memory with no-op sites.

Runs a FedAvgJob in the local simulator (the real gRPC server on loopback) with a plain
float32 model of about ``--params`` parameters and sites that only add 0.001 to the
weights (bench/noop_site.py). There is no training, so the seconds per round are the
framework's own cost: encode, transfer, decode, validate, aggregate and persist the model.

``--launch in-process`` runs every site as a thread of this process; ``--launch external``
starts each site's script as its own ``python3 -u`` process (ScriptRunner
launch_external_process=True), as torchrun-launched DDP sites are. ``both`` runs one after
the other and compares them. Peak RSS: this process (server, plus the sites when in-process)
and, for external sites, the largest site process.

No pass/fail: it prints tables and, last, one JSON line per launch mode.

    .venv/bin/python bench/round_overhead.py [--params 25000000] [--sites 2] [--rounds 5] [--launch both]
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


def run_mode(mode: str, model: torch.nn.Module, args: argparse.Namespace, workspace: Path, model_mib: float,
             rss_before: float) -> dict:
    """Run the no-op job once with sites launched as ``mode``; print its table; return its numbers."""
    job = FedAvgJob(name="bench", initial_model=model, n_clients=args.sites, num_rounds=args.rounds,
                    final_validation=False)
    external = mode == "external"
    job.to_clients(ScriptRunner(script=str(SITE_SCRIPT), launch_external_process=external, command="python3 -u"))
    print(f"\n== sites {mode} ==")
    t0 = time.perf_counter()
    result = job.simulator_run(workspace, quiet=True)
    wall_s = time.perf_counter() - t0
    peak = peak_rss_mib()
    child_peak = children_peak_rss_mib() if external else 0.0

    secs = [r.seconds for r in result.rounds]
    train_secs = [r.seconds for r in result.rounds if r.task == "train"]
    mean = sum(train_secs) / len(train_secs) if train_secs else float("nan")
    in_rounds = sum(secs)
    print(f"{'round':>5}  {'task':<8} {'seconds':>8}")
    for r in result.rounds:
        print(f"{r.round:>5}  {r.task:<8} {r.seconds:>8.3f}")
    print(f"sec/round (train) mean: {mean:.3f}   min {min(train_secs, default=float('nan')):.3f}   "
          f"max {max(train_secs, default=float('nan')):.3f}")
    print(f"wall (simulator_run):   {wall_s:.3f} s  ({in_rounds:.3f} s in rounds, "
          f"{wall_s - in_rounds:.3f} s export/start/shutdown)")
    print(f"peak RSS this process:  {peak:.0f} MiB = {peak / model_mib:.1f} x model "
          f"({(peak - rss_before) / model_mib:.1f} x model above the pre-job RSS)"
          + (f"; largest site process {child_peak:.0f} MiB" if external else ""))
    return {
        "bench": "round_overhead",
        "launch": mode,
        "params": sum(p.numel() for p in model.parameters()),
        "sites": args.sites,
        "rounds": args.rounds,
        "sec_per_round_mean": round(mean, 4),
        "sec_per_round": [round(x, 4) for x in train_secs],
        "wall_s": round(wall_s, 4),
        "peak_rss_mib": round(peak, 1),
        "site_process_peak_rss_mib": round(child_peak, 1),
        "rss_before_mib": round(rss_before, 1),
        "model_mib": round(model_mib, 2),
    }


def children_peak_rss_mib() -> float:
    """Peak RSS of the largest waited-for child process (the external sites)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=25_000_000, help="target parameter count (default 25M)")
    ap.add_argument("--layers", type=int, default=5, help="number of square Linear layers (default 5)")
    ap.add_argument("--sites", type=int, default=2, help="number of no-op sites (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="number of FedAvg rounds (default 5)")
    ap.add_argument("--launch", choices=["in-process", "external", "both"], default="in-process",
                    help="sites as threads of this process, as external processes, or both in turn "
                         "(default in-process)")
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

    # External first: ru_maxrss only grows, so this process's peak is then clean for it (server only).
    modes = ["external", "in-process"] if args.launch == "both" else [args.launch]
    summaries = []
    try:
        for mode in modes:
            summaries.append(run_mode(mode, model, args, workspace / mode, model_mib, rss_before))
        # Reference, measured after the jobs so it cannot raise their peak RSS.
        enc_s, dec_s = codec_reference(model.state_dict())
    finally:
        if remove:
            shutil.rmtree(workspace, ignore_errors=True)

    print()
    print(f"codec reference: encode {enc_s:.3f} s, decode {dec_s:.3f} s per model copy")
    if len(summaries) > 1:
        print()
        print(f"{'launch':<11} {'sec/round':>9} {'wall s':>7} {'peak RSS this process':>22} {'peak RSS site proc':>19}")
        for s in summaries:
            child = f"{s['site_process_peak_rss_mib']:.0f} MiB" if s["site_process_peak_rss_mib"] else "-"
            print(f"{s['launch']:<11} {s['sec_per_round_mean']:>9.3f} {s['wall_s']:>7.1f} "
                  f"{s['peak_rss_mib']:>18.0f} MiB {child:>19}")
    print(f"workspace {'removed (--keep keeps it)' if remove else 'kept: ' + str(workspace)}")
    for s in summaries:
        print(json.dumps({**s, "encode_s": round(enc_s, 4), "decode_s": round(dec_s, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
