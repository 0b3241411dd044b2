"""What a strategy is: a ``Strategy`` plans each round, an ``Aggregator`` streams its results.

Why two classes. Planning (which sites, which per-site config, what to do with evaluation
metrics, what state to keep for a resume) is small, JSON-able and varies a lot between
algorithms; aggregation touches every byte of every result, must stream (results are folded
in as they arrive and never kept, so the server holds O(1) models whatever the number of
sites) and is where the speed is. The Controller runs the loop that uses both (flkit.server.
controller): per round it offers the round's sites to ``configure_train``, hands the task with
each site's config to the sites, folds each accepted result into ``aggregator(round)`` and has
it write the next global model into buffers the Controller owns.

Strategy arguments travel as JSON in ``job.json`` (never a class path, never a pickle): a
Strategy is built by its registered name with keyword arguments (flkit.strategy.registry), and
the arguments it was built with are what an export writes back.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from flkit.errors import FLKitError

if TYPE_CHECKING:  # importing flkit.strategy costs no torch: a strategy file only needs the ABCs
    import torch

    from flkit.model import ParamsType
    from flkit.wire.codec import Params

SiteConfig = dict[str, Any]  # JSON-able values a site's script finds in FLModel.meta


@dataclass
class SiteResult:
    """One site's validated answer to a train task."""

    site: str
    params: Params
    params_type: ParamsType
    weight: float
    metrics: dict[str, Any] = field(default_factory=dict)
    # Tensors the site sent in its meta, by meta key (e.g. SCAFFOLD's ``scaffold_c_diff``): checked
    # finite, not checked against the model (the aggregator that uses them does that).
    meta_tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


class Contribution(ABC):
    """One result folded in piece by piece while its bytes arrive (``Aggregator.contribution``).

    Why: a whole-result receive buffer is one model size on the server per upload; folding each
    piece as it arrives needs none. The catch is that a result can still turn out bad after part
    of it is in (a NaN in its last tensor, a site that dies half-way, a round that closes first):
    so every folded piece can be taken back out (``unfold``) by whoever kept its bytes (the server
    journals them), and the result counts only once ``commit`` says so.
    """

    @abstractmethod
    def fold(self, name: str, start: int, values: torch.Tensor) -> None:
        """Add ``values`` (flat, the model's dtype) as elements ``start...`` of tensor ``name``.
        Raises ``RoundClosed`` once the round no longer takes this result (then unfold what was folded)."""

    @abstractmethod
    def unfold(self, name: str, start: int, values: torch.Tensor) -> None:
        """Take back a piece ``fold`` added (the same arguments)."""

    @abstractmethod
    def commit(self) -> None:
        """Every piece is in: the result counts. Raises ``RoundClosed`` if the round closed first."""

    @abstractmethod
    def discard(self, taken_back: bool = True) -> None:
        """The result does not count; every piece folded so far has been unfolded. ``taken_back``
        False: some could not be (their bytes could not be read back), so the round's aggregate is
        not whole and ``finish`` must raise rather than write it."""


class RoundClosed(FLKitError):
    """The round's aggregate no longer takes this result (it closed, or its end was decided)."""


class Aggregator(ABC):
    """Turns one round's results into the next global model, streaming.

    The Controller calls ``start`` once per round, ``add`` for every accepted result as it
    arrives (possibly from several threads at once; ``result.params`` are only valid during the
    call, so an aggregator keeps what it needs, not the result), and ``finish`` to have the next
    global model written into the buffers ``start`` was given. An aggregator that needs every
    result at once (a median) keeps them, bounded by the round's sites, and says so in its docstring.
    An aggregator that can fold a result while its bytes arrive also offers ``contribution``.
    """

    @abstractmethod
    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        """Prepare to aggregate results computed from ``global_params``. ``out()``: the buffers
        ``finish`` writes the next global model into (contiguous CPU tensors with the keys, shapes and
        dtypes of the global model, contents undefined; the same ones at every call); an aggregator
        may use them as working memory during the round. Call it as late as possible: the previous
        model's buffers are free again once the sites have fetched this round's task. Why the caller
        gives the memory: it knows where sites read the model from (shared memory, a file in
        /dev/shm), so the aggregate needs no further copy to get there."""

    @abstractmethod
    def add(self, result: SiteResult) -> None:
        """Fold one accepted, checked result into the running aggregate. A ValidationError means the
        result was refused before any of it was folded in (the site fails, the round goes on); any
        other exception means the aggregate may hold part of it (the round fails)."""

    @abstractmethod
    def finish(self) -> None:
        """Write the new global model into the buffers ``start``'s ``out()`` gives."""

    def contribution(self, round_num: int, site: str, weight: float, params_type: ParamsType,
                     cancel: Callable[[], None] | None = None) -> Contribution | None:
        """A result of round ``round_num`` to fold in piece by piece as its bytes arrive, or None
        (the default): this aggregator takes whole, checked results through ``add``. Raises
        RoundClosed when ``round_num`` is not the round it aggregates now (the result came late).
        ``cancel``: stops the upload feeding it (called if the round closes first). The pieces are
        checked (layout, finite values) before they are folded; the result as a whole is not,
        until ``commit``."""
        return None


