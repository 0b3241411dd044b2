"""Receive buffers are used again only when nothing parsed from them is alive."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flkit.wire.receive_buffers import ReceiveBuffers
from flkit.wire.tensor_stream import Encoded, parse


def _receive(pool: ReceiveBuffers, params: dict[str, torch.Tensor]) -> tuple[int, dict[str, torch.Tensor]]:
    """As a transport does: fill a buffer, parse it, give it back. The buffer's id and the params."""
    encoded = Encoded(params)
    buffer = pool.take(encoded.size)
    buffer[:] = b"".join(encoded.chunks(1 << 20))
    parsed = parse(buffer)
    pool.give_back(buffer)
    return id(buffer), parsed


@pytest.mark.parametrize("holder", ["tensor", "view", "numpy"])
def test_a_buffer_anything_still_uses_is_not_handed_out_again(holder):
    pool = ReceiveBuffers(keep=2)
    first, params = _receive(pool, {"w": torch.arange(1000, dtype=torch.float32)})
    w = params.pop("w")
    kept = w if holder == "tensor" else w[10:20] if holder == "view" else w.numpy()
    del params, w
    second, _ = _receive(pool, {"w": torch.full((1000,), 7.0)})
    assert second != first
    expected = torch.arange(1000, dtype=torch.float32)
    got = torch.as_tensor(np.asarray(kept))
    assert torch.equal(got, expected if holder != "view" else expected[10:20])


def test_a_free_buffer_is_handed_out_again():
    pool = ReceiveBuffers(keep=1)
    first, params = _receive(pool, {"w": torch.arange(1000, dtype=torch.float32)})
    del params
    second, again = _receive(pool, {"w": torch.full((1000,), 7.0)})
    assert second == first and torch.equal(again["w"], torch.full((1000,), 7.0))
    assert len(pool.take(12)) == 12  # another size: a new buffer
