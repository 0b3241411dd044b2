"""A SCAFFOLD site written as NVFlare's examples write one (NVFlare's imports: the tests run it with
only those changed), on a label-skewed split of scikit-learn's digits; plain SGD, 2 epochs a round."""

from __future__ import annotations

import argparse
import copy

import nvflare.client as flare
import torch
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper, get_lr_values
from torch import nn

from digits_task import SmallNet, accuracy, load

parser = argparse.ArgumentParser()
parser.add_argument("--skew", type=float, default=0.7, help="share of a site's samples from its own classes")
args = parser.parse_args()

flare.init()
site = int(flare.get_site_name().split("-")[-1]) - 1
n_sites = flare.system_info()["num_sites"]
train_x, train_y, test_x, test_y = load()
# label skew: a site keeps most samples of "its" classes and a few of the others (disjoint across sites)
gen = torch.Generator().manual_seed(0)
draw = torch.rand(len(train_y), generator=gen)
own = train_y % n_sites == site
other = ~own & (torch.arange(len(train_y)) % n_sites == site)
chosen = (own & (draw < args.skew)) | (other & (draw >= args.skew))
x, y = train_x[chosen], train_y[chosen]
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
