"""A no-op site for bench/round_overhead.py: receive the global model, nudge it, send it back.

Every floating tensor gets +0.001 so the server really has new FULL params to average;
there is no training, so a round's time is the framework's own overhead (encode, transfer,
decode, validate, aggregate, persist).
"""

import torch

import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": 0.0}))
        continue
    params = {}
    for name, value in model.params.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value + 0.001
        params[name] = value
    flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
