"""Holds each task for 0.2 s and records when it held it (for the simulator's `threads` cap).

Each line of <site workspace>/holds.jsonl: the round, when receive() returned and when the
script was about to call send() (time.monotonic, comparable across the sites of one process).
"""
import json
import threading
import time
from pathlib import Path

import flkit as flare

flare.init()
holds = Path(flare.get_config()["workspace"]) / "holds.jsonl"
while flare.is_running():
    model = flare.receive()
    got = time.monotonic()
    threading.Event().wait(0.2)  # a fixed hold: this event is never set
    with open(holds, "a") as fh:
        fh.write(json.dumps({"round": model.current_round, "task": flare.get_task_name(), "start": got,
                             "end": time.monotonic()}) + "\n")
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
