"""A FedProx site written as NVFlare's FedProx example writes one (NVFlare's imports: the tests run it
with only those changed): it reads ``fedprox_mu`` from each
round's meta, snapshots the received global model and adds PTFedProxLoss to its loss. Reports the
coefficient it saw (metric ``mu``; 0 when the task carried none) and how far it moved (``moved``)."""

from __future__ import annotations

import copy

import nvflare.client as flare
import torch
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss
from torch import nn

from digits_task import SmallNet, accuracy, load

flare.init()
site = int(flare.get_site_name().split("-")[-1]) - 1
x, y, test_x, test_y = load(site, flare.system_info()["num_sites"])
net = SmallNet()

while flare.is_running():
    model = flare.receive()
    net.load_state_dict(model.params)
    score = accuracy(net, test_x, test_y)
    if not flare.is_train():
        flare.send(flare.FLModel(metrics={"accuracy": score}))
        continue
    mu = model.meta.get(AlgorithmConstants.FEDPROX_MU, 0.0)
    global_model = copy.deepcopy(net)
    fedprox_loss = PTFedProxLoss(mu=mu)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.manual_seed(model.current_round)
    net.train()
    steps = 0
    for i in range(0, len(y), 32):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x[i:i + 32]), y[i:i + 32])
        loss = loss + fedprox_loss(net, global_model)
        loss.backward()
        optimizer.step()
        steps += 1
    pairs = zip(net.parameters(), global_model.parameters(), strict=True)
    moved = sum(float((p.detach() - q.detach()).pow(2).sum()) for p, q in pairs) ** 0.5
    flare.send(flare.FLModel(params=net.state_dict(), metrics={"accuracy": score, "mu": mu, "moved": moved},
                             meta={"NUM_STEPS_CURRENT_ROUND": steps}))
