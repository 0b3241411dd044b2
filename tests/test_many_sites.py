"""Many sites in one simulation: a thousand in-process sites, all of them every round, and a sample
of a larger job; each round's sites answer and the model is their exact mean."""

from __future__ import annotations

import pytest
import torch

from flkit.job import FedAvgJob, ScriptRunner
from flkit.server.persistor import load_params

PLUS_ONE = """
import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, metrics={"accuracy": 0.5}))
"""


def _run_plus_one(tmp_path, name: str, initial: dict, n_clients: int, num_rounds: int, **workflow):
    """A job of PLUS_ONE sites, run by the simulator on its default backend."""
    (tmp_path / "plus_one.py").write_text(PLUS_ONE)
    job = FedAvgJob(name=name, initial_model=initial, n_clients=n_clients, num_rounds=num_rounds, key_metric=None,
                    **workflow)
    job.to_clients(ScriptRunner(script=str(tmp_path / "plus_one.py")))
    return job.simulator_run(tmp_path / "ws", quiet=True)


@pytest.mark.slow
def test_a_thousand_in_process_sites_complete_two_rounds(tmp_path):
    result = _run_plus_one(tmp_path, "thousand", {"w": torch.zeros(16, 16), "b": torch.zeros(16)}, 1000, 2)
    assert result.ok, result.reason
    assert [len(r.metrics) for r in result.rounds] == [1000, 1000]
    assert torch.equal(load_params(result.global_model_path)["w"], torch.full((16, 16), 2.0))


def test_a_sample_of_a_larger_job_takes_part_and_the_others_wait(tmp_path):
    result = _run_plus_one(tmp_path, "sampled", {"w": torch.zeros(4)}, 200, 3, clients_per_round=10, seed=4)
    assert result.ok, result.reason
    assert [len(r.sites) for r in result.rounds] == [10, 10, 10]
    assert len({frozenset(r.sites) for r in result.rounds}) == 3  # a new sample each round
    assert torch.equal(load_params(result.global_model_path)["w"], torch.full((4,), 3.0))


@pytest.mark.slow
def test_ten_thousand_sites_with_a_hundred_per_round_complete_and_only_sampled_ones_get_a_folder(tmp_path):
    result = _run_plus_one(tmp_path, "cross_device", {"w": torch.zeros(8)}, 10_000, 2, clients_per_round=100,
                           seed=1)
    assert [len(r.metrics) for r in result.rounds] == [100, 100]
    assert torch.equal(load_params(result.global_model_path)["w"], torch.full((8,), 2.0))
    # Only the sites that ran a task have a folder: the other 9,900 cost no worker, no file.
    assert len([p for p in (tmp_path / "ws").iterdir() if p.name.startswith("site-")]) <= 200
