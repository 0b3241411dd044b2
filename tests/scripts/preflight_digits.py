"""Digits training for the pre-flight check's tests: one batch under a check
(``flare.is_dry_run()``), and ``--fault`` sends one kind of bad result. Writes what it saw to
<site workspace>/preflight.json."""
import argparse
import json
import time
from pathlib import Path

import torch

import flkit as flare

from digits_task import SmallNet, accuracy, load

parser = argparse.ArgumentParser()
parser.add_argument("--fault", default="none",
                    choices=["none", "layout", "nan", "no_metrics", "no_steps", "raise", "slow", "diff_as_full"])
parser.add_argument("--sleep", type=float, default=0.0, help="with --fault slow: seconds before answering")
args = parser.parse_args()

net = SmallNet()
flare.init()
train_x, train_y, test_x, test_y = load()
seen = {"dry_run": [], "batches": []}
while flare.is_running():
    model = flare.receive()
    net.load_state_dict(model.params)
    received = {k: v.clone() for k, v in model.params.items()}
    score = accuracy(net, test_x, test_y)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    batches = 0
    for i in range(0, len(train_y), 32):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(train_x[i:i + 32]), train_y[i:i + 32]).backward()
        opt.step()
        batches += 1
        if flare.is_dry_run():
            break
    seen["dry_run"].append(flare.is_dry_run())
    seen["batches"].append(batches)
    Path(flare.get_config()["workspace"], "preflight.json").write_text(json.dumps(seen))
    if args.fault == "raise":
        raise RuntimeError("the data loader broke")
    if args.fault == "slow":
        time.sleep(args.sleep)
    params = {k: v.clone() for k, v in net.state_dict().items()}
    metrics = {} if args.fault == "no_metrics" else {"accuracy": score}
    meta = {} if args.fault == "no_steps" else {"NUM_STEPS_CURRENT_ROUND": batches}
    if args.fault == "layout":  # every kind of layout problem at once
        params["fc.weight"] = torch.zeros(10, 64)
        params["fc.bias"] = params["fc.bias"].double()
        del params["bn.running_var"]
        params["head.weight"] = torch.zeros(2)
    if args.fault == "nan":
        params["conv.bias"][0] = float("nan")
    if args.fault == "diff_as_full":
        params = {k: v - received[k] for k, v in params.items()}
    flare.send(flare.FLModel(params=params, metrics=metrics, meta=meta))
