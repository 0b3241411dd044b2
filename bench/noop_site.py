"""A no-op site for the benchmarks: receive the global model, nudge it, send it back.

Every floating tensor gets +0.001 (a new tensor) so the server really has new FULL params to average;
there is no training, so a round's time is the framework's own overhead (encode, transfer,
decode, validate, aggregate, persist). After sending, the site drops the received model and its
result before asking for the next task, as a training script that keeps one model does.

When ``BENCH_FIRST_TASK_DIR`` is set (bench/transports.py sets it), the site writes the
wall-clock time (``time.time()``) at which its first ``flare.receive()`` returned into
``$BENCH_FIRST_TASK_DIR/<site name>.txt``, so the launch-to-first-task time can be measured
from the moment ``simulator_run`` was called. (Not a ``FLKIT_`` variable: the external-process
runner does not pass ``FLKIT_*`` variables of its own environment on to the sites.) In-process
sites share the process's working directory, hence a folder given by the variable and a file
per site.
"""

import os
import time
from pathlib import Path

import torch

import flkit as flare

flare.init()
first_task_dir = os.environ.get("BENCH_FIRST_TASK_DIR")
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    if first_task_dir:
        Path(first_task_dir, f"{flare.get_site_name()}.txt").write_text(repr(time.time()))
        first_task_dir = None  # only the first task
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"accuracy": 0.0}))
        continue
    params = {}
    for name, value in model.params.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value + 0.001
        params[name] = value
    flare.send(flare.FLModel(params=params, metrics={"accuracy": 0.0}, meta={"NUM_STEPS_CURRENT_ROUND": 1}))
    # Like a training script, which keeps one model and loads each round's params into it, hold
    # nothing of this round while the next task arrives (else the peak counts two rounds' tensors).
    del model, params
