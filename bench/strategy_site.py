"""The site of bench/strategies.py: the CIFAR-10 example's training on its offline digits, written as
a user would turn it into an FL client, with FedProx and SCAFFOLD as NVFlare's examples add them.

The example's own modules give the data and the model (examples/cifar10/src, shipped with the job: ``data.load_datasets
("digits")``, ``data.shard`` by site name through flkit.data, the tutorial CNN ``Net``); training is
the example's: SGD with momentum 0.9, lr 0.003, batches of 4, ``--epochs`` (2) epochs a round. The
metric sent back is the received global model's accuracy on the held-out digits (NVFlare's
convention), which the server uses to keep the best global model.
"""

from __future__ import annotations

import argparse
import copy

import data  # the example's (bench/strategies.py ships it with the job)
import torch
from net import Net
from torch import nn
from torch.utils.data import DataLoader

import flkit as flare
from flkit import AlgorithmConstants
from flkit.pt import PTFedProxLoss, PTScaffoldHelper, get_lr_values

parser = argparse.ArgumentParser()
parser.add_argument("--scheme", default="iid")
parser.add_argument("--alpha", type=float, default=None)
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

torch.set_num_threads(1)  # a small CNN on batches of 4: more threads only wait on each other
flare.init()
trainset, testset = data.load_datasets("digits")
trainset = data.shard(trainset, flare.get_site_name(), flare.system_info()["num_sites"], args.scheme, args.alpha)
train_loader = DataLoader(trainset, batch_size=4, shuffle=True)
test_x, test_y = testset.tensors
net = Net()
scaffold = None

while flare.is_running():
    model = flare.receive()
    net.load_state_dict(model.params)
    net.eval()
    with torch.no_grad():
        accuracy = (net(test_x).argmax(1) == test_y).float().mean().item()
    if not flare.is_train():
        flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
        continue
    meta: dict = {}
    mu = model.meta.get(AlgorithmConstants.FEDPROX_MU)
    controls = model.meta.get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
    global_net = copy.deepcopy(net)
    if controls is not None:
        scaffold = scaffold or PTScaffoldHelper()
        scaffold.init(net)
        scaffold.load_global_controls(controls)
        c_global, c_local = scaffold.get_params()
    proximal = PTFedProxLoss(mu) if mu else None
    torch.manual_seed(model.current_round)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.003, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    net.train()
    steps = 0
    for _ in range(args.epochs):
        for inputs, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(net(inputs), labels)
            if proximal is not None:
                loss = loss + proximal(net, global_net)
            loss.backward()
            optimizer.step()
            if controls is not None:
                scaffold.model_update(net, get_lr_values(optimizer)[0], c_global, c_local)
            steps += 1
    if controls is not None:
        scaffold.terms_update(net, get_lr_values(optimizer)[0], c_global, c_local, global_net)
        meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = scaffold.get_delta_controls()
    meta["NUM_STEPS_CURRENT_ROUND"] = steps
    flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": accuracy}, meta=meta))
