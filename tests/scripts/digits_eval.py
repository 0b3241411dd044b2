"""An evaluation script in NVFlare's shape (``flare.is_evaluate()``): scores the model it receives
on this site's split of the digits test set (``eval_split``) and sends its metrics, nothing else.

``--fail_site SITE``: that site raises when it gets the task (its data "cannot be read")."""

import argparse

import torch

import flkit as flare

from digits_task import SmallNet, eval_split

parser = argparse.ArgumentParser()
parser.add_argument("--num_sites", type=int, default=3)
parser.add_argument("--fail_site", default="")
args = parser.parse_args()

flare.init()
site = flare.get_site_name()
x, y = eval_split(site, args.num_sites)
net = SmallNet()
while flare.is_running():
    model = flare.receive()
    if not flare.is_evaluate():
        raise RuntimeError(f"an evaluate-only job sent a {flare.get_task_name()!r} task")
    if site == args.fail_site:
        raise OSError(f"{site} cannot read its evaluation data")
    net.load_state_dict(model.params)
    net.eval()
    with torch.no_grad():
        logits = net(x)
    flare.send(flare.FLModel(metrics={
        "accuracy": (logits.argmax(1) == y).float().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, y).item(),
    }))
