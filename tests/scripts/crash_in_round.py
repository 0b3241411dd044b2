"""Trains nothing; raises in the round given by --crash_round (on --crash_site only)."""
import argparse

import flkit as flare

parser = argparse.ArgumentParser()
parser.add_argument("--crash_round", type=int, default=1)
parser.add_argument("--crash_site", default="site-2")
args = parser.parse_args()

flare.init()
while flare.is_running():
    model = flare.receive()
    if flare.get_site_name() == args.crash_site and model.current_round == args.crash_round:
        raise RuntimeError(f"deliberate failure in round {model.current_round}")
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
