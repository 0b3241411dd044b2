"""The tensor codec: exact round trips, no pickle, clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flkit.errors import ValidationError
from flkit.wire.codec import (
    decode_params,
    encode_params,
    meta_to_json,
    metrics_to_json,
)


def test_round_trip_keeps_dtype_shape_and_bits():
    params = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5, dtype=torch.float16),
        "b": torch.randn(2, 2, dtype=torch.bfloat16),
        "n": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "np": np.arange(6, dtype=np.float64).reshape(2, 3),
        "t": torch.randn(4, 3).t(),  # non-contiguous
    }
    out = decode_params(encode_params(params))
    assert set(out) == set(params)
    for name, value in params.items():
        expected = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
        assert out[name].dtype == expected.dtype
        assert torch.equal(out[name], expected), name


def test_tied_weights_are_sent_once_each():
    shared = torch.randn(4, 4)
    out = decode_params(encode_params({"a": shared, "b": shared}))
    assert torch.equal(out["a"], shared) and torch.equal(out["b"], shared)


@pytest.mark.parametrize("bad", [{"x": 1.5}, {"x": "text"}, {"x": torch.randn(3, 3).to_sparse()}])
def test_non_tensor_params_are_refused_by_name(bad):
    with pytest.raises(ValidationError, match="'x'"):
        encode_params(bad)


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x00" * 7, b"\xff" * 64, (100).to_bytes(8, "little") + b'{"x": {"dtype": "F32", "shape": [4]'],
)
def test_malformed_payload_is_a_validation_error(blob):
    with pytest.raises(ValidationError, match="malformed params payload"):
        decode_params(blob)


def test_header_that_lies_about_size_is_refused():
    good = bytearray(encode_params({"x": torch.zeros(4)}))
    with pytest.raises(ValidationError):
        decode_params(bytes(good[:-4]))  # data shorter than the header claims


def test_metrics_must_be_finite_numbers():
    assert metrics_to_json({"acc": torch.tensor(0.5), "n": np.int64(3)}) == '{"acc": 0.5, "n": 3}'
    with pytest.raises(ValidationError, match="'acc'.*finite"):
        metrics_to_json({"acc": float("nan")})
    with pytest.raises(ValidationError, match="'acc'"):
        metrics_to_json({"acc": "high"})


def test_meta_must_be_json():
    assert meta_to_json({"NUM_STEPS_CURRENT_ROUND": torch.tensor(10)}) == '{"NUM_STEPS_CURRENT_ROUND": 10}'
    with pytest.raises(ValidationError, match="JSON"):
        meta_to_json({"obj": object()})
