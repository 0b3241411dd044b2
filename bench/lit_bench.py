"""The LightningModule and data shared by bench/lightning_overhead.py and bench/lightning_site.py.

A stack of square Linear layers sized to about ``params`` parameters, trained on a few random
batches: only shapes matter here, so the time is Lightning's and flkit's, not the data's.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

SAMPLES, BATCH = 64, 32


class BenchModule(pl.LightningModule):
    def __init__(self, params: int, layers: int) -> None:
        super().__init__()
        dim = max(1, round((-1 + math.sqrt(1 + 4 * params / layers)) / 2))
        self.net = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", self(x).pow(2).mean(), on_step=True, on_epoch=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4, momentum=0.9)


def loader(dim: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(SAMPLES, dim)), batch_size=BATCH)


def trainer() -> pl.Trainer:
    return pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
