"""SCAFFOLD end to end: NVFlare-shaped site scripts (PTScaffoldHelper) on a Dirichlet split of
scikit-learn's digits, with more sites than workers, so a site's script runs in another process
from round to round; the sites' control variates live in their folders and stay consistent with
the server's (c = the mean of every site's c_i), and a server that resumes goes on from them."""

from __future__ import annotations

import json
import sys  # noqa: E402,I001
from pathlib import Path

import pytest
import safetensors.torch
import torch

from flkit.errors import FLKitError
from flkit.job import FedJob, ScriptRunner
from flkit.pt import PTScaffoldHelper
from flkit.pt.scaffold import STATE_DIR

from conftest import SCRIPTS, with_flkit_import

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet  # noqa: E402


def _job(script: Path, rounds: int = 3) -> FedJob:
    from flkit.job import FedAvg, IntimeModelSelector

    job = FedJob(name="scaffold", min_clients=4, strategy="scaffold")
    job.to_server(FedAvg(num_clients=4, num_rounds=rounds, model=SmallNet()))
    job.to_server(IntimeModelSelector(key_metric="accuracy"))
    job.to_clients(ScriptRunner(script=str(script)))
    return job


@pytest.mark.slow
def test_scaffold_with_more_sites_than_workers_keeps_site_controls_consistent(tmp_path):
    ws = tmp_path / "ws"
    script = with_flkit_import(SCRIPTS / "scaffold_digits.py", tmp_path / "code")  # NVFlare's, imports changed
    _job(script, 3).simulator_run(ws, n_clients=4, threads=2, quiet=True, backend="processes")
    state = json.loads((ws / "server" / "round_state.json").read_text())
    assert state["status"] == "completed", state["reason"]
    assert state["strategy"]["state"]["aggregated"] == {f"site-{i}": 2 for i in range(1, 5)}
    assert max(r["score"] for r in state["history"] if r["score"] is not None) > 0.75  # it learns
    server_c = safetensors.torch.load_file(str(ws / "server" / "strategy_state.safetensors"))
    sites_c = [safetensors.torch.load_file(str(ws / f"site-{i}" / STATE_DIR / "c_local.round-2.safetensors"))
               for i in range(1, 5)]
    # the round the server names (1, at round 2's start) and the one before it are kept; round 2's is new
    assert sorted(p.name for p in (ws / "site-1" / STATE_DIR).iterdir()) == [
        f"c_local.round-{r}.safetensors" for r in range(3)]
    for name, c in server_c.items():
        mean = sum(site[name[2:]] for site in sites_c) / 4
        assert mean.abs().max() > 0  # not trivially zero
        torch.testing.assert_close(c, mean.reshape(-1), rtol=1e-4, atol=1e-5)


def test_helper_takes_the_control_variate_of_the_round_the_server_names(tmp_path):
    """The site wrote rounds 0, 1 and 2; the server names round 2 (live) or, resumed from its saved state,
    which may lag a round, round 1: both are there; older ones are dropped."""
    net = torch.nn.Linear(2, 1)
    folder = tmp_path / STATE_DIR
    for r in range(3):
        PTScaffoldHelper._save_local(folder, r, {"weight": torch.full((1, 2), float(r)), "bias": torch.full((1,), 1.0)})
    helper = PTScaffoldHelper()
    helper.init(net)
    _, c_local = helper.get_params()
    helper._load_local(folder, 2, c_local)
    assert torch.equal(c_local["weight"], torch.full((1, 2), 2.0))
    assert sorted(p.name for p in folder.iterdir()) == ["c_local.round-1.safetensors", "c_local.round-2.safetensors"]
    helper._load_local(folder, 1, c_local)  # a server resumed from the round before
    assert torch.equal(c_local["weight"], torch.full((1, 2), 1.0))
    helper._load_local(folder, None, c_local)  # never aggregated: zeros
    assert torch.equal(c_local["bias"], torch.zeros(1))
    with pytest.raises(FLKitError, match="control variate of round 0 is missing"):
        helper._load_local(folder, 0, c_local)


