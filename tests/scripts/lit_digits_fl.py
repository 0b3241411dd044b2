# A Lightning FL script that records, per round and rank, what the tests check: the task,
# the received and loaded params, the explicit validate() metrics, the fit's own metrics,
# global_step, and the optimizer/scheduler state at the first batch of each fit().
import argparse
import json
import os
from pathlib import Path

from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import Callback
from safetensors.torch import save_file

import flkit_lightning as flare

from lit_digits import DigitsDataModule, LitSmall


def checksum(params):
    return float(sum(v.double().sum() for v in params.values()))


def scalars(metrics):
    return {k: float(v) for k, v in metrics.items()}


class StateAtStart(Callback):
    """Reads the optimizer state at the first batch of a fit(), after FLCallback restored it."""

    def on_train_start(self, trainer, pl_module):
        self.seen = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.seen is None:
            opt = trainer.optimizers[0]
            steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
            self.seen = {"adam_step": max(steps, default=0.0), "lr": opt.param_groups[0]["lr"],
                         "sched_last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--record_dir", required=True)
    parser.add_argument("--restore_state", type=int, default=1)
    parser.add_argument("--skip_validate", action="store_true")
    parser.add_argument("--strict", type=int, default=1)
    parser.add_argument("--one_batch_when_checked", action="store_true")
    args = parser.parse_args()

    seed_everything(0)
    state_at_start = StateAtStart()
    trainer = Trainer(max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
                      strategy="ddp" if args.devices > 1 else "auto", callbacks=[state_at_start],
                      enable_progress_bar=False, enable_model_summary=False)
    flare.patch(trainer, restore_state=bool(args.restore_state), load_state_dict_strict=bool(args.strict))
    if args.one_batch_when_checked and flare.is_dry_run():  # a pre-flight check (flkit check): one batch
        trainer.limit_train_batches = trainer.limit_val_batches = 1
    site = flare.get_site_name()
    shard = int(site.split("-")[-1]) - 1
    datamodule = DigitsDataModule(shard, flare.system_info()["num_sites"], batch_size=[32, 64][shard % 2])
    model = LitSmall()
    rank = trainer.global_rank
    record_dir = Path(args.record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)

    while flare.is_running():
        received = flare.receive()
        record = {"round": received.current_round, "task": flare.get_task_name(), "rank": rank,
                  "pid": os.getpid(), "received": checksum(received.params)}
        if not args.skip_validate:
            trainer.validate(model, datamodule=datamodule, verbose=False)
            record["validated"] = scalars(trainer.callback_metrics)
            record["loaded"] = checksum(model.state_dict())
        step_before = trainer.global_step
        state_at_start.seen = None
        trainer.fit(model, datamodule=datamodule)
        record.update(fit_metrics=scalars(trainer.callback_metrics), global_step=trainer.global_step,
                      steps=trainer.global_step - step_before, batches=trainer.num_training_batches,
                      at_start=state_at_start.seen)
        if rank == 0 and record["steps"]:
            sent = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            save_file(sent, str(record_dir / f"{site}-round{received.current_round}.safetensors"))
        with open(record_dir / f"{site}-rank{rank}.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
