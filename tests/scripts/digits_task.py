"""A small real learning task on scikit-learn's digits, shared by the test scripts and the tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def load(shard: int = 0, num_shards: int = 1):
    """(train_x, train_y, test_x, test_y); training rows i with i % num_shards == shard."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    x, y = x[perm], y[perm]
    n_test = 360
    train_x, train_y = x[n_test:], y[n_test:]
    keep = torch.arange(len(train_y)) % num_shards == shard
    return train_x[keep], train_y[keep], x[:n_test], y[:n_test]


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 1, seed: int = 0,
          on_loss=None) -> int:
    """Seeded SGD; returns the number of optimizer steps."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = order[i : i + 32]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            steps += 1
            if on_loss is not None:
                on_loss(loss.item(), steps)
    return steps


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net(x).argmax(1) == y).float().mean().item()


def eval_split(site: str, num_sites: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Site ``site-N``'s evaluation data: the test rows i with i % num_sites == N - 1."""
    _, _, test_x, test_y = load()
    keep = torch.arange(len(test_y)) % num_sites == int(site.rsplit("-", 1)[1]) - 1
    return test_x[keep], test_y[keep]
