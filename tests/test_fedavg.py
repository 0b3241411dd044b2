"""FedAvg is exact: hand-computed weighted averages, FULL and DIFF, integer buffers."""

from __future__ import annotations

import threading

import pytest
import torch

from flkit.errors import FLKitError
from flkit.model import FLModel, ParamsType
from flkit.server.persistor import load_params
from flkit.strategy import SiteResult
from flkit.strategy.fedavg import StreamedMean, WeightedMean


def _initial():
    return {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "half": torch.tensor([1.0, 2.0], dtype=torch.float16),
        "steps": torch.tensor(10, dtype=torch.int64),
    }


SITE_A = {"w": torch.tensor([[2.0, 2.0], [2.0, 2.0]]), "half": torch.tensor([3.0, 5.0], dtype=torch.float16),
          "steps": torch.tensor(13, dtype=torch.int64)}
SITE_B = {"w": torch.tensor([[6.0, 10.0], [-2.0, 0.0]]), "half": torch.tensor([7.0, 1.0], dtype=torch.float16),
          "steps": torch.tensor(20, dtype=torch.int64)}
# Hand-computed with weights 1 (A) and 3 (B): (a + 3b) / 4
EXPECTED = {"w": torch.tensor([[5.0, 8.0], [-1.0, 0.5]]), "half": torch.tensor([6.0, 2.0], dtype=torch.float16),
            "steps": torch.tensor(18, dtype=torch.int64)}  # (13 + 60) / 4 = 18.25 -> 18


def start(strategy, round_num, like):
    """Start a round with buffers shaped like ``like`` for the new global model (as the controller
    provides them: contents undefined, so filled with garbage here); returns them."""
    out = {name: torch.full_like(t, 77, memory_format=torch.contiguous_format) for name, t in like.items()}
    strategy.start(round_num, like, lambda: out)
    return out


def finish(strategy, out):
    """The new global model, written by the strategy into ``out``."""
    strategy.finish()
    return out


BOTH = pytest.mark.parametrize("kind", [WeightedMean, StreamedMean], ids=["exact", "streamed"])


def _diff(full, base):
    return {k: full[k] - base[k] for k in full}


@BOTH
@pytest.mark.parametrize("kinds", [("FULL", "FULL"), ("DIFF", "DIFF"), ("FULL", "DIFF")])
def test_weighted_average_by_hand(kinds, kind):
    initial = _initial()
    strategy = kind()
    out = start(strategy, 0, initial)
    for (site, params, weight), kind in zip([("a", SITE_A, 1), ("b", SITE_B, 3)], kinds, strict=True):
        sent = params if kind == "FULL" else _diff(params, initial)
        strategy.add(SiteResult(site, sent, ParamsType(kind), weight))
    finish(strategy, out)
    for name, expected in EXPECTED.items():
        assert out[name].dtype == expected.dtype, name
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6)


@BOTH
def test_single_result_is_returned_within_a_rounding(kind):
    """Exact: bit for bit. Streamed: 7 * x / 7 in float32 is x within one rounding of each step."""
    initial = {"w": torch.randn(100, 100)}
    trained = {"w": torch.randn(100, 100)}
    strategy = kind()
    out = start(strategy, 0, initial)
    strategy.add(SiteResult("a", trained, ParamsType.FULL, 7.0))
    if kind is WeightedMean:
        assert torch.equal(finish(strategy, out)["w"], trained["w"])
    else:
        torch.testing.assert_close(finish(strategy, out)["w"], trained["w"], rtol=2.5e-7, atol=0)


