"""flkit.data.partition: every scheme splits the samples exactly (disjoint, complete), the same way
for the same seed, with the skew each scheme promises, on real labels (scikit-learn's digits)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from flkit.data import Partition, partition

DIGITS = load_digits().target  # 1,797 real labels, 10 classes


def _check_exact(p: Partition, total: int) -> None:
    everything = np.concatenate([np.asarray(p.indices(s), dtype=np.int64) for s in p.sites])
    assert np.array_equal(np.sort(everything), np.arange(total))  # disjoint and complete


def _labels_holding(p: Partition, site: str, share: float = 0.9) -> int:
    """How many labels hold ``share`` of the site's samples."""
    counts = np.sort(np.bincount(DIGITS[p.indices(site)], minlength=10))[::-1]
    return int(np.searchsorted(np.cumsum(counts), share * counts.sum()) + 1)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(40, 400), sites=st.integers(1, 12), classes=st.integers(1, 7), seed=st.integers(0, 99),
       scheme=st.sampled_from(["iid", "dirichlet", "shards", "unbalanced"]))
def test_every_scheme_splits_every_sample_exactly_once_and_the_same_way_again(total, sites, classes, seed, scheme):
    labels = np.random.default_rng(seed).integers(0, classes, total)
    options = {"dirichlet": {"alpha": 0.5}, "shards": {"shards_per_site": 2}, "unbalanced": {"sigma": 1.0}}
    p = partition(labels, sites, scheme, seed, **options.get(scheme, {}))
    _check_exact(p, total)
    again = partition(labels.tolist(), sites, scheme, seed, **options.get(scheme, {}))
    assert all(p.indices(s) == again.indices(s) for s in p.sites)


def test_iid_sizes_differ_by_at_most_one_and_every_site_sees_every_label():
    p = partition(DIGITS, 8, "iid", seed=1)
    assert max(p.sizes().values()) - min(p.sizes().values()) <= 1
    assert all(_labels_holding(p, s, 1.0) == 10 for s in p.sites)
    assert p.indices("site-1") != partition(DIGITS, 8, "iid", seed=2).indices("site-1")


def test_dirichlet_skew_follows_alpha():
    skewed = partition(DIGITS, 32, "dirichlet", seed=0, alpha=0.1, min_size=10)
    near_iid = partition(DIGITS, 8, "dirichlet", seed=0, alpha=100.0)
    assert np.mean([_labels_holding(skewed, s) for s in skewed.sites]) < 4
    assert np.mean([_labels_holding(near_iid, s) for s in near_iid.sites]) >= 8
    assert min(skewed.sizes().values()) >= 10


def test_strong_skew_leaves_sites_nearly_empty_unless_min_size_says_otherwise():
    sizes = [min(partition(DIGITS, 32, "dirichlet", seed=s, alpha=0.05).sizes().values()) for s in range(5)]
    assert min(sizes) < 5  # without min_size some site gets (almost) nothing
    held = partition(DIGITS, 32, "dirichlet", seed=0, alpha=0.05, min_size=20)
    assert min(held.sizes().values()) >= 20
    with pytest.raises(ValueError, match="min_size=100 for 32 sites needs 3200 samples"):
        partition(DIGITS, 32, "dirichlet", seed=0, alpha=0.05, min_size=100)


def test_shards_give_each_site_few_labels():
    p = partition(DIGITS, 20, "shards", seed=3, shards_per_site=2)
    assert all(_labels_holding(p, s, 1.0) <= 4 for s in p.sites)  # two shards, each at most two labels
    _check_exact(p, DIGITS.size)


def test_unbalanced_sizes_spread_with_sigma():
    spread = partition(DIGITS, 10, "unbalanced", seed=4, sigma=1.5).sizes().values()
    assert max(spread) > 3 * min(spread)
    even = partition(DIGITS, 10, "unbalanced", seed=4, sigma=0.0).sizes().values()
    assert max(even) - min(even) <= 1


def test_sites_by_name_and_the_report():
    p = partition(DIGITS, ["hospital-a", "hospital-b", "clinic.c"], "dirichlet", seed=5, alpha=1.0)
    report = p.report()
    assert sum(site["size"] for site in report["sites"].values()) == DIGITS.size
    for name, site in report["sites"].items():
        assert sum(site["labels"].values()) == site["size"] == len(p.indices(name))
    text = str(p)
    assert text.splitlines()[0] == "dirichlet partition of 1797 samples, seed 5"
    assert "hospital-a" in text and "clinic.c" in text
    with pytest.raises(KeyError, match="site 'site-1' is not in this partition"):
        p.indices("site-1")


@pytest.mark.parametrize(("call", "message"), [
    (lambda: partition(DIGITS, 4, "pathological"), "unknown partition scheme"),
    (lambda: partition(DIGITS, 4, "iid", alpha=0.1), "scheme 'iid' does not use alpha"),
    (lambda: partition(DIGITS, 4, "dirichlet"), "needs alpha"),
    (lambda: partition(DIGITS, 4, "dirichlet", alpha=0), "alpha must be a number > 0"),
    (lambda: partition(DIGITS, 0, "iid"), "sites must be >= 1"),
    (lambda: partition(DIGITS, ["a", "a"], "iid"), "unique"),
    (lambda: partition(DIGITS, ["../x"], "iid"), "site names must be"),
    (lambda: partition([0.5, 1.0], 1, "iid"), "labels must be integers"),
    (lambda: partition(DIGITS, 1000, "shards", shards_per_site=2), "need 2000 samples"),
])
def test_bad_arguments_are_refused_by_name(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
