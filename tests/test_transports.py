"""The protocol, run against every transport: the same behaviour whatever carries the bytes.

A real FLServer in this process; sessions reach it through the transport under test
(``memory``: direct calls; ``grpc``: loopback). What must hold for all of them: the round's
aggregate, isolation of the global model from what sites do to their tensors, typed refusals,
re-joining after the server forgot a site, and headers without params.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flkit.messages import ErrorCode, ServiceError
from flkit.model import FLModel, ParamsType
from flkit.server.persistor import load_params
from flkit.strategy import SiteResult
from flkit.strategy.fedavg import WeightedMean
from flkit.transport.grpc_transport import GrpcTransport
from flkit.transport.memory import MemoryTransport
from flkit.transport.shm import ShmTransport

INITIAL = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.zeros(3),
           "steps": torch.tensor(5, dtype=torch.int64)}


def _plus(params: dict[str, torch.Tensor], x: float) -> dict[str, torch.Tensor]:
    return {k: v + x if v.is_floating_point() else v.clone() for k, v in params.items()}


def test_the_session_uses_the_transport_asked_for(any_harness):
    server = any_harness.start(INITIAL, ["site-1"], num_rounds=1)
    session = any_harness.session(server, "site-1")
    expected = {"memory": MemoryTransport, "grpc": GrpcTransport, "shm": ShmTransport}[any_harness.transport]
    assert type(session.transport) is expected
    session.connect(timeout=10)
    if any_harness.transport == "shm":  # same host, same user: the server's folder is used
        assert session.transport.active and session.transport.folder == server.shm.folder


def test_memory_is_refused_when_the_server_is_not_in_this_process(harness):
    from flkit.client.settings import SiteSettings
    from flkit.errors import ConfigError
    from flkit.transport import make_transport

    server = harness.start(INITIAL, ["site-1"], num_rounds=1)
    here = SiteSettings(server=server.address, site_name="site-1", job_id="j", token="t", transport="memory")
    assert isinstance(make_transport(here), MemoryTransport)
    elsewhere = SiteSettings(server="127.0.0.1:1", site_name="site-1", job_id="j", token="t", transport="memory")
    with pytest.raises(ConfigError, match="no server of this process listens on 127.0.0.1:1"):
        make_transport(elsewhere)


def test_a_round_gives_the_weighted_mean_bit_for_bit(any_harness):
    server = any_harness.start(INITIAL, ["site-1", "site-2"], num_rounds=2)
    sites = [any_harness.session(server, s) for s in ("site-1", "site-2")]
    for session in sites:
        session.connect(timeout=10)  # the first round starts once every site joined
    for round_num in range(2):
        for i, session in enumerate(sites):
            model = session.receive(timeout=30)
            assert model is not None and model.current_round == round_num
            session.send(FLModel(params=_plus(model.params, i + 1.0), metrics={"accuracy": 0.5},
                                 meta={"NUM_STEPS_CURRENT_ROUND": i + 1}))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    # Each round: the weighted mean of the sites' float32 tensors, summed in float64, rounded once.
    expected = INITIAL["w"]
    for _ in range(2):
        expected = ((1 * (expected + 1.0).double() + 2 * (expected + 2.0).double()) / 3).float()
    saved = load_params(server.persistor.global_model_path)
    assert torch.equal(saved["w"], expected)
    assert torch.equal(saved["steps"], INITIAL["steps"]) and saved["steps"].dtype == torch.int64


def test_a_site_cannot_change_the_global_model_through_its_tensors(any_harness):
    """The site changes the params it received, and the ones it sent, in place: the next round
    still gets exactly the aggregate, and so does the other site."""
    server = any_harness.start(INITIAL, ["site-1", "site-2"], num_rounds=2)
    meddler, honest = any_harness.session(server, "site-1"), any_harness.session(server, "site-2")
    meddler.connect(timeout=10), honest.connect(timeout=10)
    received = meddler.receive(timeout=30)
    other = honest.receive(timeout=30)
    assert received is not None and other is not None
    sent = _plus(received.params, 1.0)
    meddler.send(FLModel(params=sent))
    for tensor in [*received.params.values(), *sent.values()]:
        tensor.fill_(-7)  # after the send: nothing of this may reach the server or the other site
    assert torch.equal(other.params["w"], INITIAL["w"])
    honest.send(FLModel(params=_plus(other.params, 3.0)))
    next_round = [meddler.receive(timeout=30), honest.receive(timeout=30)]
    for model in next_round:
        assert model is not None and model.current_round == 1
        assert torch.equal(model.params["w"], INITIAL["w"] + 2.0)
    assert torch.equal(server.controller.global_params["w"], INITIAL["w"] + 2.0)


def test_params_a_site_keeps_are_never_overwritten_by_later_rounds(any_harness):
    """The server reuses the memory of old global models (and in-process sites read the global model
    copy-on-write): a site that keeps what it received in every round still sees it unchanged."""
    server = any_harness.start(INITIAL, ["site-1", "site-2"], num_rounds=4)
    keeper, other = any_harness.session(server, "site-1"), any_harness.session(server, "site-2")
    keeper.connect(timeout=10), other.connect(timeout=10)
    kept = []
    for _ in range(4):
        received = keeper.receive(timeout=30)
        assert received is not None
        kept.append((received.params, {k: v.clone() for k, v in received.params.items()}))
        keeper.send(FLModel(params=_plus(received.params, 1.0)))
        theirs = other.receive(timeout=30)
        assert theirs is not None
        other.send(FLModel(params=_plus(theirs.params, 3.0)))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    for round_num, (params, at_receipt) in enumerate(kept):
        assert all(torch.equal(params[k], at_receipt[k]) for k in at_receipt), f"round {round_num} changed"
        assert torch.equal(at_receipt["w"], INITIAL["w"] + 2.0 * round_num)


def test_refusals_carry_typed_codes(any_harness):
    server = any_harness.start(INITIAL, ["site-1"], num_rounds=1)
    stranger = any_harness.session(server, "site-9")
    with pytest.raises(ServiceError) as refused:
        stranger.connect(timeout=10)
    assert refused.value.code == ErrorCode.UNKNOWN_SITE and "site-9" in str(refused.value)
    intruder = any_harness.session(server, "site-1", token="forged")
    with pytest.raises(ServiceError) as refused:
        intruder.connect(timeout=10)
    assert refused.value.code == ErrorCode.BAD_TOKEN
    with pytest.raises(ServiceError) as refused:
        intruder.transport.heartbeat("no-such-session", timeout=5)
    assert refused.value.code == ErrorCode.UNKNOWN_SESSION


def test_a_site_the_server_forgot_joins_again_from_the_code(any_harness):
    server = any_harness.start(INITIAL, ["site-1"], num_rounds=1, heartbeat_timeout_s=60)
    session = any_harness.session(server, "site-1")
    session.connect(timeout=10)
    first = session._session_id
    with server.registry.cond:  # the server forgets the session, as a restarted one would
        del server.registry._sessions[first]
    model = session.receive(timeout=30)  # UNKNOWN_SESSION -> join again -> the task
    assert model is not None and session._session_id not in (None, first)
    session.send(FLModel(params=model.params))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome


def test_after_the_job_a_join_is_refused_as_ended(any_harness):
    server = any_harness.start(INITIAL, ["site-1"], num_rounds=1)
    session = any_harness.session(server, "site-1")
    model = session.receive(timeout=30)
    session.send(FLModel(params=model.params))
    assert not server.wait(30).failed
    late = any_harness.session(server, "site-1")
    with pytest.raises(ServiceError) as refused:
        late.transport.join("site-1", server.job_id, server.token, timeout=5)
    assert refused.value.code == ErrorCode.JOB_ENDED
    assert late.receive(timeout=10) is None and late.state.ended  # the Client API just sees the end


def test_header_only_peek_carries_no_params_and_takes_nothing(any_harness):
    server = any_harness.start(INITIAL, ["site-1"], num_rounds=1)
    session = any_harness.session(server, "site-1")
    header = session.peek_task(timeout=30)
    assert header is not None and header.name == "train" and header.params is None
    model = session.receive(timeout=30)  # the task is still there, with its params
    assert model is not None and torch.equal(model.params["w"], INITIAL["w"])
    session.send(FLModel(params=model.params))
    assert not server.wait(30).failed


def test_non_finite_and_misshapen_results_are_refused_on_every_transport(any_harness):
    server = any_harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=1)
    bad, good = any_harness.session(server, "site-1"), any_harness.session(server, "site-2")
    bad.connect(timeout=10), good.connect(timeout=10)
    model, other = bad.receive(timeout=30), good.receive(timeout=30)
    poisoned = _plus(model.params, 0.0)
    poisoned["w"][1, 2] = float("inf")
    with pytest.raises(Exception, match=r"site-1: tensor 'w' has 1 non-finite value"):
        bad.send(FLModel(params=poisoned))
    good.send(FLModel(params=_plus(other.params, 1.0)))
    assert not server.wait(30).failed
    assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 1.0)


def test_diff_results_over_every_transport(any_harness):
    server = any_harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1)
    a, b = any_harness.session(server, "site-1"), any_harness.session(server, "site-2")
    a.connect(timeout=10), b.connect(timeout=10)
    ma, mb = a.receive(timeout=30), b.receive(timeout=30)
    a.send(FLModel(params_type=ParamsType.DIFF, params={k: torch.ones_like(v) if v.is_floating_point()
                                                        else torch.zeros_like(v) for k, v in ma.params.items()}))
    b.send(FLModel(params=_plus(mb.params, 3.0)))
    assert not server.wait(30).failed
    assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 2.0)


def test_aggregation_gives_the_same_bits_in_any_arrival_order():
    """Float32 results with whole-number weights: every order of four results, one set of bits."""
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(4096, generator=gen), "n": torch.tensor(7)}
    results = [SiteResult(f"s{i}", {"w": torch.randn(4096, generator=gen) * 10 ** (i - 2), "n": torch.tensor(i)},
                          ParamsType.FULL, float(w)) for i, w in enumerate([3, 1, 250, 17])]
    seen = set()
    strategy = WeightedMean()
    for order in itertools.permutations(results):
        out = {name: torch.empty_like(t) for name, t in base.items()}
        strategy.start(0, base, lambda out=out: out)
        for result in order:
            strategy.add(result)
        strategy.finish()
        seen.add((out["w"].numpy().tobytes(), int(out["n"])))
    assert len(seen) == 1
    # and it is the float64 mean, rounded once
    total = sum(r.weight * r.params["w"].double() for r in results) / sum(r.weight for r in results)
    assert torch.equal(out["w"], total.float())


def test_a_result_refused_after_its_site_failed_does_not_hang_the_round(harness, monkeypatch):
    """The site fails (e.g. its heartbeat lapses) while its result is being checked, then the check
    refuses it: the round goes on with the other site instead of waiting for the failed one."""
    import flkit.server.controller as controller

    server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=1)
    s1, s2 = harness.session(server, "site-1"), harness.session(server, "site-2")
    s1.connect(timeout=10), s2.connect(timeout=10)
    m1, m2 = s1.receive(timeout=30), s2.receive(timeout=30)
    real_check = controller.check_params

    def fail_then_refuse(site, params, expected):
        if site == "site-1":
            server.registry.fail_site("site-1", "no heartbeat (the test)")
            raise controller.ValidationError("site site-1: refused by the test")
        return real_check(site, params, expected)

    monkeypatch.setattr(controller, "check_params", fail_then_refuse)
    with pytest.raises(Exception, match="refused by the test"):
        s1.send(FLModel(params=_plus(m1.params, 1.0)))
    s2.send(FLModel(params=_plus(m2.params, 3.0)))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 3.0)


def test_a_site_that_joins_again_while_its_result_is_folded_keeps_the_round_whole(harness, monkeypatch):
    """A restarted site joins while the server still folds its previous answer: the round waits for
    the fold and the aggregate has both results (finish_round never runs beside a fold)."""
    server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1)
    s1, s2 = harness.session(server, "site-1"), harness.session(server, "site-2")
    s1.connect(timeout=10), s2.connect(timeout=10)
    m1, m2 = s1.receive(timeout=30), s2.receive(timeout=30)
    s2.send(FLModel(params=_plus(m2.params, 3.0)))
    real_add = WeightedMean.add

    def join_again_mid_fold(self, result):
        if result.site == "site-1":
            server.registry.join("site-1", server.job_id, server.token)  # the restarted process
        return real_add(self, result)

    monkeypatch.setattr(WeightedMean, "add", join_again_mid_fold)
    s1.send(FLModel(params=_plus(m1.params, 1.0)))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 2.0)
