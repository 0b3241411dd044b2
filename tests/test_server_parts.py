"""Server pieces on their own: large models over gRPC, best-model selection, atomic persistence."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flkit.model import FLModel
from flkit.server.persistor import Persistor, load_params, save_params
from flkit.server.selector import BestModelSelector
from flkit.server.validation import all_finite
from flkit.wire.grpc_options import MAX_MESSAGE_BYTES


def test_model_larger_than_any_grpc_message_travels_exactly(harness):
    big = {"w": torch.randn(3_000_000), "b": torch.randn(10)}  # 12 MB > the message cap
    assert big["w"].numel() * 4 > MAX_MESSAGE_BYTES
    server = harness.start(big, ["site-1"], num_rounds=1)
    session = harness.session(server, "site-1")
    model = session.receive(timeout=60)
    assert torch.equal(model.params["w"], big["w"])
    trained = {k: v * 2 for k, v in model.params.items()}
    session.send(FLModel(params=trained))
    assert not server.wait(60).failed
    assert torch.equal(load_params(server.persistor.global_model_path)["w"], trained["w"])


@pytest.mark.parametrize("negate,expected_best", [(False, 2), (True, 1)])
def test_selector_picks_by_key_metric(negate, expected_best):
    selector = BestModelSelector("loss" if negate else "acc", negate=negate)
    key = selector.key_metric
    rounds = {0: {"a": {key: 0.5}, "b": {key: 0.7}},   # mean 0.6
              1: {"a": {key: 0.1}, "b": {key: 0.3}},   # mean 0.2
              2: {"a": {key: 0.9}, "b": {key: 0.9}}}   # mean 0.9
    for r, metrics in rounds.items():
        selector.offer(selector.round_score(r, metrics))
    assert selector.best.round == expected_best


def test_selector_ignores_sites_without_the_key_metric(caplog):
    selector = BestModelSelector("accuracy")
    score = selector.round_score(0, {"a": {"acc": 0.9}, "b": {"accuracy": 0.5}})
    assert score.value == 0.5 and score.sites == 1
    assert "site a reported no 'accuracy' metric (it sent ['acc'])" in caplog.text
    assert selector.round_score(1, {"a": {"acc": 0.9}}) is None


def test_interrupted_write_leaves_the_previous_model(tmp_path, monkeypatch):
    persistor = Persistor(tmp_path)
    save_params(persistor.global_model_path, {"w": torch.ones(4)})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("flkit.server.persistor.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_params(persistor.global_model_path, {"w": torch.zeros(4)})
    assert torch.equal(load_params(persistor.global_model_path)["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == [persistor.global_model_path.name]  # no temp file left


def test_round_waits_for_late_joiner_then_runs(harness):
    """A site that joins late is waited for (join_timeout_s), then both take part."""
    server = harness.start({"w": torch.zeros(2)}, ["site-1", "site-2"], num_rounds=1)
    first = harness.session(server, "site-1")
    got = {}
    t = threading.Thread(target=lambda: got.setdefault("m", first.receive(timeout=60)))
    t.start()
    second = harness.session(server, "site-2")
    m2 = second.receive(timeout=60)
    t.join(60)
    assert got["m"].current_round == m2.current_round == 0


def test_a_newer_global_model_replaces_one_still_waiting_to_be_saved(tmp_path, monkeypatch):
    """The writer is busy with round 0: rounds 1 and 2 are handed over meanwhile, and only the
    newest of them is written. round_state.json names the round whose model is on disk."""
    import json

    import flkit.server.persistor as persistor_module

    started, release = threading.Event(), threading.Event()
    real_save = persistor_module.save_params

    def slow_save(path, params, metadata=None, direct=None):
        started.set()
        assert release.wait(30)
        real_save(path, params, metadata, direct)

    monkeypatch.setattr(persistor_module, "save_params", slow_save)
    persistor = Persistor(tmp_path)
    persistor.save_global({"w": torch.zeros(4)}, 0)
    assert started.wait(30)  # round 0 is being written
    for round_num in (1, 2):
        persistor.save_global({"w": torch.full((4,), float(round_num))}, round_num)
        persistor.save_state({"completed_rounds": round_num + 1})
    release.set()
    persistor.flush(timeout=30)
    assert (persistor.saved_rounds, persistor.handed_rounds) == (2, 3)  # round 1 was never written
    assert torch.equal(load_params(persistor.global_model_path)["w"], torch.full((4,), 2.0))
    state = json.loads(persistor.state_path.read_text())
    assert state["global_model_round"] == 2 and state["completed_rounds"] == 3
    persistor.close()
    with pytest.raises(OSError, match="closed"):
        persistor.save_global({"w": torch.zeros(4)}, 3)


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                              st.sampled_from([3.4e38, -3.4e38, 1e20, -1e20, 1e-45])), min_size=1, max_size=40),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
    transposed=st.booleans(),
)
def test_the_finite_check_agrees_with_isfinite(values, dtype, transposed):
    """The fast check (a BLAS dot, then aminmax when the dot is not finite) answers exactly what
    ``isfinite(t).all()`` does: huge finite values whose squares overflow are still finite."""
    t = torch.tensor(values, dtype=torch.float64).to(dtype)
    if transposed and t.numel() % 2 == 0:
        t = t.view(2, -1).t()  # not contiguous: the aminmax path
    assert all_finite(t) == bool(torch.isfinite(t).all())


def test_messages_about_many_sites_stay_short_and_travel_over_grpc(tmp_path):
    """A job of a thousand sites: an unknown site's refusal and a failure of many sites name a
    count and the first few, so the refusal fits gRPC's metadata (16 KiB) and the log stays readable."""
    from flkit.client.session import Session
    from flkit.client.settings import SiteSettings
    from flkit.errors import FLKitError
    from flkit.server.config import WorkflowConfig
    from flkit.server.listing import failure_list
    from flkit.server.server import FLServer

    sites = [f"site-with-a-rather-long-name-{i:04d}" for i in range(1000)]
    server = FLServer(WorkflowConfig(num_rounds=1, min_clients=1, join_timeout_s=30), sites,
                      {"w": torch.zeros(2)}, tmp_path / "server", job_id="many")
    server.start()
    try:
        settings = SiteSettings(server=server.address, site_name="intruder", job_id="many", token=server.token,
                                workspace=str(tmp_path / "intruder"), transport="grpc")
        with pytest.raises(FLKitError) as refused:
            Session(settings).connect(timeout=30)
        text = str(refused.value)
        assert "is not part of job 'many' (1000 sites: site-with-a-rather-long-name-0000" in text
        assert "and 995 more" in text and len(text) < 1000 and "RESOURCE_EXHAUSTED" not in text
    finally:
        server.stop()
    summary = failure_list({s: "no heartbeat for 61 s\nTraceback ..." for s in sites})
    assert summary.endswith("(and 995 more sites failed)") and summary.count("no heartbeat") == 5


@settings(max_examples=150, deadline=None)
@given(
    tensors=st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["ok", "nan", "inf", "huge"]),
                               st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64])),
                     min_size=1, max_size=8),
    one_by_one=st.sampled_from([4, 1 << 16]),
)
def test_the_finite_check_of_a_whole_model_names_the_first_bad_tensor(tensors, one_by_one):
    """Small tensors are checked together, large ones one by one; either way the answer is the
    first tensor with a NaN or an Inf, and huge finite values are never taken for one."""
    import flkit.server.validation as validation

    built = []
    for numel, kind, dtype in tensors:
        t = torch.ones(numel, dtype=torch.float64)
        if numel and kind != "ok":
            huge = 6e4 if dtype == torch.float16 else 1e30  # finite, but its square overflows
            t[numel // 2] = {"nan": float("nan"), "inf": float("inf"), "huge": huge}[kind]
        built.append(t.to(dtype))
    expected = next((i for i, t in enumerate(built) if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                    None)
    saved = validation.ONE_BY_ONE
    validation.ONE_BY_ONE = one_by_one
    try:
        assert validation.first_non_finite(built) == expected
    finally:
        validation.ONE_BY_ONE = saved
