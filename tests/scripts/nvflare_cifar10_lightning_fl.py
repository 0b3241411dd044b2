# A Lightning training script written for NVFlare's Client API, in the shape of NVFlare's
# ml-to-fl `cifar10_lightning_fl.py`: a LightningModule from a sibling module, a DataModule,
# a Trainer, flare.patch(trainer), then per round receive(), validate() the global model and
# fit(). The data is scikit-learn's digits instead of a CIFAR-10 download. The test replaces
# only the nvflare import line with flkit_lightning's.
import argparse
from pathlib import Path

import nvflare.client.lightning as flare
from pytorch_lightning import LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from digits_task import load
from lit_digits import LitSmall

seed_everything(7)

BATCH_SIZE = 32


class DigitsDataModule(LightningDataModule):
    def __init__(self, shard, num_shards, batch_size=BATCH_SIZE):
        super().__init__()
        self.shard, self.num_shards, self.batch_size = shard, num_shards, batch_size

    def setup(self, stage: str):
        if stage == "fit" or stage == "validate":
            train_x, train_y, test_x, test_y = load(self.shard, self.num_shards)
            self.digits_train, self.digits_val = TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)

    def train_dataloader(self):
        return DataLoader(self.digits_train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.digits_val, batch_size=self.batch_size)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    model = LitSmall()
    # NVFlare's script passes devices=None on CPU, which Lightning >= 2.0 rejects; 1 is its meaning.
    # The progress bar is left as Lightning chooses it (RichProgressBar when rich is installed).
    trainer = Trainer(max_epochs=args.epochs, devices=1)

    # (2) patch the lightning trainer
    flare.patch(trainer)
    site = flare.get_site_name()
    dm = DigitsDataModule(int(site.split("-")[-1]) - 1, flare.system_info()["num_sites"])

    while flare.is_running():
        # (3) receives FLModel; after flare.patch, validate/fit load the global model themselves
        input_model = flare.receive()
        print(f"\n[Current Round={input_model.current_round}, Site = {flare.get_site_name()}]\n")

        # (4) evaluate the current global model to allow server-side model selection
        print("--- validate global model ---")
        trainer.validate(model, datamodule=dm)

        # perform local training starting with the received global model
        print("--- train new model ---")
        trainer.fit(model, datamodule=dm)

    # For the test: the progress bar each trainer ended with.
    Path(flare.get_config()["workspace"], "progress_bar.txt").write_text(type(trainer.progress_bar_callback).__name__)


if __name__ == "__main__":
    main()
