"""The same learning job over each transport: in-process sites (memory), external processes over
shared memory, external processes over gRPC. Real data, real processes, the real server."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from flkit.job import FedAvgJob, ScriptRunner
from flkit.server.persistor import load_params

from conftest import SCRIPTS

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet, accuracy, load  # noqa: E402

# (external process, FLKIT_TRANSPORT, simulator backend, what the sites used)
CASES = {
    "memory": (False, "auto", "threads", {"name": "memory", "shm_active": False}),
    "shm": (True, "auto", "processes", {"name": "shm", "shm_active": True}),
    "shm-pool": (False, "auto", "processes", {"name": "shm", "shm_active": True}),
    "grpc": (True, "grpc", "processes", {"name": "grpc", "shm_active": False}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_sites_learn_digits_over_each_transport(tmp_path, monkeypatch, case):
    external, transport, backend, expected = CASES[case]
    monkeypatch.setenv("FLKIT_TRANSPORT", transport)
    torch.manual_seed(0)
    job = FedAvgJob(name=f"e2e_{case}", initial_model=SmallNet(), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "digits_transport.py"), launch_external_process=external))
    result = job.simulator_run(tmp_path / "ws", quiet=True, backend=backend)

    assert result.ok, result.reason
    for site in ("site-1", "site-2"):
        assert json.loads((tmp_path / "ws" / site / "transport.json").read_text()) == expected
    assert result.rounds[-1].score > 0.8  # the global model of round 1, scored by both sites
    final = SmallNet()
    final.load_state_dict(load_params(result.global_model_path))
    _, _, test_x, test_y = load()
    assert accuracy(final, test_x, test_y) > 0.85
    state = json.loads((tmp_path / "ws" / "server" / "round_state.json").read_text())
    assert state["global_model_round"] == 2 and state["status"] == "completed"