def test_a_result_without_control_variates_fails_the_site_not_the_model(tmp_path):
    from flkit.errors import ValidationError
    from flkit.strategy import SiteResult, create

    strategy = create("scaffold", {})
    base = {"w": torch.zeros(2)}
    strategy.population(["a", "b"])
    assert strategy.train_tensors(0, base)["scaffold_c_global"]["w"].tolist() == [0.0, 0.0]
    out = {"w": torch.empty(2)}
    aggregator = strategy.aggregator(0)
    aggregator.start(0, base, lambda: out)
    with pytest.raises(ValidationError, match="must carry meta\\['scaffold_c_diff'\\]"):
        aggregator.add(SiteResult("a", {"w": torch.ones(2)}, "FULL", 1.0))
    with pytest.raises(ValidationError, match="does not match the model's floating tensors"):
        aggregator.add(SiteResult("a", {"w": torch.ones(2)}, "FULL", 1.0, meta_tensors={
            "scaffold_c_diff": {"v": torch.ones(2)}}))
    aggregator.add(SiteResult("a", {"w": torch.tensor([2.0, 4.0])}, "FULL", 1.0,
                              meta_tensors={"scaffold_c_diff": {"w": torch.tensor([1.0, 3.0])}}))
    aggregator.finish()
    # the model: a's alone; c: a's change over the job's 2 sites
    assert out["w"].tolist() == [2.0, 4.0]
    assert strategy.state_tensors()["c/w"].tolist() == [0.5, 1.5]
    assert strategy.state_dict() == {"aggregated": {"a": 0}}
    assert strategy.configure_train(1, ["a", "b"], None) == {"a": {"scaffold_c_local_round": 0},
                                                            "b": {"scaffold_c_local_round": None}}


@pytest.mark.parametrize("transport", ["memory", "shm", "grpc"])
def test_control_variates_cross_every_transport_and_a_site_without_them_fails_alone(tmp_path, transport):
    """The server's c reaches each site in meta as tensors, each site's c_diff comes back beside its
    params; a site that sends none fails (its own task), the round goes on with the others."""
    from flkit.model import FLModel
    from flkit.server.persistor import load_params
    from flkit.strategy import create

    from conftest import ServerHarness, in_threads

    harness = ServerHarness(tmp_path, transport=transport)
    try:
        server = harness.start({"w": torch.zeros(3), "n": torch.tensor(1)}, ["site-1", "site-2", "site-3"],
                               num_rounds=1, key_metric=None, min_clients=2, strategy=create("scaffold"))
        seen: dict[str, object] = {}

        def site(name: str) -> None:
            session = harness.session(server, name)
            model = session.receive(timeout=30)
            seen[name] = (model.meta["scaffold_c_global"], model.meta["scaffold_c_local_round"], sorted(model.params))
            k = float(name[-1])
            meta = {"NUM_STEPS_CURRENT_ROUND": 1}
            if name != "site-3":
                meta["scaffold_c_diff"] = {"w": torch.full((3,), k)}
            session.send(FLModel(params={"w": torch.full((3,), k), "n": torch.tensor(1)}, meta=meta))

        errors = in_threads(site, ["site-1", "site-2", "site-3"])
        assert set(errors) <= {"site-3"}
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed, outcome
        c_global, local_round, keys = seen["site-1"]
        assert torch.equal(torch.as_tensor(c_global["w"]), torch.zeros(3)) and local_round is None
        assert keys == ["n", "w"]  # the control variate is in meta, not among the params
        assert torch.equal(load_params(server.persistor.global_model_path)["w"], torch.full((3,), 1.5))
        state = load_params(server.persistor.strategy_path)
        assert torch.equal(state["c/w"], torch.full((3,), 1.0))  # (1 + 2) / 3 sites
        record = json.loads(server.persistor.state_path.read_text())
        assert "scaffold_c_diff" in record["history"][0]["failed"]["site-3"]
    finally:
        harness.close()
