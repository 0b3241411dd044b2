"""A model's tensors in one anonymous shared-memory file, read copy-on-write by in-process sites.

Why: an in-process site must get params it may change without changing the global model or
another site's params. A copy per site per round does that at the price of a model-sized copy
(and a model's worth of memory) per site. When the global model lives in a memfd, each site
instead maps the file privately (``MAP_PRIVATE``): it reads the server's pages directly, and only
a page it writes to is copied, for that site alone. A site that loads the params into its own
model, as training scripts do, never copies anything; memory per site drops by a model.

A set may be written again only when no site mapping of it is left (Linux shows a private
mapping later changes of the file on pages the site has not written) and nobody holds its
tensors: ``mapped_by_sites()`` tells the first (weak references to the sites' mappings), the
buffer pool of flkit.tensor_reuse checks the second.

Where ``os.memfd_create`` is missing (not Linux) or fails, callers use ordinary memory.

Whoever hands out a set's tensors keeps its SharedModel alive (a BufferPool does): a SharedModel
nobody references leaves the registry, and tensors of it are then treated as ordinary memory.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Mapping

import torch

Params = dict[str, torch.Tensor]

ALIGN = 4096  # each tensor starts on its own page: a site's write copies only that tensor's pages

_lock = threading.Lock()
_sets: weakref.WeakValueDictionary[int, SharedModel] = weakref.WeakValueDictionary()


def alias(tensor: torch.Tensor, shape: torch.Size | None = None) -> torch.Tensor:
    """A new tensor on ``tensor``'s storage, ``shape``d (contiguous) or as ``tensor`` is. Not a view:
    no ``_base`` keeps another tensor (and another reference to the storage) alive."""
    out = torch.empty(0, dtype=tensor.dtype)
    if shape is None:
        return out.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return out.set_(tensor.untyped_storage(), tensor.storage_offset(), shape, _contiguous_strides(shape))


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for dim in reversed(shape):
        strides.append(step)
        step *= max(dim, 1)
    return tuple(reversed(strides))


def same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Same names, and for each the same shape and dtype."""
    return a.keys() == b.keys() and all(a[k].shape == t.shape and a[k].dtype == t.dtype for k, t in b.items())


def supported() -> bool:
    return hasattr(os, "memfd_create") and hasattr(mmap, "MAP_PRIVATE")


class SharedModel:
    """Tensors shaped like ``like``, backed by one memfd; ``private_view()`` maps it copy-on-write."""

    def __init__(self, like: Mapping[str, torch.Tensor], name: str = "flkit-model") -> None:
        layout: dict[str, tuple[int, torch.dtype, torch.Size]] = {}
        offset = 0
        for key, tensor in like.items():
            offset = -(-offset // ALIGN) * ALIGN
            layout[key] = (offset, tensor.dtype, tensor.shape)
            offset += tensor.numel() * tensor.element_size()
        self.size = max(ALIGN, -(-offset // ALIGN) * ALIGN)
        self._layout = layout
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.size)
            self._mapping = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        weakref.finalize(self, os.close, fd)
        self._readers: list[weakref.ref[mmap.mmap]] = []
        self._readers_lock = threading.Lock()  # sites map from their own threads
        self.tensors = self._tensors(self._mapping)
        with _lock:
            for tensor in self.tensors.values():
                if tensor.numel():
                    _sets[tensor.data_ptr()] = self

    def _tensors(self, mapping: mmap.mmap) -> Params:
        out: Params = {}
        for key, (offset, dtype, shape) in self._layout.items():
            count = 1
            for dim in shape:
                count *= dim
            if count == 0:
                out[key] = torch.empty(shape, dtype=dtype)
            else:
                out[key] = alias(torch.frombuffer(mapping, dtype=dtype, count=count, offset=offset), shape)
        return out

    def fits(self, like: Mapping[str, torch.Tensor]) -> bool:
        return same_layout(self.tensors, like)

    def private_view(self) -> Params:
        """Tensors that read this set's memory and copy a page only when written (for one site)."""
        mapping = mmap.mmap(self._fd, self.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with self._readers_lock:
            self._readers = [ref for ref in self._readers if ref() is not None]
            self._readers.append(weakref.ref(mapping))
        return self._tensors(mapping)

    def mapped_by_sites(self) -> bool:
        """Whether a site still holds a private view (its tensors keep the mapping alive)."""
        with self._readers_lock:
            return any(ref() is not None for ref in self._readers)


def shared_model_of(params: Mapping[str, torch.Tensor]) -> SharedModel | None:
    """The SharedModel whose tensors (or aliases of them) ``params`` are, if any."""
    first = next((t for t in params.values() if t.numel()), None)
    if first is None:
        return None
    with _lock:
        found = _sets.get(first.data_ptr())
    if found is None or not found.fits(params):
        return None
    if any(t.numel() and t.data_ptr() != found.tensors[k].data_ptr() for k, t in params.items()):
        return None
    return found


__all__ = ["SharedModel", "alias", "same_layout", "shared_model_of", "supported"]
