"""Splitting one labelled dataset among sites, the ways FL papers do, reproducibly.

Why in flkit: every FL experiment starts by deciding who holds which samples, and the split decides
the result as much as the algorithm (FedAvg is fast on IID splits and slow on label-skewed ones).
Each site's script computes the same split from the same labels and seed and takes its own part by
its site name, so no index files travel and every run of a job sees the same split.

Schemes:

- ``"iid"``: a seeded shuffle cut into equal parts (sizes differ by at most one).
- ``"dirichlet"``: per label, its samples are divided among the sites in proportions drawn from
  Dirichlet(``alpha``) (Hsu et al., 2019): small ``alpha`` (0.1) gives each site a few labels,
  large ``alpha`` (100) is close to IID.
- ``"shards"``: the FedAvg paper's pathological split (McMahan et al., 2017): samples sorted by
  label, cut into ``sites * shards_per_site`` shards, ``shards_per_site`` random shards per site.
- ``"unbalanced"``: IID labels, sizes proportional to log-normal draws with ``sigma`` (0: equal).

``min_size``: every site gets at least this many samples. In a Dirichlet split, sites that drew
fewer take samples from the largest site until they have it (strong skew, e.g. alpha 0.05 over 32
sites, otherwise leaves some sites with no data at all); other schemes check it and raise
ValueError naming the scheme and the smallest site.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards", "unbalanced")
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Partition:
    """Which samples each site holds: ``indices(site)`` into the labels the split was made from."""

    sites: tuple[str, ...]
    scheme: str
    seed: int
    labels: np.ndarray  # the labels split (a copy), for report()
    parts: tuple[np.ndarray, ...]  # per site, sorted sample indices

    def indices(self, site: str) -> list[int]:
        """The samples of ``site`` (a name given to ``partition``), ascending."""
        try:
            position = self.sites.index(site)
        except ValueError:
            shown = ", ".join(self.sites[:5]) + (f" and {len(self.sites) - 5} more" if len(self.sites) > 5 else "")
            raise KeyError(f"site {site!r} is not in this partition (sites: {shown})") from None
        return self.parts[position].tolist()

    def sizes(self) -> dict[str, int]:
        return {site: int(part.size) for site, part in zip(self.sites, self.parts, strict=True)}

    def report(self) -> dict[str, Any]:
        """Sizes and label histograms per site, as JSON-able data (``str(partition)`` prints them)."""
        classes = sorted(int(c) for c in np.unique(self.labels))
        per_site = {}
        for site, part in zip(self.sites, self.parts, strict=True):
            counts = np.bincount(np.searchsorted(classes, self.labels[part]), minlength=len(classes))
            per_site[site] = {"size": int(part.size),
                              "labels": {str(c): int(n) for c, n in zip(classes, counts, strict=True) if n}}
        return {"scheme": self.scheme, "seed": self.seed, "samples": int(self.labels.size), "sites": per_site}

    def __str__(self) -> str:
        report = self.report()
        classes = sorted({label for site in report["sites"].values() for label in site["labels"]}, key=int)
        width = max(4, *(len(s) for s in self.sites))
        head = f"{'site':<{width}} {'size':>6}  " + " ".join(f"{c:>5}" for c in classes)
        lines = [f"{self.scheme} partition of {report['samples']} samples, seed {self.seed}", head]
        for site, entry in report["sites"].items():
            counts = " ".join(f"{entry['labels'].get(c, 0):>5}" for c in classes)
            lines.append(f"{site:<{width}} {entry['size']:>6}  {counts}")
        return "\n".join(lines)


def partition(labels: Sequence[int] | np.ndarray | Any, sites: int | Sequence[str], scheme: str = "iid",
              seed: int = 0, *, alpha: float | None = None, shards_per_site: int | None = None,
              sigma: float | None = None, min_size: int = 0) -> Partition:
    """Split the samples whose labels are ``labels`` among ``sites`` (a count: "site-1".."site-N",
    or the names). Deterministic in (labels, sites, scheme, seed, options): every site computing it
    gets the same split. See the module's docstring for the schemes and their options."""
    y = _labels(labels)
    names = _site_names(sites)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    _only(scheme, alpha=alpha, shards_per_site=shards_per_site, sigma=sigma)
    if type(seed) is not int:
        raise TypeError(f"seed must be an int, got {seed!r}")
    if type(min_size) is not int or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
    n = len(names)
    if min_size * n > y.size:
        raise ValueError(f"min_size={min_size} for {n} sites needs {min_size * n} samples; there are {y.size}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(y.size), n)
    elif scheme == "unbalanced":
        parts = _unbalanced(y.size, n, rng, 1.0 if sigma is None else sigma)
    elif scheme == "shards":
        parts = _shards(y, n, rng, 2 if shards_per_site is None else shards_per_site)
    else:
        if alpha is None:
            raise ValueError("scheme 'dirichlet' needs alpha (e.g. 0.1 for strong label skew, 100 for near IID)")
        parts = _dirichlet(y, n, rng, alpha, min_size)
    sizes = [p.size for p in parts]
    if min(sizes) < min_size:
        smallest = names[int(np.argmin(sizes))]
        raise ValueError(f"{scheme} partition with seed {seed}: site {smallest} gets {min(sizes)} samples, "
                         f"fewer than min_size={min_size}")
    return Partition(tuple(names), scheme, seed, y.copy(), tuple(np.sort(p) for p in parts))


def _labels(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # a torch tensor
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence of integers, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.issubdtype(y.dtype, np.floating) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64)
    return y.astype(np.int64, copy=False)


def _site_names(sites: int | Sequence[str]) -> list[str]:
    if isinstance(sites, bool):
        raise TypeError("sites must be a number of sites or a list of site names")
    if isinstance(sites, int):
        if sites < 1:
            raise ValueError(f"sites must be >= 1, got {sites}")
        return [f"site-{i}" for i in range(1, sites + 1)]
    if isinstance(sites, str):
        raise TypeError(f"sites must be a number or a list of names, got the string {sites!r}")
    names = list(sites)
    bad = [s for s in names if not isinstance(s, str) or not _SITE.fullmatch(s)]
    if not names or bad:
        raise ValueError(f"site names must be 1-64 letters, digits, '.', '_' or '-', got {bad[:3] or names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"site names must be unique, got {names!r:.200}")
    return names


def _only(scheme: str, **options: Any) -> None:
    """Refuse an option the scheme does not use (it would be silently ignored)."""
    uses = {"dirichlet": {"alpha"}, "shards": {"shards_per_site"}, "unbalanced": {"sigma"}}.get(scheme, set())
    extra = sorted(name for name, value in options.items() if value is not None and name not in uses)
    if extra:
        raise ValueError(f"scheme {scheme!r} does not use {', '.join(extra)}")
    alpha, shards, sigma = options.get("alpha"), options.get("shards_per_site"), options.get("sigma")
    if alpha is not None and not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
    if shards is not None and (type(shards) is not int or shards < 1):
        raise ValueError(f"shards_per_site must be an int >= 1, got {shards!r}")
    if sigma is not None and not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a number >= 0, got {sigma!r}")


def _unbalanced(total: int, n: int, rng: np.random.Generator, sigma: float) -> list[np.ndarray]:
    """IID samples; sizes in proportion to log-normal(0, sigma) draws, at least 1 each where possible."""
    weights = rng.lognormal(0.0, sigma, n)
    sizes = np.floor(weights / weights.sum() * total).astype(np.int64)
    sizes[np.argsort(-weights)[: total - int(sizes.sum())]] += 1  # the remainder to the largest draws
    return np.split(rng.permutation(total), np.cumsum(sizes)[:-1])


def _shards(y: np.ndarray, n: int, rng: np.random.Generator, per_site: int) -> list[np.ndarray]:
    count = n * per_site
    if count > y.size:
        raise ValueError(f"{n} sites x {per_site} shards need {count} samples; there are {y.size}")
    by_label = np.argsort(y, kind="stable")
    shards = np.array_split(by_label, count)
    order = rng.permutation(count)
    return [np.concatenate([shards[k] for k in order[i * per_site:(i + 1) * per_site]]) for i in range(n)]


def _dirichlet(y: np.ndarray, n: int, rng: np.random.Generator, alpha: float, min_size: int) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(y):
        samples = rng.permutation(np.flatnonzero(y == c))
        shares = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(shares)[:-1] * samples.size).astype(np.int64)
        for site, piece in enumerate(np.split(samples, cuts)):
            parts[site].append(piece)
    merged = [rng.permutation(np.concatenate(p)) for p in parts]
    return _top_up(merged, min_size)


def _top_up(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Sites below ``min_size`` take samples from the largest site (its last ones, in its shuffled
    order) until they have it: one draw always suffices, and the skew of the others barely moves."""
    parts = list(parts)
    while True:
        sizes = [p.size for p in parts]
        short = int(np.argmin(sizes))
        if sizes[short] >= min_size:
            return parts
        donor = int(np.argmax(sizes))
        take = min(min_size - sizes[short], sizes[donor] - min_size)
        parts[short] = np.concatenate([parts[short], parts[donor][-take:]])
        parts[donor] = parts[donor][:-take]


__all__ = ["SCHEMES", "Partition", "partition"]
