"""FedAvg's weighted mean for large models: summed in the next global model's own buffers, with
each result folded in piece by piece while its bytes arrive.

Why a second implementation of the same mean: ``WeightedMean`` keeps float64 sums (two model
sizes for a float32 model) and takes whole, checked results (a receive buffer of one model size
per upload), so the server peaks at about five model sizes. For a model of gigabytes that is what
decides whether the job fits on the server at all. Here the sums are the ``out`` buffers the
controller gives ``start`` (the next global model, in the model's dtype) and results arrive as
pieces (``Contribution``), so the server holds the global model, the next one and, per upload
being folded (a bounded number), a window buffer: about two model sizes plus a fixed overhead.

What it gives up: float32 sums round at every addition, so the mean depends (at float32's last
bit) on the order the results arrive in, and taking back a result that failed half-way
(``unfold``) leaves at most a rounding error of the sum in the elements it reached. Tensors of
other dtypes keep side sums: float64 for integers and bool (rounded back, bool by majority, as
``WeightedMean``), float32 for 16-bit floats (so a half-precision model costs two more of its
sizes: about four in all on the server).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from flkit.errors import FLKitError
from flkit.model import ParamsType
from flkit.strategy.base import Aggregator, Contribution, RoundClosed, SiteResult
from flkit.wire.codec import Params

# Elements per lock: several uploads fold into the same sums at once, each under the stripe's
# lock (two unlocked in-place adds into one element can lose one of them).
STRIPE = 1 << 21
# How long ``finish`` waits for the results still being folded in to take themselves back out
# after it cancelled their uploads (a local replay of what was folded; never a network wait).
CLOSE_WAIT_S = 600.0


def write_mean(out: torch.Tensor, mean: torch.Tensor) -> None:
    """``out`` = ``mean`` rounded once to ``out``'s dtype: floats as they are, integers to the
    nearest, bool by majority (``mean`` >= 0.5). Shared by FedAvg's two aggregators."""
    if out.dtype == torch.bool:
        out.copy_(mean >= 0.5)
    elif not (out.dtype.is_floating_point or out.dtype.is_complex):
        out.copy_(mean.round_())
    else:
        out.copy_(mean)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of a tensor's side sum, or None when the sum lives in the output buffer itself."""
    if dtype in (torch.float32, torch.float64) or dtype.is_complex:
        return None
    if dtype.is_floating_point:
        return torch.float32  # float16, bfloat16: their own precision is too coarse to sum in
    return torch.float64  # integers and bool: exact below 2**53


class _Piecewise(Contribution):
    """One result on its way in (``StreamedMean.contribution``)."""

    def __init__(self, owner: StreamedMean, site: str, weight: float, params_type: ParamsType,
                 cancel: Callable[[], None] | None) -> None:
        self.owner = owner
        self.site = site
        self.weight = weight
        self.params_type = params_type
        self.cancel = cancel
        self.cancelled = False

    def fold(self, name: str, start: int, values: torch.Tensor) -> None:
        if self.cancelled:
            raise RoundClosed(f"site {self.site}: the round closed before its result was in")
        self.owner._add(name, start, values, self.weight)

    def unfold(self, name: str, start: int, values: torch.Tensor) -> None:
        self.owner._add(name, start, values, -self.weight)

    def commit(self) -> None:
        self.owner._commit(self)

    def discard(self, taken_back: bool = True) -> None:
        self.owner._discard(self, taken_back)


