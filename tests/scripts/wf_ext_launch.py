"""External script: records where and as what it was started (launched.json in its cwd), then answers."""
import json
import os
import sys

import flkit as flare

flare.init()
with open("launched.json", "w") as fh:
    json.dump({"cwd": os.getcwd(), "argv0": sys.argv[0]}, fh)
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params=model.params, metrics={"accuracy": 0.5}))
