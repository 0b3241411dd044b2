"""The site script of bench/lightning_overhead.py: patch(trainer), then validate + fit per round."""

import argparse

import flkit_lightning as flare

from lit_bench import BenchModule, loader, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--layers", type=int, required=True)
    args = parser.parse_args()
    model = BenchModule(args.params, args.layers)
    data = loader(model.dim)
    fit_trainer = trainer()
    flare.patch(fit_trainer)
    while flare.is_running():
        fit_trainer.validate(model, dataloaders=data, verbose=False)
        fit_trainer.fit(model, train_dataloaders=data, val_dataloaders=data)


if __name__ == "__main__":
    main()
