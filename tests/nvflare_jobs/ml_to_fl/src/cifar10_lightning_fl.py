# The Lightning script in the shape of NVFlare's ml-to-fl/pt/src/cifar10_lightning_fl.py (digits data).
from pathlib import Path

# (1) import nvflare lightning client API
import nvflare.client.lightning as flare
from pytorch_lightning import LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader

from data import load
from lit_net import LitNet

seed_everything(7)


class DigitsDataModule(LightningDataModule):
    def __init__(self, site_name, num_sites):
        super().__init__()
        self.trainset, self.testset = load(site_name, num_sites)

    def train_dataloader(self):
        return DataLoader(self.trainset, batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.testset, batch_size=100)


def main():
    model = LitNet()
    # The progress bar is Lightning's own choice: RichProgressBar, as rich is installed.
    trainer = Trainer(max_epochs=1, devices=1, accelerator="cpu")

    # (2) patch the lightning trainer
    flare.patch(trainer)
    dm = DigitsDataModule(flare.get_site_name(), flare.system_info()["num_sites"])

    while flare.is_running():
        # (3) receives FLModel from NVFlare
        input_model = flare.receive()
        print(f"\n[Current Round={input_model.current_round}, Site = {flare.get_site_name()}]\n")

        # (4) evaluate the current global model to allow server-side model selection
        print("--- validate global model ---")
        trainer.validate(model, datamodule=dm)

        # perform local training starting with the received global model
        print("--- train new model ---")
        trainer.fit(model, datamodule=dm)

    # Not in NVFlare's script; for the test: the progress bar this trainer used.
    Path(flare.get_config()["workspace"], "progress_bar.txt").write_text(type(trainer.progress_bar_callback).__name__)


if __name__ == "__main__":
    main()
