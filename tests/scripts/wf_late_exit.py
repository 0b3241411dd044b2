"""External script that keeps working for argv[1] seconds after the job ended, then writes late_done."""
import sys
import threading

import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
threading.Event().wait(float(sys.argv[1]))  # "saving checkpoints": never set, a fixed delay
with open("late_done", "w") as fh:
    fh.write("done")
