"""Sends received + a per-site delta (FULL from the script's side) with a per-site step count.

site-1 adds 1 x (round + 1) with 1 step, site-2 adds -3 x (round + 1) with 3 steps, so the
steps-weighted global model moves by exactly -2 x (round + 1) per round.
"""
import flkit as flare

DELTA = {"site-1": 1.0, "site-2": -3.0}
STEPS = {"site-1": 1, "site-2": 3}

flare.init()
site = flare.get_site_name()
while flare.is_running():
    model = flare.receive()
    shift = DELTA[site] * (model.current_round + 1)
    params = {name: value + shift for name, value in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.5}, meta={"NUM_STEPS_CURRENT_ROUND": STEPS[site]}))