class Strategy(ABC):
    """Plans each round of a job and says how its results are aggregated.

    Subclasses implement ``aggregator``; the planning methods have defaults (every offered site,
    no per-site config; evaluation metrics averaged over the sites). Register a subclass with
    ``@flkit.strategy.register("name")`` so a job can name it; its constructor takes keyword
    arguments only, with JSON values, because they are written to ``job.json``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Strategy:
        if args:
            raise TypeError(f"{cls.__name__}: pass strategy arguments by name (they are written to job.json)")
        self = super().__new__(cls)
        self.args = dict(kwargs)  # what it was built with: an export writes these back
        return self

    args: dict[str, Any]
    strategy_name: ClassVar[str | None] = None  # set by @register

    @abstractmethod
    def aggregator(self, round_num: int) -> Aggregator:
        """The aggregator of round ``round_num`` (the same object every round is fine, and cheaper:
        it can keep its buffers)."""

    def configure_train(self, round_num: int, sites: Sequence[str], rng: random.Random) -> dict[str, SiteConfig]:
        """The sites that train in round ``round_num``, each with its config (a JSON-able dict the
        site's script finds in ``FLModel.meta``, e.g. ``{"fedprox_mu": 0.01}``).

        ``sites``: the round's offer, the sites that have joined and were sampled for it (the job's
        ``clients_per_round`` / ``fraction``, or all); return a subset of them. ``rng``: seeded
        from the job's seed and the round, for a strategy that samples further. Default: every
        offered site, no config."""
        return {site: {} for site in sites}

    def population(self, sites: Sequence[str]) -> None:
        """Called before each training round's ``configure_train`` with every site in the job now
        (joined and not failed), sampled or not. For a strategy whose maths needs the number of
        sites (SCAFFOLD averages its control variates over all of them). Default: nothing."""
        return None

    def train_tensors(self, round_num: int, global_params: Params) -> Mapping[str, Mapping[str, torch.Tensor]]:
        """Tensors every site of training round ``round_num`` finds in ``FLModel.meta``, by meta key
        (SCAFFOLD's global control variate under ``scaffold_c_global``). They travel beside the
        global model as tensors (flkit.wire.meta_tensors) and must not change until the round ends.
        Default: none."""
        return {}

    def configure_evaluate(self, round_num: int, sites: Sequence[str], rng: random.Random) -> dict[str, SiteConfig]:
        """The sites that score the global model in an evaluation round (the job's final
        validation), each with its config. Default: every offered site, no config."""
        return {site: {} for site in sites}

    def aggregate_evaluate(self, round_num: int, metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """One set of metrics for an evaluation round from each site's (``metrics[site]``).
        Default: the plain mean of each metric over the sites that reported it."""
        return mean_metrics(metrics)

    def state_dict(self) -> dict[str, Any]:
        """The strategy's server-side state that a restarted server needs to go on where it stopped
        (JSON-able; written after every round). Default: none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take back what ``state_dict`` returned. Default: a strategy without state accepts only none."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but was given {sorted(state)}")

    def state_tensors(self) -> Mapping[str, torch.Tensor]:
        """The tensor part of the strategy's state (server momentum, Adam's moments, SCAFFOLD's
        control variate), saved with every round's global model as one round (a resume reads both or
        neither). The Controller hands these very tensors to its writer thread: the strategy may
        change them in place only in its aggregator's ``finish``, before which the Controller waits
        until the last round's were written. Default: none."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take back what ``state_tensors`` returned (a resume). Default: accepts only none."""
        if tensors:
            raise ValueError(f"{type(self).__name__} keeps no tensor state, but was given {len(tensors)} tensor(s)")


def mean_metrics(metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each metric's plain mean over the sites that reported it (finite numbers only)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for site_metrics in metrics.values():
        for name, value in site_metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                sums[name] = sums.get(name, 0.0) + float(value)
                counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


__all__ = ["Aggregator", "Contribution", "RoundClosed", "SiteConfig", "SiteResult", "Strategy", "mean_metrics"]
