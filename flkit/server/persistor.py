"""Saving global models and round state atomically, so a crash never leaves a torn file."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import safetensors
import safetensors.torch

from flkit.atomic_file import atomic_write_file
from flkit.errors import ValidationError
from flkit.server.direct_write import DirectWriter, DirectWriteUnsupported
from flkit.wire.codec import Params, to_cpu_params

log = logging.getLogger("flkit.server")

GLOBAL_MODEL_FILE = "FL_global_model.safetensors"
BEST_MODEL_FILE = "best_FL_global_model.safetensors"
STATE_FILE = "round_state.json"
# The tensor part of the strategy's state (server momentum, Adam's moments, SCAFFOLD's control
# variate), written with the global model it belongs to, as one round.
STRATEGY_FILE = "strategy_state.safetensors"
# The run's history for people and tools (flkit report): per round, metrics, participation, weights, timings.
METRICS_FILE = "metrics.json"
# How much lower the writer thread's CPU priority is than the round loop's (nice increment).
WRITER_NICE = 10


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through ``write(file object)``, replacing ``path`` atomically and fsync'd."""

    def to_file(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            write(fh)

    atomic_write_file(path, to_file)


def save_params(path: Path, params: Params, metadata: dict[str, Any] | None = None,
                direct: DirectWriter | None = None, durable: bool = True) -> None:
    """Write params as safetensors (string metadata only), replacing ``path`` atomically and
    fsync'd. safetensors writes straight from the tensors' memory: no serialised copy. With a
    ``direct`` writer the file bypasses the page cache (O_DIRECT: about half the CPU) where the
    file system allows it, and is written the usual way where it does not. ``durable=False``
    skips the fsync: readers still see the old file or the new one, but after a power loss the
    file may be empty, so only for files made again from their source, such as an exported job's
    initial model."""

    def write(tmp: str) -> None:
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        if direct is not None and direct.usable:
            try:
                direct.write(tmp, params, meta or None)
                return
            except DirectWriteUnsupported as exc:
                log.info("writing %s without O_DIRECT from now on: %s", path.parent, exc)
                direct.usable = False
                os.truncate(tmp, 0)
            except ValidationError:  # a dtype the stream layout does not name: safetensors may
                os.truncate(tmp, 0)
        try:
            safetensors.torch.save_file(to_cpu_params(params), tmp, metadata=meta or None)
        except safetensors.SafetensorError as exc:  # a full disk: an OS error, as for any other file
            raise OSError(f"cannot write {path}: {exc}") from exc

    atomic_write_file(Path(path), write, durable)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, replacing ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    _atomic_write(Path(path), lambda fh: fh.write(text))


def load_params(path: Path) -> Params:
    return safetensors.torch.load_file(str(path))


def _lower_priority() -> None:
    """Let the round's own work go first: saving is background work (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: save at normal priority
        pass


@dataclass
class _Pending:
    """What the writer has still to write; a newer save replaces an older one of the same kind."""

    global_params: Params | None = None
    global_round: int | None = None
    strategy_tensors: Params | None = None  # written with global_params, under the same round
    best: tuple[Params, dict[str, Any]] | None = None
    state: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None

    def empty(self) -> bool:
        return self.global_params is None and self.best is None and self.state is None and self.metrics is None \
            and self.strategy_tensors is None


class Persistor:
    """Owns the server's output folder: the global model, the best model and the round state.

    Why a writer thread: writing and fsyncing a large model takes longer than a fast round, so
    the round loop hands models over and goes on. Writes stay atomic and fsync'd. When a newer
    global model is handed over while an older one still waits, the newer one replaces it
    (coalescing). ``round_state.json`` is written after the models it describes, and names the
    round whose global model is on disk (``global_model_round``), so a restarted server resumes
    from a consistent round. ``flush()`` waits until everything handed over is on disk.

    The params handed over must not be changed afterwards (the Controller makes a new global
    model each round and never writes into an old one).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._pending = _Pending()
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.global_model_round: int | None = None  # the round of the global model on disk
        self.saved_rounds = 0  # global models written
        self.handed_rounds = 0  # global models handed over
        self._direct = DirectWriter()  # the writer thread's

    @property
    def global_model_path(self) -> Path:
        return self.directory / GLOBAL_MODEL_FILE

    @property
    def best_model_path(self) -> Path:
        return self.directory / BEST_MODEL_FILE

    @property
    def strategy_path(self) -> Path:
        return self.directory / STRATEGY_FILE

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    # -- handing over ---------------------------------------------------------

    def save_global(self, params: Params, round_num: int, state: dict[str, Any] | None = None,
                    metrics: dict[str, Any] | None = None, strategy_tensors: Params | None = None) -> None:
        """Queue the global model made in ``round_num`` (replacing one not written yet), with the
        round state that describes it: both are handed over at once, so the writer never takes a
        model without its state (a resume reads the two as one round). ``metrics``: the run's
        history for ``metrics.json``, written after the state. ``strategy_tensors``: the tensor part
        of the strategy's state after this round (not changed until ``flush`` returns)."""
        with self._cond:
            self._check_locked()
            self._pending.global_params, self._pending.global_round = params, round_num
            self._pending.strategy_tensors = strategy_tensors or None
            if state is not None:
                self._pending.state = dict(state)
            if metrics is not None:
                self._pending.metrics = metrics
            self.handed_rounds += 1
            self._wake_locked()

    def save_best(self, params: Params, round_num: int, key_metric: str, score: float) -> None:
        """Queue the best model so far (the global model that scored best in ``round_num``)."""
        with self._cond:
            self._check_locked()
            self._pending.best = (params, {"round": round_num, "key_metric": key_metric, "score": repr(score)})
            self._wake_locked()

    def save_state(self, state: dict[str, Any], metrics: dict[str, Any] | None = None) -> None:
        """Queue the round state (and the run's history for ``metrics.json``); they are written
        after the models handed over before them."""
        with self._cond:
            self._check_locked()
            self._pending.state = dict(state)
            if metrics is not None:
                self._pending.metrics = metrics
            self._wake_locked()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything handed over is on disk; re-raises the writer's error."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._pending.empty() or self._busy:
                if self._error is not None:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"saving the job's models in {self.directory} took more than {timeout:g} s")
                self._cond.wait(left)
            self._check_locked()

    def close(self, timeout: float | None = None) -> None:
        """Write what is pending and stop the writer thread."""
        try:
            self.flush(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _check_locked(self) -> None:
        if self._closed:
            raise OSError(f"the persistor of {self.directory} is closed")
        if self._error is not None:
            raise OSError(f"the server could not save to {self.directory}: {self._error}") from self._error

    def _wake_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write_loop, name="flkit-persistor", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    # -- the writer thread ----------------------------------------------------

    def _write_loop(self) -> None:
        _lower_priority()
        while True:
            with self._cond:
                while self._pending.empty() and not self._closed:
                    self._cond.wait()
                if self._pending.empty():
                    self._direct.close()
                    return
                work, self._pending = self._pending, _Pending()
                self._busy = True
            try:
                self._write(work)
            except BaseException as exc:  # a full disk: the round loop learns it at its next save
                log.error("cannot save to %s: %s", self.directory, exc)
                with self._cond:  # without its traceback, whose frames hold the models
                    self._error = exc.with_traceback(None)
            finally:
                del work  # the models written: their buffers may be reused while this thread waits
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, work: _Pending) -> None:
        """Models first, under staged names; then the state that describes them; then the models
        take their names. A crash at any point leaves a set a restart can read as one round: before
        the state, the old names still hold the old round; after it, ``load_saved_run`` finds the
        staged files the state names."""
        # Each model is let go of as soon as it is written (``work`` and ``params`` would otherwise
        # hold it through the next write), so its buffers can serve the round after next.
        staged: list[tuple[Path, Path]] = []
        if work.best is not None:
            params, meta = work.best
            work.best = None
            save_params(staged_path(self.best_model_path), params, meta, self._direct)
            staged.append((staged_path(self.best_model_path), self.best_model_path))
            del params
        if work.strategy_tensors is not None:
            tensors, work.strategy_tensors = work.strategy_tensors, None
            save_params(staged_path(self.strategy_path), tensors, {"round": work.global_round}, self._direct)
            staged.append((staged_path(self.strategy_path), self.strategy_path))
            del tensors
        if work.global_params is not None:
            params, work.global_params = work.global_params, None
            save_params(staged_path(self.global_model_path), params, {"round": work.global_round}, self._direct)
            staged.append((staged_path(self.global_model_path), self.global_model_path))
            del params
            with self._cond:
                self.global_model_round = work.global_round
                self.saved_rounds += 1
        if work.state is not None:
            with self._cond:
                state = dict(work.state, global_model_round=self.global_model_round,
                             saved_rounds=self.saved_rounds, handed_rounds=self.handed_rounds)
            write_json(self.state_path, state)
        for source, target in staged:
            os.replace(source, target)
        if work.metrics is not None:
            write_json(self.directory / METRICS_FILE, work.metrics)

    def server_models(self, include_best: bool) -> list[tuple[str, Path]]:
        """The server's models for cross-site evaluation, named ``SRV_<file name>`` as NVFlare does:
        the final global model, then the best one (when this run selected one)."""
        paths = [self.global_model_path] + ([self.best_model_path] if include_best else [])
        return [(f"SRV_{path.name}", path) for path in paths]


