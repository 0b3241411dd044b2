"""Server optimisers (FedAvgM, FedAdam, FedYogi, FedAdagrad) against hand-computed values and against
torch.optim run on the pseudo-gradient; their state saved with the round and taken back on resume."""

from __future__ import annotations

import pytest
import torch

from flkit.errors import ConfigError
from flkit.model import ParamsType
from flkit.server.persistor import Persistor, load_saved_run
from flkit.strategy import SiteResult, Strategy, create


def _round(strategy: Strategy, base: dict, results: list[tuple[dict, float]],
           kind: ParamsType = ParamsType.FULL) -> dict[str, torch.Tensor]:
    out = {k: torch.full_like(v, 99) for k, v in base.items()}
    aggregator = strategy.aggregator(0)
    aggregator.start(0, base, lambda: out)
    for i, (params, weight) in enumerate(results):
        aggregator.add(SiteResult(f"s{i}", params, kind, weight))
    aggregator.finish()
    return out


def _w(*values: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=dtype)}


def test_fedavgm_by_hand():
    strategy = create("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.5})
    # round 1: mean 3, delta 3, v = 3 (the first step takes delta as it is), new = 0 + 3
    first = _round(strategy, _w(0.0), [(_w(2.0), 1), (_w(4.0), 1)])
    assert torch.equal(first["w"], torch.tensor([3.0]))
    # round 2: mean 5, delta 2, v = 0.5 * 3 + 2 = 3.5, new = 3 + 3.5
    second = _round(strategy, first, [(_w(4.0), 1), (_w(6.0), 1)])
    assert torch.equal(second["w"], torch.tensor([6.5]))
    plain = create("fedavgm", {"server_learning_rate": 1.0, "server_momentum": 0.0})
    assert torch.equal(_round(plain, _w(0.0), [(_w(2.0), 1), (_w(4.0), 3)])["w"], torch.tensor([3.5]))  # FedAvg
    assert plain.state_tensors() == {}


def test_fedadam_fedyogi_fedadagrad_by_hand():
    base = _w(0.0, dtype=torch.float64)
    results = [(_w(2.0, dtype=torch.float64), 1), (_w(4.0, dtype=torch.float64), 1)]  # delta 3
    # Adam, bias-corrected: m = 0.1 * 3 = 0.3, v = 0.01 * 9 = 0.09; m_hat = 3, v_hat = 9; step = 0.1 * 3 / (3 + tau)
    adam = _round(create("fedadam", {"eta": 0.1, "tau": 1e-9}), base, results)
    assert adam["w"].item() == pytest.approx(0.1 * 3 / (3 + 1e-9), rel=1e-12)
    # Adam as in the paper: step = 0.1 * 0.3 / (sqrt(0.09) + tau)
    paper = _round(create("fedadam", {"eta": 0.1, "tau": 1e-3, "bias_correction": False}), base, results)
    assert paper["w"].item() == pytest.approx(0.1 * 0.3 / (0.3 + 1e-3), rel=1e-12)
    # Yogi: m = 0.3; v = 0 - 0.01 * 9 * sign(0 - 9) = 0.09; step = 0.01 * 0.3 / (0.3 + 1e-3)
    yogi = _round(create("fedyogi", {}), base, results)
    assert yogi["w"].item() == pytest.approx(0.01 * 0.3 / (0.3 + 1e-3), rel=1e-12)
    # Adagrad: v = 9; step = 0.1 * 3 / (3 + 1e-9)
    adagrad = _round(create("fedadagrad", {}), base, results)
    assert adagrad["w"].item() == pytest.approx(0.1 * 3 / (3 + 1e-9), rel=1e-12)


def test_fedyogi_second_round_by_hand():
    strategy = create("fedyogi", {"eta": 1.0, "beta_1": 0.5, "beta_2": 0.5, "tau": 1.0})
    first = _round(strategy, _w(0.0, dtype=torch.float64), [(_w(2.0, dtype=torch.float64), 1)])
    # delta 2: m = 1, v = 0 - 0.5 * 4 * sign(-4) = 2; step = 1 / (sqrt 2 + 1)
    step1 = 1 / (2 ** 0.5 + 1)
    assert first["w"].item() == pytest.approx(step1, rel=1e-12)
    second = _round(strategy, first, [(_w(step1 + 1.0, dtype=torch.float64), 1)])
    # delta 1: m = 0.5 * 1 + 0.5 * 1 = 1; v = 2 - 0.5 * 1 * sign(2 - 1) = 1.5; step = 1 / (sqrt 1.5 + 1)
    assert second["w"].item() == pytest.approx(step1 + 1 / (1.5 ** 0.5 + 1), rel=1e-12)


@pytest.mark.parametrize("name, args, make_optimizer", [
    ("fedavgm", {"server_learning_rate": 0.7, "server_momentum": 0.9},
     lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9)),
    ("fedadam", {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-6},
     lambda p: torch.optim.Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6)),
    ("fedadagrad", {"eta": 0.3, "tau": 1e-7}, lambda p: torch.optim.Adagrad(p, lr=0.3, eps=1e-7)),
], ids=["sgd-momentum", "adam", "adagrad"])
def test_matches_torch_optim_on_the_pseudo_gradient(name, args, make_optimizer):
    """Four rounds of random results: the strategy's global model equals torch.optim's stepping on
    the gradient -(mean - global)."""
    gen = torch.Generator().manual_seed(3)
    shape = {"a": (5, 3), "b": (7,)}
    model = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shape.items()}
    reference = {k: torch.nn.Parameter(v.clone()) for k, v in model.items()}
    optimizer = make_optimizer(list(reference.values()))
    strategy = create(name, args)
    for _ in range(4):
        results = [({k: v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in model.items()},
                    float(w)) for w in (1, 2, 3)]
        total = sum(w for _, w in results)
        for k, p in reference.items():
            mean = sum(r[k] * w for r, w in results) / total
            p.grad = -(mean - p.detach())
        optimizer.step()
        model = _round(strategy, model, results)
        for k, p in reference.items():
            torch.testing.assert_close(model[k], p.detach(), rtol=1e-10, atol=1e-12)


