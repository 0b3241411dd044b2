"""Train the tutorial CNN on CIFAR-10 (or on the offline digits stand-in) with PyTorch Lightning.

cifar10_lightning_original.py is a plain Lightning script; cifar10_lightning_fl.py is the same
file turned into a federated-learning client with flkit_lightning, and `diff -w` between the
two shows every changed line. The FL script runs the same validate() and fit() once per round.

    python src/cifar10_lightning_original.py --dataset digits     # plain training, offline
    python job.py --script src/cifar10_lightning_fl.py --key_metric val_acc_epoch \\
        --script_args "--dataset digits"                          # FL: 2 sites
"""

from __future__ import annotations

import argparse

from pytorch_lightning import Trainer, seed_everything

import data
from lit_net import CIFAR10DataModule, LitNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=data.DATASETS, default="cifar10", help="training and test data")
    parser.add_argument("--data_path", default=data.DEFAULT_DATA_PATH, help="folder holding CIFAR-10")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of training (in FL: per round)")
    parser.add_argument("--batch_size", type=int, default=4, help="mini-batch size, as in the tutorial")
    parser.add_argument("--lr", type=float, default=0.003, help="learning rate of SGD with momentum 0.9")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    seed_everything(0)
    model = LitNet(lr=args.lr)
    trainer = Trainer(max_epochs=args.epochs, accelerator="auto", devices=1, enable_progress_bar=False)
    datamodule = CIFAR10DataModule(args.dataset, args.data_path, args.batch_size)

    trainer.validate(model, datamodule=datamodule)  # scores the model before training
    trainer.fit(model, datamodule=datamodule)


if __name__ == "__main__":
    main()