def staged_path(path: Path) -> Path:
    """Where a model waits, written and fsync'd, until the round state naming it is on disk."""
    return path.with_name(f".{path.name}.staged")


@dataclass
class SavedRun:
    """What a restarted server takes back from its output folder (``flkit server --resume``)."""

    state: dict[str, Any]
    global_params: Params
    round: int  # the round whose global model this is (the last one completed)
    strategy_tensors: Params = field(default_factory=dict)  # the strategy's tensor state after that round


def load_saved_run(directory: Path) -> SavedRun | None:
    """The last completed round in ``directory``, checked for consistency; None when no round was
    completed there. The global model file and ``round_state.json`` describe one round (see
    ``Persistor._write``): the model's own metadata must name the round the state says is on disk."""
    directory = Path(directory)
    state_path, model_path = directory / STATE_FILE, directory / GLOBAL_MODEL_FILE
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationError(f"cannot resume: {state_path} is unreadable ({exc})") from None
    if not isinstance(state, dict):
        raise ValidationError(f"cannot resume: {state_path} is not a JSON object")
    saved_round = state.get("global_model_round")
    if saved_round is None:
        return None  # the job ended before its first round: nothing to go on from
    if not isinstance(saved_round, int) or isinstance(saved_round, bool):
        raise ValidationError(f"cannot resume: {state_path} names no valid global_model_round ({saved_round!r})")
    _finish_staged(directory, saved_round)
    meta, params = _read_model(model_path)
    if meta.get("round") != str(saved_round):
        raise ValidationError(f"cannot resume: {model_path} is the model of round {meta.get('round')!r}, but "
                              f"{state_path} describes round {saved_round}")
    strategy_tensors: Params = {}
    if (directory / STRATEGY_FILE).exists():
        strategy_meta, strategy_tensors = _read_model(directory / STRATEGY_FILE)
        if strategy_meta.get("round") != str(saved_round):
            raise ValidationError(f"cannot resume: {directory / STRATEGY_FILE} is the strategy state of round "
                                  f"{strategy_meta.get('round')!r}, but {state_path} describes round {saved_round}")
    return SavedRun(state=state, global_params=params, round=saved_round, strategy_tensors=strategy_tensors)


def _read_model(path: Path) -> tuple[dict[str, str], Params]:
    try:
        with safetensors.safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
            params = {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 (safe_open has no iteration)
    except (OSError, safetensors.SafetensorError) as exc:
        raise ValidationError(f"cannot resume: the model {path} is unreadable ({exc})") from None
    return meta, params


def _finish_staged(directory: Path, saved_round: int) -> None:
    """A crash after the round state was written but before its models took their names: give
    them their names now. Staged models of a round the state does not describe (a crash before
    the state was written) are dropped; that round runs again."""
    global_staged = staged_path(directory / GLOBAL_MODEL_FILE)
    described = False
    if global_staged.exists():
        try:  # its metadata only: the tensors are read once, from its final name
            with safetensors.safe_open(str(global_staged), "pt") as fh:
                described = (fh.metadata() or {}).get("round") == str(saved_round)
        except (OSError, safetensors.SafetensorError):
            described = False  # torn: the state cannot have been written after it
    for name in (BEST_MODEL_FILE, STRATEGY_FILE, GLOBAL_MODEL_FILE):
        staged = staged_path(directory / name)
        if not staged.exists():
            continue
        if described:
            os.replace(staged, directory / name)
        else:
            staged.unlink()
