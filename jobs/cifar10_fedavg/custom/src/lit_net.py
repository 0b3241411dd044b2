"""Lightning pieces of the example: the tutorial CNN as a LightningModule, and its data.

``LitNet`` wraps ``net.Net`` unchanged and logs ``val_acc`` per step and per epoch, so
``trainer.validate()`` reports ``val_acc_epoch`` (the FL job's key metric) over the whole
test set. ``CIFAR10DataModule`` serves ``data.load_datasets`` (CIFAR-10 or the offline
digits); given a site name it serves only that site's shard of the training set.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn, optim
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

import data
from net import Net

NUM_CLASSES = 10


class LitNet(pl.LightningModule):
    """``Net`` trained with SGD (momentum 0.9) on cross-entropy, as in the plain script."""

    def __init__(self, lr: float = 0.003) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = Net()
        self.criterion = nn.CrossEntropyLoss()
        self.train_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=NUM_CLASSES, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        # on_step and on_epoch: logged as val_acc_step and val_acc_epoch (the whole set, all ranks)
        self.log("val_loss", self.criterion(logits, y), sync_dist=True)
        self.log("val_acc", self.val_acc, on_step=True, on_epoch=True)

    def configure_optimizers(self) -> optim.Optimizer:
        return optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class CIFAR10DataModule(pl.LightningDataModule):
    """Training and test data of the example; ``site``/``num_sites`` pick one FL site's shard."""

    def __init__(self, dataset: str = "cifar10", data_path: str = data.DEFAULT_DATA_PATH, batch_size: int = 4,
                 site: str | None = None, num_sites: int = 1) -> None:
        super().__init__()
        self.dataset, self.data_path, self.batch_size = dataset, data_path, batch_size
        self.site, self.num_sites = site, num_sites

    def setup(self, stage: str) -> None:
        if hasattr(self, "testset"):  # Lightning calls setup() at every validate()/fit(): load once
            return
        trainset, self.testset = data.load_datasets(self.dataset, self.data_path)
        self.trainset = trainset if self.site is None else data.shard(trainset, self.site, self.num_sites)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.trainset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.testset, batch_size=256)
