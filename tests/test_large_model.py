"""A 300 MB model streams through a real round across processes, over gRPC and over the same-host
transport, and comes back exact. (Memory targets live in bench/large_model.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flkit.job import FedAvgJob, ScriptRunner
from flkit.runner.ports import free_port

from conftest import REPO, SCRIPTS, finish

VALUES = 75_000_000  # float32: 300 MB, in two tensors (one of 64M values, beyond any single message)


class Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(64 * 2**20))
        self.b = torch.nn.Parameter(torch.zeros(VALUES - 64 * 2**20))


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_300_mb_model_streams_through_a_round_across_processes(tmp_path, transport):
    job = FedAvgJob(name="large", initial_model=Big(), n_clients=2, num_rounds=1, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "round_site_update.py")))
    job_dir = job.export_job(tmp_path / "jobs")
    port = free_port()
    env = {**os.environ, "FLKIT_TOKEN": "t", "FLKIT_TRANSPORT": transport}
    flkit = [sys.executable, "-m", "flkit.cli"]
    server = subprocess.Popen([*flkit, "server", str(job_dir), "--insecure", "--host", "127.0.0.1", "--port",
                               str(port), "-w", str(tmp_path / "server")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen([*flkit, "client", str(job_dir), "--insecure", "--server", f"127.0.0.1:{port}",
                                 "--site", site, "-w", str(tmp_path / site)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for site in ("site-1", "site-2")]
    outs = finish([server, *clients], timeout=600)
    assert server.returncode == 0, outs[0]
    assert [c.returncode for c in clients] == [0, 0], outs[1:]
    final = load_file(tmp_path / "server" / "FL_global_model.safetensors")
    # round 0: site-k adds k/8 and weighs its result k (NUM_STEPS_CURRENT_ROUND): (1*1/8 + 2*2/8) / 3
    expected = (1 * (1 / 8) + 2 * (2 / 8)) / 3
    for name, size in (("a", 64 * 2**20), ("b", VALUES - 64 * 2**20)):
        assert final[name].shape == (size,)
        assert torch.all(final[name] == torch.tensor(expected, dtype=torch.float32)), name
