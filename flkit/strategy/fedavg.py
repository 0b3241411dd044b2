"""FedAvg: every offered site trains, and the results are averaged by weight.

The strategy plans nothing beyond the round's offer (sampling is the job's ``clients_per_round``
or ``fraction``); the work is in its aggregator: ``WeightedMean``, which folds whole results into
float64 sums and writes the mean once into the buffers the Controller gives it, or, for models of
a gigabyte and more, ``StreamedMean`` (flkit.strategy.streamed_mean), which sums in those buffers
themselves while the results' bytes arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flkit.errors import FLKitError
from flkit.model import ParamsType
from flkit.strategy.base import Aggregator, Contribution, SiteResult, Strategy
from flkit.strategy.registry import register
from flkit.strategy.streamed_mean import StreamedMean, write_mean
from flkit.wire.codec import Params

# Elements folded per step (a 16 MiB float64 staging buffer). Why this large: each step is a few
# torch ops, each an OpenMP parallel region, and waking a region's threads costs much more when
# several threads (sites, gRPC handlers) have their own teams: with 2**18 a 25M-parameter fold
# took 94 ms from gRPC's threads against 52 ms with 2**21 (49 ms either way from one thread).
FOLD_CHUNK = 1 << 21


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return torch.complex128
    return torch.float64  # float32/half/bfloat16/fp8 and integer/bool buffers: exact products, summed in float64


@dataclass
class _Slice:
    """One FOLD_CHUNK-sized piece of one tensor's running sum."""

    name: str
    start: int
    stop: int
    touched: bool = False  # holds a value of this round (else the first fold writes instead of adding)


class _Folding:
    """One result on its way into the sums; its thread waits until ``left`` reaches 0 (or ``error``)."""

    __slots__ = ("error", "flat", "left", "weight")

    def __init__(self, result: SiteResult, names: list[str]) -> None:
        self.flat = {name: result.params[name].reshape(-1) for name in names}
        self.weight = result.weight
        self.left = -1  # slices still to fold; set when the folder takes it in
        self.error: BaseException | None = None


