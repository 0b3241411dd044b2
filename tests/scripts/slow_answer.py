"""A site that takes 6 s per task (a slow hospital): the other sites wait for it each round."""

import threading

import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    threading.Event().wait(6.0)  # working (nobody sets this event)
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, metrics={"accuracy": 0.5}))