def test_integer_buffers_take_the_mean_and_16_bit_models_step_in_float32():
    base = {"w": torch.tensor([0.0], dtype=torch.float16), "n": torch.tensor(4)}
    out = _round(create("fedavgm", {"server_learning_rate": 2.0, "server_momentum": 0.0}), base,
                 [({"w": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor(6)}, 1)])
    assert out["w"].dtype == torch.float16 and out["w"].item() == 2.0  # 0 + 2 * (1 - 0)
    assert int(out["n"]) == 6  # not stepped: FedAvg's mean


def test_state_is_saved_with_the_round_and_a_resume_goes_on_identically(tmp_path):
    args = {"eta": 0.05, "tau": 1e-6}
    gen = torch.Generator().manual_seed(0)
    rounds = [[({"w": torch.randn(4, generator=gen)}, 1.0), ({"w": torch.randn(4, generator=gen)}, 2.0)]
              for _ in range(3)]
    straight = create("fedadam", args)
    model = {"w": torch.zeros(4)}
    for results in rounds:
        model = _round(straight, model, results)
    expected = model["w"]

    first = create("fedadam", args)
    model = {"w": torch.zeros(4)}
    persistor = Persistor(tmp_path)
    for round_num, results in enumerate(rounds[:2]):
        model = _round(first, model, results)
        persistor.save_global(model, round_num, {"strategy": first.state_dict()}, None,
                              dict(first.state_tensors()))
        persistor.flush()
    persistor.close()
    saved = load_saved_run(tmp_path)
    assert saved is not None and sorted(saved.strategy_tensors) == ["m/w", "v/w"]
    resumed = create("fedadam", args)
    resumed.load_state_dict(saved.state["strategy"])
    resumed.load_state_tensors(saved.strategy_tensors)
    again = _round(resumed, saved.global_params, rounds[2])
    assert torch.equal(again["w"], expected)


@pytest.mark.parametrize("name, args, match", [
    ("fedavgm", {"server_momentum": 1.5}, "server_momentum must be >= 0 and <= 1"),
    ("fedadam", {"beta_2": 1.0}, "beta_2 must be >= 0 and < 1"),
    ("fedavgm", {"server_learning_rate": 0}, "server_learning_rate must be > 0"),
    ("fedadam", {"tau": 0}, "tau must be > 0"),
    ("fedadam", {"beta_1": "0.9"}, "beta_1 must be a finite number"),
    ("fedadam", {"bias_correction": 1}, "bias_correction must be true or false"),
    ("fedyogi", {"lr": 0.1}, "cannot be built with arguments"),
])
def test_bad_arguments_are_refused(name, args, match):
    with pytest.raises(ConfigError, match=match):
        create(name, args)


def test_saved_state_of_another_strategy_is_refused():
    with pytest.raises(ValueError, match="not one of its slots"):
        create("fedavgm", {}).load_state_tensors({"m/w": torch.zeros(1)})