@BOTH
def test_many_sites_match_float64_reference(kind):
    torch.manual_seed(0)
    initial = {"w": torch.zeros(50)}
    results = [(torch.randn(50), float(w)) for w in range(1, 9)]
    strategy = kind()
    out = start(strategy, 0, initial)
    for i, (p, w) in enumerate(results):
        strategy.add(SiteResult(f"s{i}", {"w": p}, ParamsType.FULL, w))
    ref = sum(p.double() * w for p, w in results) / sum(w for _, w in results)
    torch.testing.assert_close(finish(strategy, out)["w"], ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transfer", ["FULL", "DIFF"])
def test_server_aggregates_what_sites_send(harness, transfer):
    """Two real sessions over gRPC send fixed params with weights 1 and 3; the saved model is exact."""
    server = harness.start(_initial(), ["site-a", "site-b"], num_rounds=1, params_transfer_type=transfer)
    errors = []

    def site(name, params, steps):
        try:
            session = harness.session(server, name)
            assert session.is_running()
            model = session.receive(timeout=30)
            assert model.current_round == 0 and model.total_rounds == 1
            assert torch.equal(model.params["w"], _initial()["w"])
            session.send(FLModel(params=params, metrics={"accuracy": 0.5}, meta={"NUM_STEPS_CURRENT_ROUND": steps}))
            assert not session.is_running()  # the job ends after one round
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=site, args=a) for a in (("site-a", SITE_A, 1), ("site-b", SITE_B, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    saved = load_params(server.persistor.global_model_path)
    for name, expected in EXPECTED.items():
        assert saved[name].dtype == expected.dtype, name
        torch.testing.assert_close(saved[name], expected, rtol=1e-6, atol=1e-6)


def test_results_folded_together_from_many_threads_give_the_same_bits():
    """Results submitted at once are folded in one walk over the sums (each joins where the walk
    is); the new global model has the same bits as folding them one after the other."""
    torch.manual_seed(1)
    initial = {"w": torch.zeros(3 * (1 << 18) + 5), "v": torch.zeros(17, 3), "n": torch.tensor(0)}
    results = [{"w": torch.randn(initial["w"].shape), "v": torch.randn(17, 3), "n": torch.tensor(i)}
               for i in range(6)]
    sequential = WeightedMean()
    expected = start(sequential, 0, initial)
    for i, params in enumerate(results):
        sequential.add(SiteResult(f"s{i}", params, ParamsType.FULL, float(i + 1)))
    finish(sequential, expected)

    together = WeightedMean()
    out = start(together, 0, initial)
    barrier = threading.Barrier(len(results))
    errors = []

    def submit(i: int) -> None:
        try:
            barrier.wait(10)
            together.add(SiteResult(f"s{i}", results[i], ParamsType.FULL, float(i + 1)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    finish(together, out)
    assert all(torch.equal(out[k], expected[k]) for k in expected)


@BOTH
def test_a_fold_that_fails_raises_in_its_thread_and_the_next_round_can_start(kind):
    """The controller then fails the round (its aggregate is not whole); the strategy itself is
    not left holding the fold (a new round starts and folds normally)."""
    strategy = kind()
    start(strategy, 0, {"w": torch.zeros(4)})
    broken = {"w": torch.zeros(3)}  # the wrong size: the fold raises part-way
    with pytest.raises((RuntimeError, FLKitError)):
        strategy.add(SiteResult("a", broken, ParamsType.FULL, 1.0))
    out = start(strategy, 1, {"w": torch.zeros(4)})
    strategy.add(SiteResult("b", {"w": torch.ones(4)}, ParamsType.FULL, 1.0))
    assert torch.equal(finish(strategy, out)["w"], torch.ones(4))


@BOTH
def test_complex_tensors_are_averaged_in_their_own_kind(kind):
    """Complex buffers (complex64 and complex128) average like floats: (a + 3b) / 4."""
    initial = {"c": torch.zeros(2, dtype=torch.complex128), "d": torch.zeros(2, dtype=torch.complex64)}
    a = {"c": torch.tensor([1 + 2j, 4j], dtype=torch.complex128), "d": torch.tensor([2 + 0j, 1j], dtype=torch.complex64)}
    b = {"c": torch.tensor([5 + 2j, 0j], dtype=torch.complex128), "d": torch.tensor([2 + 4j, 1j], dtype=torch.complex64)}
    strategy = kind()
    out = start(strategy, 0, initial)
    strategy.add(SiteResult("a", a, ParamsType.FULL, 1.0))
    strategy.add(SiteResult("b", b, ParamsType.FULL, 3.0))
    finish(strategy, out)
    assert torch.equal(out["c"], torch.tensor([4 + 2j, 1j], dtype=torch.complex128))
    assert torch.equal(out["d"], torch.tensor([2 + 3j, 1j], dtype=torch.complex64))