class StreamedMean(Aggregator):
    """``sum(w_i * x_i) / sum(w_i)`` in the model's dtype, in the next global model's buffers.

    Memory beyond the two models the controller holds anyway (the global one and ``out``): none
    for float32/float64 tensors, side sums for others (see the module's docstring). Results come
    whole (``add``: the memory transport) or piece by piece (``contribution``: the gRPC and
    shared-memory uploads, which journal what they fold so they can take it back).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._global: Params = {}
        self._out: dict[str, torch.Tensor] = {}
        self._sums: dict[str, torch.Tensor] = {}
        self._side: dict[str, torch.Tensor] = {}  # kept across rounds (same shapes)
        self._take_out: Callable[[], Params] = dict
        self._locks: dict[str, list[threading.Lock]] = {}
        self._open: set[_Piecewise] = set()
        self._closed = True
        self._round = -1
        self._total = 0.0
        self._diff = 0.0
        self._results = 0
        self._broken: str | None = None  # why the round's sums are not whole (finish raises it)

    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        self._close()  # a result still open from an abandoned round is taken back out first
        with self._cond:
            self._global = global_params
            self._take_out = out
            self._sums, self._out, self._locks = {}, {}, {}
            self._total = self._diff = 0.0
            self._results = 0
            self._broken = None
            self._round = round_num
            self._closed = False

    def _prepare_locked(self) -> None:
        """The sums, zeroed, in the output buffers (and side buffers): made at the round's first
        result, when the previous model's buffers are likeliest to be free again."""
        if self._sums:
            return
        out = self._take_out()
        sums: dict[str, torch.Tensor] = {}
        side: dict[str, torch.Tensor] = {}
        for name, base in self._global.items():
            flat_out = out[name].view(-1)
            want = _sum_dtype(base.dtype)
            if want is None:
                sums[name] = flat_out
            else:
                old = self._side.get(name)
                side[name] = old if old is not None and old.numel() == base.numel() and old.dtype == want \
                    else torch.empty(base.numel(), dtype=want)
                sums[name] = side[name]
            sums[name].zero_()
        self._out = {name: out[name].view(-1) for name in self._global}
        self._side = side
        self._locks = {name: [threading.Lock() for _ in range(0, t.numel(), STRIPE)] for name, t in sums.items()}
        self._sums = sums

    def contribution(self, round_num: int, site: str, weight: float, params_type: ParamsType,
                     cancel: Callable[[], None] | None = None) -> _Piecewise:
        if not weight > 0:
            raise FLKitError(f"site {site}: aggregation weight must be > 0, got {weight}")
        piece = _Piecewise(self, site, weight, params_type, cancel)
        with self._cond:
            if self._closed or round_num != self._round:
                raise RoundClosed(f"site {site}: the result of round {round_num} came too late "
                                  f"(round {self._round} is {'closed' if self._closed else 'open'})")
            self._prepare_locked()
            self._open.add(piece)
        return piece

    def add(self, result: SiteResult) -> None:
        piece = self.contribution(self._round, result.site, result.weight, result.params_type)
        folded: list[str] = []
        try:
            for name, total in self._sums.items():
                values = result.params[name].reshape(-1)
                if values.numel() != total.numel():
                    raise FLKitError(f"site {result.site}: tensor '{name}' has {values.numel()} values, "
                                     f"the model {total.numel()}")
                piece.fold(name, 0, values)
                folded.append(name)
            piece.commit()
        except BaseException:
            for name in folded:
                piece.unfold(name, 0, result.params[name].reshape(-1))
            piece.discard()
            raise

    def _add(self, name: str, start: int, values: torch.Tensor, weight: float) -> None:
        """sums[name][start:start + n] += weight * values, stripe by stripe under each stripe's lock."""
        total = self._sums.get(name)
        if total is None or values.dim() != 1 or start < 0 or start + values.numel() > total.numel():
            raise FLKitError(f"piece of tensor '{name}' at {start} (+{values.numel()}) is outside the model")
        locks = self._locks[name]
        end = start + values.numel()
        at = start
        while at < end:
            stripe = at // STRIPE
            stop = min(end, (stripe + 1) * STRIPE)
            with locks[stripe]:
                total[at:stop].add_(values[at - start:stop - start], alpha=weight)
            at = stop

    def _commit(self, piece: _Piecewise) -> None:
        with self._cond:
            if piece.cancelled or piece not in self._open:
                raise RoundClosed(f"site {piece.site}: the round closed before its result was in")
            self._open.discard(piece)
            self._total += piece.weight
            if piece.params_type == ParamsType.DIFF:
                self._diff += piece.weight
            self._results += 1
            self._cond.notify_all()

    def _discard(self, piece: _Piecewise, taken_back: bool) -> None:
        with self._cond:
            self._open.discard(piece)
            if not taken_back and self._broken is None:
                self._broken = (f"part of the refused result of site {piece.site} could not be taken back out "
                                "of the round's sums")
            self._cond.notify_all()

    def _close(self) -> None:
        """Take no more results; stop the uploads of those still open and wait until they took
        themselves back out (each is fed by a thread that unfolds what it folded)."""
        with self._cond:
            self._closed = True
            pending = list(self._open)
            for piece in pending:
                piece.cancelled = True
        for piece in pending:
            if piece.cancel is not None:
                piece.cancel()
        with self._cond:
            if not self._cond.wait_for(lambda: not self._open, CLOSE_WAIT_S):
                raise FLKitError(f"round {self._round}: {len(self._open)} result(s) being folded in did not "
                                 f"stop within {CLOSE_WAIT_S:g} s")

    def finish(self) -> None:
        self._close()
        if self._broken is not None:
            raise FLKitError(self._broken)
        if not self._results:
            raise FLKitError(f"round {self._round}: no results to aggregate")
        base = {name: t.reshape(-1) for name, t in self._global.items()}
        for name, total in self._sums.items():
            if self._diff:  # DIFF results summed differences: the global model, weighted, once
                total.add_(base[name], alpha=self._diff)
            total.div_(self._total)
            if total is not self._out[name]:
                write_mean(self._out[name], total)


__all__ = ["STRIPE", "StreamedMean", "write_mean"]