class WeightedMean(Aggregator):
    """FedAvg's aggregate (McMahan et al.): ``sum(w_i * x_i) / sum(w_i)``.

    Why float64 sums: a float32 value times a whole-number weight (``NUM_STEPS_CURRENT_ROUND``
    < 2**29) is exact in float64, and the sum of a round's products rounds at 2**-53, far below
    float32's resolution. The new global model is that sum rounded once, so it has the same bits
    whatever order the results arrive in (unless an element's exact mean lies within 2**-29 ulp
    of a float32 rounding tie; float64 models sum at their own precision, in arrival order).
    With one site the result is that site's tensor bit for bit (for float32 and narrower floats, and
    integers below 2**53).

    Why one folder at a time, folding several results together: a fold is bound by memory
    bandwidth (reading the result, reading and writing a float64 sum twice its size), and two
    folds at once on two cores were slower than one after the other. So the first thread to
    submit becomes the folder and walks the sums slice by slice (FOLD_CHUNK elements); a result
    submitted meanwhile joins the walk at the current slice and goes once around. Every
    submitting thread returns when its own result is in. (Folding two results in one walk saves
    little, the sums' traffic dominates, but it keeps many sites from queueing one fold each.)

    Memory: one float64 sum per tensor (two float32 model sizes), reused across rounds, and a
    16 MiB staging buffer; the next global model goes into the buffers the controller gives
    ``start``. Results are folded in as they arrive and never kept. DIFF results are summed as differences and the global model is
    added once, weighted, at the end, so FULL and DIFF sites can be mixed. Integer buffers (e.g.
    BatchNorm's ``num_batches_tracked``) are rounded back to their dtype, bool ones by majority.
    """

    def __init__(self) -> None:
        self._global: Params = {}
        self._out: Callable[[], Params] = dict
        self._sums: dict[str, torch.Tensor] = {}  # flat float64 (complex128) running sums
        self._slices: list[_Slice] = []
        self._cond = threading.Condition()  # everything below, and the folder's hand-over
        self._total_weight = 0.0
        self._diff_weight = 0.0
        self._results = 0
        self._round = -1
        self._joining: list[_Folding] = []  # submitted, not yet taken in by the folder
        self._folding = False  # a thread is walking the sums
        self._staging: torch.Tensor | None = None  # used by the folder only

    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        with self._cond:  # a late fold of the last round cannot land in this one
            self._wait_idle_locked()
            self._global = global_params
            self._out = out
            self._total_weight = self._diff_weight = 0.0
            self._results = 0
            self._round = round_num
            sums: dict[str, torch.Tensor] = {}
            for name, base in global_params.items():
                old = self._sums.get(name)
                want = _acc_dtype(base.dtype)
                sums[name] = old if old is not None and old.numel() == base.numel() and old.dtype == want \
                    else torch.empty(base.numel(), dtype=want)
            self._sums = sums
            self._slices = [_Slice(name, start, min(t.numel(), start + FOLD_CHUNK))
                            for name, t in sums.items() for start in range(0, t.numel(), FOLD_CHUNK)]

    def _wait_idle_locked(self) -> None:
        while self._folding or self._joining:
            self._cond.wait()

    def _buffer(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._staging
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            buf = torch.empty(max(n, 1), dtype=dtype)
            self._staging = buf
        return buf[:n]

    def _fold_slice(self, piece: _Slice, values: list[tuple[torch.Tensor, float]]) -> None:
        """sum[piece] (+)= w * value for each (flat value, w), through the float64 staging buffer."""
        part = self._sums[piece.name][piece.start:piece.stop]
        for flat, weight in values:
            value = flat[piece.start:piece.stop]
            if value.dtype != part.dtype:
                staged = self._buffer(part.numel(), part.dtype)
                staged.copy_(value)
                value = staged
            if piece.touched:
                part.add_(value, alpha=weight)
            else:
                torch.mul(value, weight, out=part)
                piece.touched = True

    def add(self, result: SiteResult) -> None:
        if not result.weight > 0:
            raise FLKitError(f"site {result.site}: aggregation weight must be > 0, got {result.weight}")
        item = _Folding(result, list(self._global))
        with self._cond:
            self._joining.append(item)
            fold_here = not self._folding
            self._folding = True
        if fold_here:
            self._fold_all()
        else:
            with self._cond:
                while item.left != 0 and item.error is None:
                    self._cond.wait()
        if item.error is not None:
            if fold_here:  # this thread's own error
                raise item.error
            raise FLKitError(f"site {result.site}: the fold this result was part of failed "
                             f"({type(item.error).__name__}: {item.error})") from item.error
        with self._cond:
            self._total_weight += result.weight
            if result.params_type == ParamsType.DIFF:
                self._diff_weight += result.weight
            self._results += 1

    def _fold_all(self) -> None:
        """Walk the slices round and round until every result that joined has been folded into each."""
        active: list[_Folding] = []
        position = 0
        try:
            while True:
                with self._cond:
                    for item in self._joining:
                        item.left = len(self._slices)
                        active.append(item)
                    self._joining.clear()
                    if any(item.left == 0 for item in active):
                        active = [item for item in active if item.left]
                        self._cond.notify_all()
                    if not active or not self._slices:
                        for item in active:
                            item.left = 0
                        self._folding = False
                        self._cond.notify_all()
                        return
                piece = self._slices[position]
                self._fold_slice(piece, [(item.flat[piece.name], item.weight) for item in active])
                for item in active:
                    item.left -= 1
                position = (position + 1) % len(self._slices)
        except BaseException as exc:  # the sums are part-way: every result in them failed
            with self._cond:
                for item in active + self._joining:
                    item.error = exc
                self._joining.clear()
                self._folding = False
                self._cond.notify_all()

    def finish(self) -> None:
        with self._cond:  # no fold is half-way through the sums
            self._wait_idle_locked()
            if not self._results:
                raise FLKitError(f"round {self._round}: no results to aggregate")
            total, diff_weight = self._total_weight, self._diff_weight
            out = self._out()  # taken now: the last round's model is likelier to be free by now
            base_flat = {name: base.reshape(-1) for name, base in self._global.items()}
            for piece in self._slices:
                if diff_weight:
                    self._fold_slice(piece, [(base_flat[piece.name], diff_weight)])
                self._mean(piece, total, out[piece.name].view(-1))

    def _mean(self, piece: _Slice, total: float, flat_out: torch.Tensor) -> None:
        """out[piece] = sum[piece] / total, rounded once to the output's dtype."""
        staged = self._buffer(piece.stop - piece.start, self._sums[piece.name].dtype)
        torch.div(self._sums[piece.name][piece.start:piece.stop], total, out=staged)
        write_mean(flat_out[piece.start:piece.stop], staged)


# Models at least this large (256 MiB) are averaged by StreamedMean unless the job says otherwise: the float64
# sums and whole-result receive buffers of WeightedMean would put the server at about 5 model sizes.
STREAMED_FROM_BYTES = 256 << 20


class _BySize(Aggregator):
    """FedAvg's aggregator when the job leaves the choice to the model's size (``streamed=None``):
    ``WeightedMean`` below STREAMED_FROM_BYTES, ``StreamedMean`` from there on, decided at each
    round's start (the model's size does not change within a job)."""

    def __init__(self) -> None:
        self._exact = WeightedMean()
        self._streamed: StreamedMean | None = None
        self._chosen: Aggregator = self._exact

    def start(self, round_num: int, global_params: Params, out: Callable[[], Params]) -> None:
        size = sum(t.numel() * t.element_size() for t in global_params.values())
        if size >= STREAMED_FROM_BYTES:
            self._streamed = self._streamed or StreamedMean()
            self._chosen = self._streamed
        else:
            self._chosen = self._exact
        self._chosen.start(round_num, global_params, out)

    def add(self, result: SiteResult) -> None:
        self._chosen.add(result)

    def finish(self) -> None:
        self._chosen.finish()

    def contribution(self, round_num: int, site: str, weight: float, params_type: ParamsType,
                     cancel: Callable[[], None] | None = None) -> Contribution | None:
        return self._chosen.contribution(round_num, site, weight, params_type, cancel)


def mean_aggregator(streamed: bool | None = None) -> Aggregator:
    """FedAvg's weighted mean, summed as ``streamed`` says (see ``FedAvg``): for strategies that
    start from FedAvg's mean (server optimisers, FedProx, SCAFFOLD)."""
    if streamed is not None and not isinstance(streamed, bool):
        raise TypeError(f"streamed must be true, false or null, got {streamed!r}")
    return _BySize() if streamed is None else StreamedMean() if streamed else WeightedMean()


@register("fedavg")
class FedAvg(Strategy):
    """Federated averaging (McMahan et al., 2017): each offered site trains from the global model,
    and the next global model is the mean of their results weighted by ``NUM_STEPS_CURRENT_ROUND``
    (times the job's ``aggregation_weights``). No state.

    ``streamed``: how the mean is summed. False: in float64 from whole, checked results
    (``WeightedMean``: the same bits whatever order the results arrive in; the server holds about
    five model sizes). True: in the model's dtype, in the next global model's buffers, each result
    folded in while its bytes arrive (``StreamedMean``: about two model sizes; equal to the exact
    mean up to float32 rounding, which depends on the arrival order). None (the default): streamed
    for models of 256 MiB and more."""

    def __init__(self, streamed: bool | None = None) -> None:
        # One aggregator for the job: its buffers are reused round after round.
        self._aggregate = mean_aggregator(streamed)

    def aggregator(self, round_num: int) -> Aggregator:
        return self._aggregate


__all__ = ["FOLD_CHUNK", "STREAMED_FROM_BYTES", "FedAvg", "StreamedMean", "WeightedMean", "mean_aggregator"]
