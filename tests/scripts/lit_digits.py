"""A small Lightning task on scikit-learn's digits, shared by the Lightning test scripts."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from digits_task import SmallNet, load


class LitSmall(pl.LightningModule):
    """SmallNet with Adam and a per-epoch StepLR, so optimizer and scheduler state matter."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.model = SmallNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("val_acc", acc, on_step=True, on_epoch=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)}


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, shard: int = 0, num_shards: int = 1, batch_size: int = 32) -> None:
        super().__init__()
        self.shard, self.num_shards, self.batch_size = shard, num_shards, batch_size

    def setup(self, stage: str) -> None:
        train_x, train_y, test_x, test_y = load(self.shard, self.num_shards)
        self.train, self.test = TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.test, batch_size=64)
