"""Robust aggregation against hand-computed values: coordinate-wise median, trimmed mean, Krum and
Multi-Krum; and a real server whose median ignores one site sending huge values."""

from __future__ import annotations

import pytest
import torch

from flkit.errors import ConfigError, FLKitError
from flkit.model import FLModel, ParamsType
from flkit.server.persistor import load_params
from flkit.strategy import SiteResult, create

from conftest import ServerHarness, in_threads


def _aggregate(name: str, args: dict, results: list[tuple[dict, float]], base: dict | None = None,
               kind: ParamsType = ParamsType.FULL) -> dict[str, torch.Tensor]:
    base = base or {k: torch.zeros_like(v) for k, v in results[0][0].items()}
    out = {k: torch.full_like(v, 99) for k, v in base.items()}
    aggregator = create(name, args).aggregator(0)
    aggregator.start(0, base, lambda: out)
    for i, (params, weight) in enumerate(results):
        aggregator.add(SiteResult(f"s{i}", params, kind, weight))
    aggregator.finish()
    return out


def test_median_by_hand():
    three = _aggregate("median", {}, [({"w": torch.tensor([1.0, 5.0])}, 1), ({"w": torch.tensor([3.0, 1.0])}, 9),
                                      ({"w": torch.tensor([2.0, 9.0])}, 1)])
    assert torch.equal(three["w"], torch.tensor([2.0, 5.0]))  # weights play no part
    four = _aggregate("median", {}, [({"w": torch.tensor([1.0]), "n": torch.tensor(1), "b": torch.tensor(True)}, 1),
                                     ({"w": torch.tensor([4.0]), "n": torch.tensor(4), "b": torch.tensor(True)}, 1),
                                     ({"w": torch.tensor([2.0]), "n": torch.tensor(2), "b": torch.tensor(False)}, 1),
                                     ({"w": torch.tensor([3.0]), "n": torch.tensor(3), "b": torch.tensor(True)}, 1)])
    assert torch.equal(four["w"], torch.tensor([2.5]))  # even count: mean of the two middle values
    assert int(four["n"]) == 2 and bool(four["b"]) is True  # integers: lower middle; bool: majority


def test_median_of_diff_results_is_taken_of_the_full_models():
    base = {"w": torch.tensor([10.0])}
    out = _aggregate("median", {}, [({"w": torch.tensor([1.0])}, 1), ({"w": torch.tensor([-4.0])}, 1),
                                    ({"w": torch.tensor([2.0])}, 1)], base=base, kind=ParamsType.DIFF)
    assert torch.equal(out["w"], torch.tensor([11.0]))


def test_trimmed_mean_by_hand():
    values = [1.0, 2.0, 3.0, 100.0]
    out = _aggregate("trimmed-mean", {"beta": 0.25}, [({"w": torch.tensor([v])}, 1) for v in values])
    assert torch.equal(out["w"], torch.tensor([2.5]))  # floor(0.25 * 4) = 1 dropped each side: (2 + 3) / 2
    plain = _aggregate("trimmed-mean", {"beta": 0.0}, [({"w": torch.tensor([v])}, 1) for v in values])
    assert torch.equal(plain["w"], torch.tensor([26.5]))  # beta 0: the plain (unweighted) mean


def test_krum_and_multi_krum_by_hand():
    # 1-D points 0, 1, 3, 4, 100 with f=1: each is scored by its n - f - 2 = 2 nearest others.
    # squared distances: 0: 1+9=10 (to 1, 3); 1: 1+4=5 (to 0, 3); 3: 1+4=5 (to 4, 1);
    # 4: 1+9=10 (to 3, 1); 100: 96^2+97^2 = 18625. Ties go to the site name: s1 (value 1).
    points = [0.0, 1.0, 3.0, 4.0, 100.0]
    results = [({"w": torch.tensor([p])}, w) for p, w in zip(points, [1, 1, 3, 1, 1], strict=True)]
    assert torch.equal(_aggregate("krum", {"f": 1}, results)["w"], torch.tensor([1.0]))
    # Multi-Krum m=2 averages s1 (1.0, weight 1) and s2 (3.0, weight 3) by weight: (1 + 9) / 4 = 2.5
    assert torch.equal(_aggregate("krum", {"f": 1, "m": 2}, results)["w"], torch.tensor([2.5]))
    with pytest.raises(FLKitError, match="krum with f=2 needs more than 6 results, got 5"):
        _aggregate("krum", {"f": 2}, results)


@pytest.mark.parametrize(("name", "args", "message"), [
    ("trimmed-mean", {"beta": 0.5}, "beta must be a number in"),
    ("krum", {"f": -1}, "f must be an int >= 0"),
    ("krum", {"m": 0}, "m must be an int >= 1"),
    ("median", {"beta": 0.1}, "cannot be built with arguments"),
])
def test_bad_arguments_are_refused_by_name(name, args, message):
    with pytest.raises(ConfigError, match=message):
        create(name, args)


def test_a_server_with_the_median_ignores_one_site_sending_huge_values(tmp_path):
    harness = ServerHarness(tmp_path, transport="memory")
    try:
        initial = {"w": torch.zeros(4)}
        server = harness.start(initial, ["site-1", "site-2", "site-3"], num_rounds=1, key_metric=None,
                               strategy=create("median"))
        sends = {"site-1": torch.full((4,), 1.0), "site-2": torch.full((4,), 2.0), "site-3": torch.full((4,), 1e9)}
        def site(name: str) -> None:
            session = harness.session(server, name)
            session.receive(timeout=30)
            session.send(FLModel(params={"w": sends[name]}, meta={"NUM_STEPS_CURRENT_ROUND": 100}))

        assert in_threads(site, sends) == {}
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed, outcome
        assert torch.equal(load_params(server.persistor.global_model_path)["w"], torch.full((4,), 2.0))
    finally:
        harness.close()
