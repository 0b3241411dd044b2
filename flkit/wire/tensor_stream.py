"""Safetensors bytes streamed straight from tensors' memory, and parsed without copying.

Why not ``safetensors.torch.save``/``load`` on the wire: ``save`` builds the whole blob and then
copies it into a ``bytes``, and ``load`` copies every tensor out of the blob, so a model crosses
memory three times before it is even sent. Here the sender yields a header and then slices of
the tensors' own memory (one copy, into each message), and the receiver writes the chunks into
one preallocated buffer and makes tensors that are views of it (one copy in all). The format is
exactly safetensors (``safetensors.torch.load`` reads what ``iter_chunks`` produces, and
``parse`` reads what ``safetensors.torch.save`` produces); the checks on arrival are the same:
a bounded JSON header, known dtypes, shapes that match the byte ranges, and ranges that tile
the data exactly.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import torch

from flkit.errors import ValidationError
from flkit.wire.codec import Params, quote, to_cpu_params

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # as safetensors
MAX_DIMS = 64


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (the tensor is contiguous and on the CPU)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    # ``.data``: the array's own memoryview (numpy types ``memoryview(array)`` only on Python 3.12+).
    return tensor.reshape(-1).view(torch.uint8).numpy().data.cast("B")


class Layout:
    """Where each tensor of a model goes in a safetensors file: the header bytes (with their
    8-byte length), and each tensor's byte offset from the start of the file.

    Tensors are ordered by element size (largest first), then name, as safetensors does, so
    every tensor starts at an offset aligned to its element size. ``data_align``: the header is
    padded with spaces (which JSON and safetensors allow) so the data starts at a multiple of it;
    a page for a file that is mapped, 8 (as safetensors) otherwise.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 data_align: int = 8) -> None:
        self.order = sorted(params, key=lambda name: (-params[name].element_size(), name))
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        relative: dict[str, int] = {}
        for name in self.order:
            tensor = params[name]
            if tensor.dtype not in NAMES:
                raise ValidationError(f"param '{name}' has dtype {tensor.dtype}, which cannot be sent")
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            relative[name] = offset
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-(8 + len(text)) % data_align)
        self.header = struct.pack("<Q", len(text)) + text
        self.offsets = {name: len(self.header) + at for name, at in relative.items()}
        self.size = len(self.header) + offset


