"""Payload messages framed by hand are exactly protobuf's encoding of the same chunk messages, and
malformed frames are refused with a clear error."""

from __future__ import annotations

import pytest

from flkit.errors import ValidationError
from flkit.wire import flkit_pb2 as pb
from flkit.wire.frames import is_payload, payload_of, payload_prefix


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 4 << 20, (4 << 20) + 17])
def test_a_hand_framed_payload_is_protobufs_own_encoding(size):
    data = bytes(i % 251 for i in range(size))
    frame = payload_prefix(size) + data
    assert frame == pb.TaskChunk(payload=data).SerializeToString()
    assert frame == pb.ResultChunk(payload=data).SerializeToString()
    assert pb.ResultChunk.FromString(frame).payload == data
    assert is_payload(frame) and bytes(payload_of(frame)) == data


def test_a_header_message_is_not_a_payload():
    header = pb.TaskChunk(header=pb.TaskHeader(task_id="t")).SerializeToString()
    assert not is_payload(header)
    with pytest.raises(ValidationError, match="expected a payload"):
        payload_of(header)


@pytest.mark.parametrize("frame", [
    payload_prefix(10) + bytes(9),             # shorter than it says
    payload_prefix(10) + bytes(11),            # longer than it says
    b"\x12" + b"\xff" * 11,                    # a length that never ends
    b"\x12",                                   # no length at all
])
def test_malformed_frames_are_refused(frame):
    with pytest.raises(ValidationError):
        payload_of(frame)
