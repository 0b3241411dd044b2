"""Synthetic click logs from a hidden latent-factor model, one skewed log per site.

The *world* (every user's and item's hidden factors) comes from the fixed ``WORLD_SEED``, so
every site, the held-out set and job.py's baseline agree on it without exchanging anything.
A user's factor is the centroid of their segment plus a personal part; an item's is the
centroid of its category plus its own part. Whether an impression is clicked:

    logit = INTERACTION_SCALE * <user factor, item factor> + item bias + user bias + BASE_LOGIT + noise
    click ~ Bernoulli(sigmoid(logit))

The label is drawn from hidden quantities only: no feature is a function of the click. What
the features show is the structure (user segment, item category, ids) and two noisy dense
signals (user activity, item age) that move the biases a little.

Each site draws its own Dirichlet(``alpha``) mixture over user segments and over item
categories, seeded by (data seed, site index): the sites' logs are non-IID, and any site's
log can be made again in about a millisecond by whoever needs it (the site itself, in every
process it runs in; job.py, for the baseline). The held-out set uses the population's
mixture (uniform segments and categories), so it scores how well a model serves everyone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

WORLD_SEED = 20_240_611
N_USERS = 4_000
N_ITEMS = 2_000
N_SEGMENTS = 8
N_CATEGORIES = 16
LATENT_DIM = 8
# Spread of a user's (item's) own factor around their segment's (category's) centroid.
PERSONAL_SPREAD = 0.5
INTERACTION_SCALE = 0.6
BASE_LOGIT = -1.6
ITEM_BIAS_STD = 0.35
LOGIT_NOISE_STD = 0.5

# The sparse (categorical) features, in the order of the model's embedding tables.
SPARSE_FEATURES = ("user_id", "item_id", "item_category", "user_segment")
SPARSE_CARDINALITIES = (N_USERS, N_ITEMS, N_CATEGORIES, N_SEGMENTS)
DENSE_FEATURES = ("user_activity", "item_age")

DEFAULT_ALPHA = 0.3
MIN_IMPRESSIONS, MAX_IMPRESSIONS = 300, 600
HELD_OUT_SIZE = 10_000
HELD_OUT_INDEX = 0  # the held-out set is drawn as "site 0"; the sites are 1..N


@dataclass(frozen=True)
class World:
    """The hidden model: factors and biases that decide clicks, and what the features reveal of them."""

    user_segment: np.ndarray  # (N_USERS,) int
    user_factor: np.ndarray  # (N_USERS, LATENT_DIM)
    user_bias: np.ndarray  # (N_USERS,)
    user_activity: np.ndarray  # (N_USERS,) standardised, the true value behind the dense feature
    item_category: np.ndarray  # (N_ITEMS,) int
    item_factor: np.ndarray  # (N_ITEMS, LATENT_DIM)
    item_bias: np.ndarray  # (N_ITEMS,)
    item_age: np.ndarray  # (N_ITEMS,) standardised
    # Users sorted by segment with each segment's [start, end) in that order: a user of a given
    # segment is drawn with one vectorised index, no Python loop per impression.
    users_by_segment: np.ndarray
    segment_start: np.ndarray
    segment_end: np.ndarray
    # Items sorted by category, and the cumulative exposure weight along that order: popular
    # items are shown more often (a Zipf-like exposure inside each category).
    items_by_category: np.ndarray
    exposure_cum: np.ndarray
    category_start: np.ndarray
    category_end: np.ndarray


@functools.lru_cache(maxsize=1)
def world() -> World:
    """The one world every site shares, built from ``WORLD_SEED`` (about 2 ms; cached per process)."""
    rng = np.random.default_rng(WORLD_SEED)
    segment_centroid = rng.normal(size=(N_SEGMENTS, LATENT_DIM))
    category_centroid = rng.normal(size=(N_CATEGORIES, LATENT_DIM))

    user_segment = rng.integers(N_SEGMENTS, size=N_USERS)
    user_factor = segment_centroid[user_segment] + PERSONAL_SPREAD * rng.normal(size=(N_USERS, LATENT_DIM))
    user_activity = rng.normal(size=N_USERS)
    user_bias = 0.25 * user_activity + 0.2 * rng.normal(size=N_USERS)

    item_category = rng.integers(N_CATEGORIES, size=N_ITEMS)
    item_factor = category_centroid[item_category] + PERSONAL_SPREAD * rng.normal(size=(N_ITEMS, LATENT_DIM))
    item_age = rng.normal(size=N_ITEMS)
    item_bias = ITEM_BIAS_STD * rng.normal(size=N_ITEMS) - 0.2 * item_age
    exposure = np.exp(0.8 * item_bias + 0.8 * rng.normal(size=N_ITEMS))

    users_by_segment = np.argsort(user_segment, kind="stable")
    segment_end = np.cumsum(np.bincount(user_segment, minlength=N_SEGMENTS))
    items_by_category = np.argsort(item_category, kind="stable")
    category_end = np.cumsum(np.bincount(item_category, minlength=N_CATEGORIES))
    return World(
        user_segment=user_segment,
        user_factor=user_factor,
        user_bias=user_bias,
        user_activity=user_activity,
        item_category=item_category,
        item_factor=item_factor,
        item_bias=item_bias,
        item_age=item_age,
        users_by_segment=users_by_segment,
        segment_start=segment_end - np.bincount(user_segment, minlength=N_SEGMENTS),
        segment_end=segment_end,
        items_by_category=items_by_category,
        exposure_cum=np.cumsum(exposure[items_by_category]),
        category_start=category_end - np.bincount(item_category, minlength=N_CATEGORIES),
        category_end=category_end,
    )


@dataclass(frozen=True)
class ClickLog:
    """Impressions as the model sees them: ids and dense features, and whether each was clicked."""

    sparse: np.ndarray  # (n, len(SPARSE_FEATURES)) int64, columns as SPARSE_FEATURES
    dense: np.ndarray  # (n, len(DENSE_FEATURES)) float32
    clicked: np.ndarray  # (n,) float32, 0 or 1

    def __len__(self) -> int:
        return len(self.clicked)

    @property
    def item_id(self) -> np.ndarray:
        return self.sparse[:, SPARSE_FEATURES.index("item_id")]


def draw_log(rng: np.random.Generator, segment_mix: np.ndarray, category_mix: np.ndarray, n: int) -> ClickLog:
    """``n`` impressions: a user from a segment drawn by ``segment_mix``, an item from a category
    drawn by ``category_mix`` (within it, by exposure), the click from the hidden model."""
    w = world()
    segment = rng.choice(N_SEGMENTS, size=n, p=segment_mix)
    seg_start, seg_end = w.segment_start[segment], w.segment_end[segment]
    user = w.users_by_segment[seg_start + (rng.random(n) * (seg_end - seg_start)).astype(np.int64)]

    category = rng.choice(N_CATEGORIES, size=n, p=category_mix)
    cat_start, cat_end = w.category_start[category], w.category_end[category]
    low = np.where(cat_start > 0, w.exposure_cum[np.maximum(cat_start - 1, 0)], 0.0)
    high = w.exposure_cum[cat_end - 1]
    position = np.searchsorted(w.exposure_cum, low + rng.random(n) * (high - low), side="right")
    item = w.items_by_category[np.clip(position, cat_start, cat_end - 1)]

    logit = (
        INTERACTION_SCALE * np.einsum("nd,nd->n", w.user_factor[user], w.item_factor[item])
        + w.item_bias[item]
        + w.user_bias[user]
        + BASE_LOGIT
        + LOGIT_NOISE_STD * rng.normal(size=n)
    )
    clicked = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))

    # What a log would record: activity as a noisy count over the last weeks, age in days.
    activity = np.log1p(rng.poisson(np.exp(1.5 + 0.5 * w.user_activity[user])))
    age_days = np.exp(3.0 + 0.6 * w.item_age[item] + 0.2 * rng.normal(size=n))
    dense = np.stack([(activity - 1.7) / 0.5, (np.log(age_days) - 3.0) / 0.6], axis=1)
    sparse = np.stack([user, item, w.item_category[item], w.user_segment[user]], axis=1)
    return ClickLog(sparse.astype(np.int64), dense.astype(np.float32), clicked.astype(np.float32))


def site_index(site_name: str) -> int:
    """``"site-7"`` -> 7: the number the site's log is seeded with."""
    prefix, _, number = site_name.rpartition("-")
    if prefix != "site" or not number.isdigit() or int(number) < 1:
        raise ValueError(f"site name {site_name!r} is not site-<n> with n >= 1; the example's sites are site-1..site-N")
    return int(number)


