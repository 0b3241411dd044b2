"""Benchmark: every strategy on the digits, IID and strongly non-IID, against centralized training.

Runs the CIFAR-10 example's training on its offline digits (bench/strategy_site.py: the tutorial
CNN, SGD lr 0.003 momentum 0.9, batches of 4, 2 epochs a round) in the simulator, for each strategy:

* 8 sites, IID split, 10 rounds;
* 32 sites, Dirichlet(0.1) label split (``flkit.data.partition``, seed 0, at least 8 samples a site),
  10 rounds (FedAvg: 20, for the rounds it needs; the table gives its best within 10 and within 20).

"Accuracy" is the best global model's accuracy on the 360 held-out digits (every site scores the
model it receives on the same held-out set; the job keeps the best round's model). Centralized: the
same model and optimiser on all sites' data together, 40 epochs, the best epoch. Each run is a
separate simulation with the same seeds; nothing but the strategy changes.

    .venv/bin/python bench/strategies.py                         # every strategy (about 30 min here)
    .venv/bin/python bench/strategies.py --only fedavg scaffold  # some of them
    .venv/bin/python bench/strategies.py --json out.json         # also write the numbers
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "cifar10" / "src"
sys.path.insert(0, str(EXAMPLE))

# name -> (strategy, its arguments). The server optimisers' learning rates and FedProx's mu were picked
# on the 32-site split from a few values each (--args; the closing note of issue 14 lists them), then kept.
STRATEGIES: dict[str, tuple[str, dict]] = {
    "FedAvg": ("fedavg", {}),
    "FedAvgM": ("fedavgm", {"server_learning_rate": 1.5, "server_momentum": 0.5}),
    "FedAdam": ("fedadam", {"eta": 0.01, "tau": 1e-3}),
    "FedYogi": ("fedyogi", {"eta": 0.03, "tau": 1e-3}),
    "FedAdagrad": ("fedadagrad", {"eta": 0.01, "tau": 1e-3}),
    "FedProx": ("fedprox", {"fedprox_mu": 0.01}),
    "SCAFFOLD": ("scaffold", {}),
    "median": ("median", {}),
    "trimmed mean": ("trimmed-mean", {"beta": 0.1}),
    "Multi-Krum": ("krum", {"f": 2, "m": 4}),
}
SPLITS = [("8 sites IID", 8, "iid", None, 10), ("32 sites Dirichlet(0.1)", 32, "dirichlet", 0.1, 10)]
LONG_RUN = {"fedavg": 20}  # strategies run longer on the non-IID split, to see the rounds they need


def run_fl(strategy: str, args: dict, sites: int, scheme: str, alpha: float | None, rounds: int,
           workers: int) -> list[float]:
    """The global model's accuracy in each round (as the sites scored it on receiving it)."""
    import torch
    from net import Net

    from flkit.job import FedAvg, FedJob, IntimeModelSelector, ScriptRunner

    torch.manual_seed(0)
    job = FedJob(name="strategies", min_clients=sites, strategy=strategy, strategy_args=args,
                 final_validation=False)
    job.to_server(FedAvg(num_clients=sites, num_rounds=rounds, model=Net()))
    job.to_server(IntimeModelSelector(key_metric="accuracy"))
    script_args = f"--scheme {scheme}" + ("" if alpha is None else f" --alpha {alpha}")
    job.to_clients(ScriptRunner(script=str(HERE / "strategy_site.py"), script_args=script_args))
    for module in ("data.py", "net.py"):  # the example's, beside the site script in the job's custom/
        job.to(str(EXAMPLE / module), "@ALL")
    with tempfile.TemporaryDirectory() as workspace:
        result = job.simulator_run(workspace, n_clients=sites, threads=workers, quiet=True, backend="processes")
        state = json.loads((Path(workspace) / "server" / "round_state.json").read_text())
    if state["status"] != "completed":
        raise RuntimeError(f"{strategy} on {sites} sites failed: {state['reason']}")
    del result
    return [r["score"] for r in state["history"]]


def centralized(epochs: int = 40) -> float:
    """The example's model and optimiser on all the training digits: the best epoch's test accuracy."""
    import data
    import torch
    from net import Net
    from torch import nn
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    torch.set_num_threads(1)  # one small CNN: more threads only wait on each other
    trainset, testset = data.load_datasets("digits")
    loader = DataLoader(trainset, batch_size=4, shuffle=True)
    test_x, test_y = testset.tensors
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.003, momentum=0.9)
    best = 0.0
    for _ in range(epochs):
        net.train()
        for inputs, labels in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(inputs), labels).backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            best = max(best, (net(test_x).argmax(1) == test_y).float().mean().item())
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help=f"strategies to run (of {', '.join(STRATEGIES)})")
    parser.add_argument("--workers", type=int, default=2, help="simulator worker processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--central-epochs", type=int, default=40, help="epochs of the centralized reference")
    parser.add_argument("--args", nargs=2, action="append", default=[], metavar=("STRATEGY", "JSON"),
                        help="other arguments for one strategy, e.g. --args fedadam '{\"eta\": 0.01}' (to tune)")
    parser.add_argument("--split", choices=["all", "iid", "dirichlet"], default="all", help="which splits to run")
    opts = parser.parse_args()
    chosen = {k: v for k, v in STRATEGIES.items() if not opts.only or k in opts.only or v[0] in opts.only}
    for name, text in opts.args:
        chosen = {k: (v[0], json.loads(text)) if name in (k, v[0]) else v for k, v in chosen.items()}
    splits = [s for s in SPLITS if opts.split == "all" or s[2] == opts.split]
    started = time.monotonic()
    central = centralized(opts.central_epochs) if opts.central_epochs else float("nan")
    print(f"centralized (40 epochs, best epoch): {100 * central:.1f}%", flush=True)
    rows = []
    for label, (strategy, args) in chosen.items():
        row = {"strategy": label, "name": strategy, "args": args}
        for split, sites, scheme, alpha, rounds in splits:
            if scheme != "iid":
                rounds = LONG_RUN.get(strategy, rounds)
            t0 = time.monotonic()
            scores = [s if s is not None else 0.0 for s in run_fl(strategy, args, sites, scheme, alpha, rounds,
                                                                   opts.workers)]
            row[split] = {"best_10": max(scores[:10]), "best_20": max(scores[:20]), "scores": scores,
                          "seconds": round(time.monotonic() - t0, 1)}
            print(f"  {label:13s} {split:24s} best in 10 rounds {100 * max(scores[:10]):5.1f}%"
                  + (f", in 20 {100 * max(scores):5.1f}%" if rounds > 10 else "")
                  + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
        rows.append(row)
    print()
    print(f"| strategy | 8 sites IID, 10 rounds | 32 sites Dirichlet(0.1), 10 rounds | 20 rounds | "
          f"10 rounds vs centralized ({100 * central:.1f}%) |")
    print("|---|---|---|---|---|")
    for row in rows:
        if len(splits) < len(SPLITS):
            continue  # (a partial run prints its lines above)
        iid, skew = row[SPLITS[0][0]], row[SPLITS[1][0]]
        longer = f"{100 * skew['best_20']:.1f}%" if len(skew["scores"]) > 10 else "-"
        print(f"| {row['strategy']} | {100 * iid['best_10']:.1f}% | {100 * skew['best_10']:.1f}% | {longer} | "
              f"{100 * (skew['best_10'] - central):+.1f} points |")
    print(f"\n({time.monotonic() - started:.0f} s in all)")
    if opts.json:
        opts.json.write_text(json.dumps({"centralized": central, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
