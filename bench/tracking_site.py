"""Site script for bench/tracking_overhead.py: logs --records scalars per round and times the calls.

Per round it times ``--records`` calls of ``SummaryWriter.add_scalar`` and, as the floor, the same
number of plain JSON lines appended to a file (what any local logger does at least). Both times go
back to the server as metrics; the model goes back unchanged.
"""

import argparse
import json
import time
from pathlib import Path

import flkit as flare
from flkit.tracking import SummaryWriter

parser = argparse.ArgumentParser()
parser.add_argument("--records", type=int, default=20000)
args = parser.parse_args()

flare.init()
writer = SummaryWriter()
floor_file = Path(flare.get_config()["workspace"]) / "floor.jsonl"
while flare.is_running():
    model = flare.receive()
    step0 = model.current_round * args.records
    t0 = time.perf_counter()
    for i in range(args.records):
        writer.add_scalar("loss", 1.0 / (i + 1), global_step=step0 + i)
    t1 = time.perf_counter()
    with open(floor_file, "a") as fh:
        for i in range(args.records):
            fh.write(json.dumps({"key": "loss", "value": 1.0 / (i + 1), "step": step0 + i, "time": time.time()}) + "\n")
    t2 = time.perf_counter()
    flare.send(flare.FLModel(params=model.params, metrics={"log_us": (t1 - t0) / args.records * 1e6,
                                                           "floor_us": (t2 - t1) / args.records * 1e6}))