def site_log(seed: int, index: int, alpha: float = DEFAULT_ALPHA) -> ClickLog:
    """Site ``index``'s training log: its own Dirichlet(``alpha``) skew over user segments and item
    categories and 300-600 impressions, all fixed by (``seed``, ``index``). Smaller alpha: more skew."""
    if index < 1:
        raise ValueError(f"sites are numbered from 1, got {index}")
    rng = np.random.default_rng([seed, index])
    segment_mix = rng.dirichlet(np.full(N_SEGMENTS, alpha))
    category_mix = rng.dirichlet(np.full(N_CATEGORIES, alpha))
    n = int(rng.integers(MIN_IMPRESSIONS, MAX_IMPRESSIONS + 1))
    return draw_log(rng, segment_mix, category_mix, n)


@functools.lru_cache(maxsize=4)
def held_out(seed: int, size: int = HELD_OUT_SIZE) -> ClickLog:
    """The held-out set every site scores the global model on: the population's mixture
    (uniform over segments and categories), fixed by ``seed``; cached, as every site asks for it."""
    rng = np.random.default_rng([seed, HELD_OUT_INDEX])
    return draw_log(rng, np.full(N_SEGMENTS, 1 / N_SEGMENTS), np.full(N_CATEGORIES, 1 / N_CATEGORIES), size)


def item_popularity(seed: int, n_sites: int, alpha: float = DEFAULT_ALPHA, smoothing: float = 10.0) -> np.ndarray:
    """The baseline's click probability per item: each item's click-through rate over the
    training logs of all ``n_sites`` sites, shrunk towards the overall rate by ``smoothing``
    pseudo-impressions (an item seen twice is not trusted like one seen 500 times)."""
    clicks = np.zeros(N_ITEMS)
    shown = np.zeros(N_ITEMS)
    for index in range(1, n_sites + 1):
        log = site_log(seed, index, alpha)
        clicks += np.bincount(log.item_id, weights=log.clicked, minlength=N_ITEMS)
        shown += np.bincount(log.item_id, minlength=N_ITEMS)
    overall = clicks.sum() / max(shown.sum(), 1.0)
    return (clicks + smoothing * overall) / (shown + smoothing)
