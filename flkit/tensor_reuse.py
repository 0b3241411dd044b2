"""Model-sized buffers used again round after round, once nobody else holds them.

Why: a fresh 100 MB tensor costs about five ``copy_`` of it on these machines (the kernel zeroes
every page on first touch, see ../shared/PERF-NOTES.md), and a round of the memory transport
allocates several (each site's copy of the global model, the next global model). Writing into
memory that was already touched costs one ``copy_``.

A buffer may only be overwritten when nothing outside the pool still sees it: a site script that
keeps last round's params, a writer thread still saving last round's global model, a view or a
numpy array of it. So the pool never hands out its own tensor objects: it hands out *aliases*
(new tensors on the same storage, without ``_base``), and a buffer counts as free when its
storage is referenced by the pool's tensor alone. Every alias, view, numpy array or autograd
node of it adds a reference, so a buffer still in use anywhere is never reused; a new one is
allocated instead, and the old one is left to whoever holds it.

A pool made with ``shared=True`` keeps each set in one shared-memory file (flkit.shared_model): a
memfd, or a file in a folder given with ``keep_in`` (the job's /dev/shm folder, so sites in other
processes on this host read it by name), so sites can read it copy-on-write; such a set is also in
use while any site still maps it.

The reference count of a storage is read with ``torch._C._storage_Use_Count``, which torch has
had since 2.0 but does not document. Where it is missing, nothing is ever reused (correct, just
slower); ``tests/test_tensor_reuse.py`` fails then, so a torch upgrade that removes it is noticed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from flkit import shared_model
from flkit.errors import ValidationError
from flkit.shared_model import SharedModel, alias, same_layout

log = logging.getLogger("flkit")

Params = dict[str, torch.Tensor]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def reuse_supported() -> bool:
    """Whether this torch lets the pool see who else holds a buffer (else it never reuses one)."""
    return _use_count is not None


def sole_owner(buffer: torch.Tensor) -> bool:
    """Whether ``buffer``'s storage is referenced by ``buffer`` alone (no alias, view, array or
    storage object of it)."""
    if _use_count is None:
        return False
    storage = buffer.untyped_storage()
    # The storage's C++ count: ``buffer`` and the storage's Python object. Someone holding that
    # Python object (``t.untyped_storage()``, ``t.storage()``) shows in its Python count instead, on
    # torch versions that keep one Python object per storage (older ones make a new one per call,
    # which then counts in the C++ count): here, this function's name and getrefcount's argument
    # are 2, and torch's own reference to a preserved object is the third.
    return int(_use_count(storage._cdata)) == 2 and sys.getrefcount(storage) <= 3


class _Set:
    """One set of buffers: plain tensors, or the tensors of a SharedModel."""

    __slots__ = ("buffers", "shared")

    def __init__(self, buffers: Params, shared: SharedModel | None) -> None:
        self.buffers = buffers
        self.shared = shared

    def fits(self, like: Mapping[str, torch.Tensor]) -> bool:
        return same_layout(self.buffers, like)

    def free(self) -> bool:
        # Holders first: a site maps a set only while it holds its tensors (the task's params), so
        # once nobody holds them no new mapping can appear between the two checks.
        if not all(sole_owner(b) for b in self.buffers.values() if b.numel()):
            return False
        return self.shared is None or not self.shared.mapped_by_sites()


class BufferPool:
    """Up to ``depth`` sets of CPU buffers shaped like a model, handed out as aliases.

    ``take(like)`` returns a set shaped like ``like`` (same keys, shapes, dtypes), contiguous,
    with undefined contents: a free set of the pool if there is one, else a new one, which joins
    the pool in place of a set still in use (the pool then forgets that one; its holders keep it).
    ``shared=True``: new sets live in a shared-memory file each where the system has memfd (else
    plain memory): in the folder given to ``keep_in``, or a memfd.
    Not thread-safe: one owner (a site's transport, the controller) calls it.
    """

    def __init__(self, depth: int = 1, shared: bool = False) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._depth = depth
        self._shared = shared and shared_model.supported()
        self._folder: Path | None = None
        self._sets: list[_Set] = []
        self.reused = 0  # sets handed out again (for tests and benchmarks)
        self.allocated = 0

    def take(self, like: Mapping[str, torch.Tensor]) -> Params:
        for index, entry in enumerate(self._sets):
            if entry.fits(like) and entry.free():
                self._sets.append(self._sets.pop(index))  # most recently used last
                self.reused += 1
                return {name: alias(b) for name, b in entry.buffers.items()}
        entry = self._allocate(like)
        self._sets = [s for s in self._sets if s.fits(like)]
        if len(self._sets) >= self._depth:
            self._sets.pop(0)  # still in use, or shaped for another model: its holders keep it
        self._sets.append(entry)
        self.allocated += 1
        return {name: alias(b) for name, b in entry.buffers.items()}

    def keep_in(self, folder: Path | None) -> None:
        """Make new shared sets as files in ``folder`` (None: memfds); sets made so far stay as they are."""
        self._folder = folder

    def _allocate(self, like: Mapping[str, torch.Tensor]) -> _Set:
        if self._shared and self._folder is not None and any(t.numel() for t in like.values()):
            try:
                model = SharedModel(like, self._folder)
                return _Set(model.tensors, model)
            except (OSError, ValidationError) as exc:  # the folder is full (or gone): a memfd then
                log.warning("cannot keep the model in %s (%s); sites on this host get it written to a file "
                            "each round", self._folder, exc)
                self._folder = None
        if self._shared and any(t.numel() for t in like.values()):
            try:
                model = SharedModel(like)
                return _Set(model.tensors, model)
            except (OSError, ValidationError) as exc:  # no memfd, or a dtype safetensors lacks: plain memory
                log.warning("cannot keep the model in shared memory (%s); sites get copies", exc)
                self._shared = False
        return _Set({name: torch.empty(t.shape, dtype=t.dtype) for name, t in like.items()}, None)

    def clear(self) -> None:
        """Forget every set (holders of aliases keep theirs)."""
        self._sets.clear()


def copy_into_pool(pool: BufferPool, source: Mapping[str, torch.Tensor]) -> Params:
    """A private copy of ``source`` in buffers of ``pool``: one ``copy_`` per tensor, no fresh memory
    when a set is free. CPU tensors only (the transports that use it move models on the CPU)."""
    out = pool.take(source)
    for name, tensor in source.items():
        out[name].copy_(tensor)
    return out


__all__ = ["BufferPool", "copy_into_pool", "reuse_supported", "sole_owner"]
