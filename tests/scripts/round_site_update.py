"""Each site adds (round + 1) * its number / 8 to every value: exact in float32, so a round lost or
run twice changes the final model.

Holding a site in a round (the test does something meanwhile, e.g. kills a process):
``--hold_round R`` holds every site in round R until ``<hold_dir>/go`` exists; ``--hold SITE@R``
holds one site until ``<hold_dir>/go-SITE`` exists. A held site first touches
``<hold_dir>/<site>.held`` (``<site>.r<R>.held`` for --hold)."""
import argparse
import pathlib
import time

import flkit as flare

parser = argparse.ArgumentParser()
parser.add_argument("--hold_round", type=int, default=-1)
parser.add_argument("--hold", action="append", default=[], help="SITE@ROUND")
parser.add_argument("--hold_dir", default="")
args = parser.parse_args()


def hold(marker: str, go: str) -> None:
    folder = pathlib.Path(args.hold_dir)
    (folder / marker).touch()
    deadline = time.monotonic() + 120
    while not (folder / go).exists():  # the test's signal, not a timing guess
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {go} signal")
        time.sleep(0.05)


flare.init()
site = flare.get_site_name()
number = int(site.rsplit("-", 1)[1])
holds = {int(r) for s, r in (h.split("@") for h in args.hold) if s == site}
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    step = (model.current_round + 1) * number / 8
    params = {k: v + step for k, v in model.params.items()}
    if model.current_round == args.hold_round:
        hold(f"{site}.held", "go")
    if model.current_round in holds:
        hold(f"{site}.r{model.current_round}.held", f"go-{site}")
    flare.send(flare.FLModel(params=params, metrics={"accuracy": float(model.current_round)},
                             meta={"NUM_STEPS_CURRENT_ROUND": number}))
