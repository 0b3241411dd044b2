"""The wire's safetensors stream: byte-exact safetensors both ways, one copy, bad input refused."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flkit.errors import ValidationError
from flkit.wire.tensor_stream import Encoded, parse

MIXED = {
    "w": torch.randn(3, 5),
    "steps": torch.arange(7, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "half": torch.randn(3).bfloat16(),
    "empty": torch.empty(0, 4),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
    "byte": torch.tensor([1, 2, 3], dtype=torch.uint8),
}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("chunk", [1, 7, 8, 64, 1 << 20])
def test_chunks_are_safetensors_and_parse_back(chunk: int) -> None:
    encoded = Encoded(MIXED, {"round": "3"})
    chunks = list(encoded.chunks(chunk))
    assert all(len(c) == chunk for c in chunks[:-1]) and 0 < len(chunks[-1]) <= chunk
    blob = b"".join(chunks)
    assert len(blob) == encoded.size
    _same(safetensors.torch.load(blob), MIXED)  # the library reads what we stream
    _same(parse(bytearray(blob)), MIXED)


def test_parse_reads_what_safetensors_writes_and_makes_views_of_the_buffer() -> None:
    buffer = bytearray(safetensors.torch.save(MIXED))
    params = parse(buffer)
    _same(params, MIXED)
    params["w"].zero_()  # a view: the buffer changed, nothing was copied
    _same(safetensors.torch.load(bytes(buffer)), dict(MIXED, w=torch.zeros(3, 5)))


def _blob(header: object, data: bytes = b"") -> bytearray:
    text = json.dumps(header).encode()
    return bytearray(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("blob, why", [
    (bytearray(b"\x01\x02"), "shorter than"),
    (bytearray(struct.pack("<Q", 1 << 40)), "header length"),
    (_blob(["not", "an", "object"]), "not a JSON object"),
    (_blob({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "cover|does not fill|bad shape or offsets"),
    (_blob({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "does not fill"),
    (_blob({"x": {"dtype": "PICKLE", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
    (_blob({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "bad shape"),
    (_blob({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16), "starts at"),
    (_blob({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}}, b"\0" * 8), "entry"),
    (_blob({"x": {"dtype": "F32", "shape": [2**40] * 3, "data_offsets": [0, 8]}}, b"\0" * 8), "bad shape"),
    (_blob({"x": {"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}}, b"\0" * 4), "bad shape"),
    (_blob({"b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
            "x": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6), "multiple of its element"),
    (bytearray(struct.pack("<Q", 40_000) + b"[" * 20_000 + b"]" * 20_000), "malformed params payload"),
])
def test_malformed_payloads_are_refused(blob: bytearray, why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        parse(blob)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        parse(bytearray(data))
    except ValidationError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.integers(0, 199))
def test_a_damaged_valid_payload_is_refused_or_parsed_never_crashes(noise: bytes, at: int) -> None:
    blob = bytearray(b"".join(Encoded({"w": torch.arange(6, dtype=torch.float32)}).chunks(64)))
    blob[at % len(blob):at % len(blob) + len(noise)] = noise
    try:
        parse(blob)
    except ValidationError:
        pass
