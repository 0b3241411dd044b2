"""Builds the same runner for two sites in a loop, as NVFlare 2.6 job scripts do (tests/test_job_api.py).

pipe_connect_type has no effect in flkit, so each iteration raises the same IgnoredArgumentWarning
from the same line; Python's default filter shows it once.
"""

import torch

from flkit.job import FedAvgJob, PipeConnectType, ScriptRunner

job = FedAvgJob(initial_model=torch.nn.Linear(2, 1), n_clients=2, num_rounds=1)
for i in range(2):
    runner = ScriptRunner(script=__file__, pipe_connect_type=PipeConnectType.VIA_RELAY)  # the warning's line
    job.to(runner, f"site-{i + 1}")
print("sites:", ",".join(sorted(job._sites)))
