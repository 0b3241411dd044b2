"""Train the tutorial CNN on CIFAR-10 (or on the offline digits stand-in) with Lightning DDP.

cifar10_lightning_ddp_original.py is a plain Lightning script on several devices (one process
each); cifar10_lightning_ddp_fl.py is the same file turned into a federated-learning client with
flkit_lightning, and `diff -w` between the two shows every changed line. Started with plain
`python`, Lightning starts the other ranks itself (it runs this script again for each); under
torchrun the ranks exist already. Without a GPU the ranks train on the CPU over gloo.

    python src/cifar10_lightning_ddp_original.py --dataset digits   # plain DDP training, 2 ranks
    python job.py --script src/cifar10_lightning_ddp_fl.py --launch_process \\
        --script_args "--dataset digits"                            # FL: 2 sites, 2 ranks each
"""

from __future__ import annotations

import argparse

import flkit_lightning as flare
import torch
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
    parser.add_argument("--batch_size", type=int, default=4, help="batch size per rank, as in the tutorial")
    parser.add_argument("--devices", type=int, default=2, help="ranks: GPUs if there are any, else CPU processes")
    parser.add_argument("--lr", type=float, default=0.003, help="learning rate of SGD with momentum 0.9")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    seed_everything(0)
    model = LitNet(lr=args.lr)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    trainer = Trainer(max_epochs=args.epochs, accelerator=accelerator, devices=args.devices, strategy="ddp",
                      enable_progress_bar=False)
    flare.patch(trainer)  # on every rank: starts the other ranks now, not at the first fit()
    site, num_sites = flare.get_site_name(), flare.system_info()["num_sites"]
    datamodule = CIFAR10DataModule(args.dataset, args.data_path, args.batch_size, site, num_sites)

    while flare.is_running():
        trainer.validate(model, datamodule=datamodule)  # scores the model before training
        trainer.fit(model, datamodule=datamodule)


if __name__ == "__main__":
    main()
