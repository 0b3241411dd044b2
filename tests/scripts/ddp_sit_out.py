"""A 2-rank DDP site whose process group times out after 3 s, in a job where the other site takes
6 s per task: between its tasks this site waits longer than its collective timeout.

Each rank records the rounds it went through (``rounds_rank<N>.jsonl`` in its working folder).
"""

import datetime
import json

import torch.distributed as dist

import flkit as flare

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
rank = dist.get_rank()
flare.init(rank=str(rank))
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    with open(f"rounds_rank{rank}.jsonl", "a") as fh:
        fh.write(json.dumps({"round": model.current_round}) + "\n")
    dist.barrier()  # the ranks really work together on each task
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, metrics={"accuracy": 0.5}))
dist.destroy_process_group()
