"""The small CNN from PyTorch's "Training a classifier" (CIFAR-10) tutorial.

Kept byte-for-byte the same architecture as the tutorial so that results are comparable
with it, and so the federated run starts from a model everyone already knows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Two conv layers and three fully connected layers, for 3x32x32 inputs and 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))  # 3x32x32 -> 6x14x14
        x = self.pool(F.relu(self.conv2(x)))  # 6x14x14 -> 16x5x5
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
