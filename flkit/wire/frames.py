"""Payload messages of the task and result streams, framed by hand: the same bytes on the wire.

Why: ``TaskChunk`` and ``ResultChunk`` carry params as a ``bytes payload = 2`` field of 4 MiB.
Through the protobuf runtime every such message is copied three more times (into the message,
into its serialised form, out of the parsed message): about 90 ms per 100 MB here, more than the
bare gRPC transfer itself, and serialising holds the GIL the server's other streams need. A
payload message is only a field key, a length and the bytes, so both ends write and read that
framing themselves, in the one copy the chunk costs anyway; header messages still go through
protobuf. The bytes on the wire are exactly the protobuf encoding of the same messages, so any
protobuf client of ``proto/flkit.proto`` reads and writes these streams unchanged.
"""

from __future__ import annotations

import numpy as np

from flkit.errors import ValidationError

PAYLOAD_FIELD = 2  # ``payload`` in TaskChunk and ResultChunk (proto/flkit.proto)
_PAYLOAD_KEY = (PAYLOAD_FIELD << 3) | 2  # length-delimited
_MAX_VARINT_BYTES = 10


def payload_prefix(size: int) -> bytes:
    """The protobuf key and length that precede ``size`` payload bytes in a chunk message."""
    if size < 0:  # (a negative size would never end the varint)
        raise ValueError(f"a payload has a size >= 0, got {size}")
    out = bytearray([_PAYLOAD_KEY])
    while True:
        byte = size & 0x7F
        size >>= 7
        if size:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def copy_into(buffer: np.ndarray, offset: int, payload: memoryview) -> None:
    """``buffer[offset:offset + len(payload)] = payload`` without holding the GIL during the copy
    (numpy releases it; a memoryview assignment does not), so other streams of the process move on."""
    np.copyto(buffer[offset:offset + len(payload)], np.frombuffer(payload, dtype=np.uint8))


def is_payload(frame: bytes) -> bool:
    return bool(frame) and frame[0] == _PAYLOAD_KEY


def payload_of(frame: bytes) -> memoryview:
    """The payload bytes of a serialised chunk message (no copy); ValidationError for anything else."""
    if not is_payload(frame):
        raise ValidationError("expected a payload message in the params stream")
    size = shift = 0
    pos = 1
    while True:
        if pos >= len(frame) or pos > _MAX_VARINT_BYTES:
            raise ValidationError("payload message with a malformed length")
        byte = frame[pos]
        pos += 1
        size |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if size != len(frame) - pos:
        raise ValidationError(f"payload message says {size} bytes but carries {len(frame) - pos}")
    return memoryview(frame)[pos:]


__all__ = ["PAYLOAD_FIELD", "copy_into", "is_payload", "payload_of", "payload_prefix"]
