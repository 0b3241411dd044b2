"""Train a DLRM-style click model with FedAvg over many sites, each with its own synthetic click log.

The job sends the model to ``--clients_per_round`` sites sampled from ``--n_clients`` each
round; each site makes its own skewed log (src/data.py), trains, and sends the model back.
At the end, the final global model and an item-popularity baseline (every item's click
rate over all sites' logs) are scored on the same held-out set; the numbers are printed and
written to <workspace>/recsys_result.json.

Every check of the options happens before flkit or torch is imported, so a mistake on the
command line costs nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flkit.sim.simulator import SimulationResult

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "src" / "recsys_fl.py"
JOB_NAME = "recsys_dlrm"
RESULT_FILE = "recsys_result.json"
DEFAULT_CLIENTS_PER_ROUND = 100

EXAMPLES = """\
examples (from the repository root):
  python examples/recsys/job.py --n_clients 10000 --clients_per_round 100 --num_rounds 3
  python examples/recsys/job.py --n_clients 50 --num_rounds 3          # all 50 sites every round
  python examples/recsys/job.py --export_only --export_dir /tmp/flkit/jobs
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--n_clients",
        type=int,
        default=1000,
        help="number of sites, named site-1..site-N, each with its own click log (default: %(default)s)",
    )
    parser.add_argument(
        "--clients_per_round",
        type=int,
        default=None,
        help="sites sampled to train in each round (a seeded sample; all of them must answer) "
        f"(default: {DEFAULT_CLIENTS_PER_ROUND}, or --n_clients if fewer)",
    )
    parser.add_argument("--num_rounds", type=int, default=3, help="FedAvg rounds (default: %(default)s)")
    parser.add_argument(
        "--local_epochs", type=int, default=2, help="passes over its log a site makes per round (default: %(default)s)"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="sites' mini-batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.03, help="sites' Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.3,
        help="Dirichlet concentration of each site's mix of user segments and item categories; smaller is "
        "more skewed (non-IID) (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sites' logs, the held-out set, the initial model and the sampling of sites; the "
        "hidden users and items stay the same (default: %(default)s)",
    )
    parser.add_argument(
        "--workspace",
        default="/tmp/flkit/recsys_workspace",
        help=f"simulator workspace: the global models land in <workspace>/server, the numbers in "
        f"<workspace>/{RESULT_FILE} (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        "--workers",
        dest="threads",
        type=int,
        default=None,
        help="the simulator's workers: how many site-tasks run at once; each sampled site's script runs "
        "once per round on a free worker (default: this machine's cores)",
    )
    parser.add_argument(
        "--backend",
        choices=("processes", "threads", "ray"),
        default="processes",
        help="where the simulator runs the sites' scripts: worker processes, each site-task with fresh "
        "module globals in <workspace>/<site> (processes), threads of this process (threads), or Ray "
        "actors (ray, needs flkit[ray]) (default: %(default)s)",
    )
    parser.add_argument(
        "--export_only",
        action="store_true",
        help="only write the job folder into --export_dir, do not run it (default: off)",
    )
    parser.add_argument(
        "--export_dir", default="/tmp/flkit/jobs", help="where --export_only writes the job (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject inconsistent options with a clear message (exit status 2) before anything starts."""
    for name in ("n_clients", "num_rounds", "local_epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.clients_per_round is None:
        args.clients_per_round = min(DEFAULT_CLIENTS_PER_ROUND, args.n_clients)
    elif not 1 <= args.clients_per_round <= args.n_clients:
        parser.error(f"--clients_per_round must be between 1 and --n_clients ({args.n_clients}), "
                     f"got {args.clients_per_round}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.alpha > 0:
        parser.error(f"--alpha must be positive, got {args.alpha}")
    if args.seed < 0:
        parser.error(f"--seed must be at least 0, got {args.seed}")


def script_args(args: argparse.Namespace) -> str:
    """What every site's script is started with: the data seed and the local training settings."""
    return (f"--seed {args.seed} --alpha {args.alpha} --local_epochs {args.local_epochs} "
            f"--batch_size {args.batch_size} --lr {args.lr}")


def round_scores(result: SimulationResult) -> list[dict[str, float]]:
    """Per round, the held-out scores the sites reported for the model they received (every site
    scores the same held-out set, so their mean is the global model's score)."""
    rows = []
    for record in result.rounds:
        scores = list(record.metrics.values())
        row: dict[str, float] = {"round": record.round}
        for name in ("auc", "log_loss"):
            values = [s[name] for s in scores if name in s]
            if values:
                row[name] = sum(values) / len(values)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()

    # Imported only now, so that --help and the checks above work even without torch or flkit.
    import torch
    from flkit import FLKitError, JobFailedError
    from flkit.job import FedAvgJob, ScriptRunner
    from safetensors.torch import load_file

    sys.path.insert(0, str(HERE / "src"))
    import data
    from metrics import auc, log_loss
    from model import build_model
    from recsys_fl import evaluate

    torch.manual_seed(args.seed)  # the initial global model
    try:
        job = FedAvgJob(
            name=JOB_NAME,
            initial_model=build_model(),
            n_clients=args.n_clients,
            num_rounds=args.num_rounds,
            key_metric="auc",
            clients_per_round=args.clients_per_round,
            seed=args.seed,
        )
        job.to_clients(ScriptRunner(str(SCRIPT), script_args(args)))
        if args.export_only:
            print(f"Job {JOB_NAME!r} exported to {job.export_job(args.export_dir)}")
            return
        result = job.simulator_run(args.workspace, n_clients=args.n_clients, threads=args.threads,
                                   backend=args.backend)
    except JobFailedError as e:
        print(f"The job failed: {e}", file=sys.stderr)
        sys.exit(1)
    except FLKitError as e:  # e.g. a setting the library rejects before the job starts
        print(f"Could not run the job: {e}", file=sys.stderr)
        sys.exit(2)
    job_seconds = time.perf_counter() - started

    held_out = data.held_out(args.seed)
    model = build_model()
    model.load_state_dict(load_file(str(result.global_model_path)))
    fl = evaluate(model, held_out)
    popularity = data.item_popularity(args.seed, args.n_clients, args.alpha)
    baseline_scores = popularity[held_out.item_id]
    baseline = {"auc": auc(baseline_scores, held_out.clicked), "log_loss": log_loss(baseline_scores, held_out.clicked)}
    total_seconds = time.perf_counter() - started

    summary = {
        "fl_auc": fl["auc"],
        "fl_log_loss": fl["log_loss"],
        "baseline_auc": baseline["auc"],
        "baseline_log_loss": baseline["log_loss"],
        "rounds": round_scores(result),
        "held_out_impressions": len(held_out),
        "held_out_click_rate": float(held_out.clicked.mean()),
        "job_seconds": job_seconds,
        "total_seconds": total_seconds,
        "settings": {key: value for key, value in vars(args).items() if key not in ("export_only", "export_dir")},
    }
    path = Path(args.workspace) / RESULT_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nheld-out set: {len(held_out)} impressions, click rate {summary['held_out_click_rate']:.3f}")
    rows = [("model", "AUC", "log loss"), ("FL DLRM, final global model", fl["auc"], fl["log_loss"]),
            ("item popularity, all sites' logs", baseline["auc"], baseline["log_loss"])]
    for i, (name, auc_value, loss_value) in enumerate(rows):
        print(f"{name:<34}{auc_value:>8}{loss_value:>10}" if i == 0 else f"{name:<34}{auc_value:>8.4f}{loss_value:>10.4f}")
    print(f"job {job_seconds:.1f} s, with scoring {total_seconds:.1f} s -> {path}")


if __name__ == "__main__":
    main()
