"""A model's tensors in one shared-memory file, read copy-on-write by sites.

Why: a site must get params it may change without changing the global model or another site's
params. A copy per site per round does that at the price of a model-sized copy (and a model's
worth of memory) per site. When the global model lives in a shared-memory file, each site instead
maps the file privately (``MAP_PRIVATE``): it reads the server's pages directly, and only a page it
writes to is copied, for that site alone. A site that loads the params into its own model, as
training scripts do, never copies anything; memory per site drops by a model.

The file is a safetensors file (header first, the data page-aligned after it), so the same memory
serves both kinds of site: in-process sites map the file's descriptor (``private_view()``), and
sites in other processes on this host map it by name when it lives in the job's /dev/shm folder
(the shared-memory transport, flkit.server.shm_exchange): the server writes the next global model
straight into the file the sites will read. Without a folder it is an anonymous memfd.

A set may be written again only when nobody reads it any more (Linux shows a private mapping
later changes of the file on pages the site has not written) and nobody holds its tensors:
``mapped_by_sites()`` tells the first (weak references to in-process mappings, and the sessions
of other processes that were given the file and have not said they let it go), the buffer pool
of flkit.tensor_reuse checks the second.

Where ``os.memfd_create`` is missing (not Linux) or fails, callers use ordinary memory.

Whoever hands out a set's tensors keeps its SharedModel alive (a BufferPool does): a SharedModel
nobody references leaves the registry (and removes its file from the folder), and tensors of it
are then treated as ordinary memory.
"""

from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch

from flkit.wire.tensor_stream import Layout

Params = dict[str, torch.Tensor]

ALIGN = 4096  # the data starts on a page of its own, after the header

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


def _discard(fd: int, path: Path | None) -> None:
    os.close(fd)
    if path is not None:
        path.unlink(missing_ok=True)


class SharedModel:
    """Tensors shaped like ``like`` in one safetensors file; ``private_view()`` maps it copy-on-write.

    ``folder``: make the file there (a tmpfs folder such as the job's /dev/shm folder, where other
    processes of this user can open it by ``path``); its memory is reserved up front, so a full
    folder raises OSError here instead of a SIGBUS on a later write. Without a folder: a memfd.
    """

    def __init__(self, like: Mapping[str, torch.Tensor], folder: Path | None = None,
                 name: str = "flkit-model") -> None:
        layout = Layout(like, data_align=ALIGN)
        self.size = layout.size
        self._layout = {key: (layout.offsets[key], t.dtype, t.shape) for key, t in like.items()}
        self.path: Path | None = None
        if folder is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:
            path = folder / f"task-{secrets.token_hex(16)}.safetensors"
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self.path = path
        try:
            if folder is None:
                os.ftruncate(fd, self.size)
            else:
                os.posix_fallocate(fd, 0, self.size)
            self._mapping = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            _discard(fd, self.path)
            raise
        self._mapping[:len(layout.header)] = layout.header
        self._fd = fd
        weakref.finalize(self, _discard, fd, self.path)
        self._readers: list[weakref.ref[mmap.mmap]] = []
        self._holders: set[str] = set()  # other processes' sessions given the file (by path)
        self._readers_lock = threading.Lock()  # sites map and release from their own threads
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

    def hold(self, holder: str) -> None:
        """``holder`` (a site's session in another process) was given the file to map by its path;
        the file is in use until it says it let go (``release``). A holder that never says so (it
        died, or left while still mapping it) keeps the file from being written again for good."""
        with self._readers_lock:
            self._holders.add(holder)

    def release(self, holder: str) -> None:
        with self._readers_lock:
            self._holders.discard(holder)

    def mapped_by_sites(self) -> bool:
        """Whether a site may still read the file: an in-process site's private view is alive (its
        tensors keep the mapping alive), or a site in another process has not released it."""
        with self._readers_lock:
            return bool(self._holders) or any(ref() is not None for ref in self._readers)


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