class Encoded:
    """A model laid out as safetensors (``Layout``): the header bytes, then each tensor's bytes in order."""

    def __init__(self, params: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        cpu = to_cpu_params(params)
        layout = Layout(cpu, metadata)
        self._keep = [cpu[name] for name in layout.order]
        self.views: list[memoryview] = [_byte_view(tensor) for tensor in self._keep]
        self.header = layout.header
        self.size = layout.size

    def chunks(self, chunk_bytes: int, prefix: Callable[[int], bytes] | None = None) -> Iterator[bytes]:
        """The blob in pieces of exactly ``chunk_bytes`` (the last may be shorter); each piece is
        the one copy this path makes. ``prefix(size)``, if given, is put before each piece in the
        same copy (a message's framing, flkit.wire.frames)."""
        pending: list[memoryview | bytes] = []
        filled = 0
        for view in [memoryview(self.header), *self.views]:
            pos = 0
            while pos < len(view):
                take = min(chunk_bytes - filled, len(view) - pos)
                pending.append(view[pos:pos + take])
                filled += take
                pos += take
                if filled == chunk_bytes:
                    yield b"".join([prefix(filled), *pending] if prefix else pending)
                    pending, filled = [], 0
        if filled:
            yield b"".join([prefix(filled), *pending] if prefix else pending)


Span = tuple[int, int, str, torch.dtype, list[int]]  # (begin, end) in the data, name, dtype, shape


def read_spans(header_json: bytes, data_len: int) -> list[Span]:
    """The tensors a safetensors header describes, ordered by where their bytes lie in the data
    (the ``data_len`` bytes after the header), checked to tile the data exactly. Raises
    ValidationError (a message quoting at most a short prefix of the sender's names)."""
    return _checked(lambda: _read_spans(header_json, data_len))


_T = TypeVar("_T")


def _checked(read: Callable[[], _T]) -> _T:
    """``read()``, with whatever hostile bytes make the parsing code raise turned into a ValidationError."""
    try:
        return read()
    except ValidationError:
        raise
    except (RecursionError, TypeError, OverflowError, ValueError, RuntimeError) as exc:
        raise ValidationError(f"malformed params payload: {type(exc).__name__}: {exc}") from None


def _read_spans(header_json: bytes, data_len: int) -> list[Span]:
    try:
        header = json.loads(header_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"malformed params payload: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValidationError("malformed params payload: header is not a JSON object")
    header.pop("__metadata__", None)
    spans: list[Span] = []
    for name, entry in header.items():
        # Names and dtypes are the other side's text: messages quote a short prefix of them.
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValidationError(f"malformed params payload: entry of tensor {quote(name)} is not "
                                  "dtype/shape/data_offsets")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        shape, offsets = entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise ValidationError(f"malformed params payload: tensor {quote(name)} has unknown dtype "
                                  f"{quote(entry['dtype'], 20)}")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d <= data_len for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o <= data_len for o in offsets)):
            raise ValidationError(f"malformed params payload: tensor {quote(name)} has a bad shape or offsets")
        begin, end = offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        if begin % itemsize:
            raise ValidationError(f"malformed params payload: tensor {quote(name)} starts at byte {begin}, not a "
                                  f"multiple of its element size {itemsize}")
        if end < begin or end - begin != _numel(shape, data_len) * itemsize:
            raise ValidationError(f"malformed params payload: tensor {quote(name)} of shape {shape} does not fill "
                                  f"bytes {begin}..{end}")
        spans.append((begin, end, name, dtype, shape))
    spans.sort()
    at = 0
    for begin, end, name, _, _ in spans:
        if begin != at:
            raise ValidationError(f"malformed params payload: tensor {quote(name)} starts at {begin}, expected {at}")
        at = end
    if at != data_len:
        raise ValidationError(f"malformed params payload: tensors cover {at} of {data_len} data bytes")
    return spans


def _numel(shape: list[int], limit: int) -> int:
    """The product of ``shape``, or limit + 1 as soon as it exceeds ``limit`` (no huge integers)."""
    if 0 in shape:
        return 0
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            return limit + 1
    return count


def parse(buffer: bytearray | memoryview | mmap.mmap, expected_size: int | None = None) -> Params:
    """Tensors that are views of ``buffer`` (a writable bytearray: the caller gives up its use).

    Raises ValidationError for anything that is not well-formed safetensors; never executes or
    unpickles anything, and costs time in proportion to the header (no huge shapes, no deep JSON).
    """
    return _checked(lambda: _parse(buffer, expected_size))


def _parse(buffer: bytearray | memoryview | mmap.mmap, expected_size: int | None) -> Params:
    view = memoryview(buffer)
    total = len(view)
    if expected_size is not None and total != expected_size:
        raise ValidationError(f"params payload has {total} bytes, expected {expected_size}")
    if total < 8:
        raise ValidationError("malformed params payload: shorter than its 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > total:
        raise ValidationError(f"malformed params payload: header length {header_len} does not fit "
                              f"in {total} bytes")
    spans = read_spans(bytes(view[8:8 + header_len]), total - 8 - header_len)
    data_start = 8 + header_len
    out: Params = {}
    for begin, end, name, dtype, shape in spans:
        if end == begin:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        count = (end - begin) // torch.empty((), dtype=dtype).element_size()
        out[name] = torch.frombuffer(buffer, dtype=dtype, count=count, offset=data_start + begin).view(shape)
    return out
