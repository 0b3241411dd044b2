"""A tiny in-process site script for tests/test_job_api.py that answers every task.

train: sends the received params plus ``--delta`` with metrics; validate: metrics only;
submit_model: the last params it trained.
"""

import argparse

import flkit as flare

parser = argparse.ArgumentParser()
parser.add_argument("--delta", type=float, default=1.0)
args = parser.parse_args()

flare.init()
last = None
while flare.is_running():
    model = flare.receive()
    if flare.is_submit_model():
        flare.send(flare.FLModel(params=last))
        continue
    score = float(sum(v.float().mean() for v in model.params.values()))
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": score}))
        continue
    last = {k: v + args.delta for k, v in model.params.items()}
    flare.send(flare.FLModel(params=last, metrics={"accuracy": score}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
