"""A SCAFFOLD site written as NVFlare's examples write one (PTScaffoldHelper, meta keys), on a
Dirichlet split of scikit-learn's digits; plain SGD, 2 epochs a round."""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import flkit as flare
from flkit import AlgorithmConstants
from flkit.data import partition
from flkit.pt import PTScaffoldHelper, get_lr_values

from digits_task import SmallNet, accuracy, load

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, default=0.5)
args = parser.parse_args()

flare.init()
site = flare.get_site_name()
train_x, train_y, test_x, test_y = load()
split = partition(train_y.tolist(), flare.system_info()["num_sites"], "dirichlet", seed=0, alpha=args.alpha,
                  min_size=32)
x, y = train_x[split.indices(site)], train_y[split.indices(site)]
net = SmallNet()
helper = PTScaffoldHelper()
helper.init(model=net)

while flare.is_running():
    model = flare.receive()
    net.load_state_dict(model.params)
    score = accuracy(net, test_x, test_y)
    if not flare.is_train():
        flare.send(flare.FLModel(metrics={"accuracy": score}))
        continue
    helper.load_global_controls(weights=model.meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL])
    c_global_para, c_local_para = helper.get_params()
    global_net = copy.deepcopy(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    torch.manual_seed(model.current_round)
    net.train()
    steps = 0
    for _ in range(2):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 16):
            idx = order[i:i + 16]
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            optimizer.step()
            helper.model_update(model=net, curr_lr=get_lr_values(optimizer)[0], c_global_para=c_global_para,
                                c_local_para=c_local_para)
            steps += 1
    helper.terms_update(model=net, curr_lr=get_lr_values(optimizer)[0], c_global_para=c_global_para,
                        c_local_para=c_local_para, model_global=global_net)
    flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": score},
                             meta={"NUM_STEPS_CURRENT_ROUND": steps,
                                   AlgorithmConstants.SCAFFOLD_CTRL_DIFF: helper.get_delta_controls()}))
