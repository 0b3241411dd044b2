"""Channel and server options shared by both ends of the gRPC connection."""

from __future__ import annotations

from flkit.wire.codec import DEFAULT_CHUNK_BYTES

# Every message is a header or a chunk of at most DEFAULT_CHUNK_BYTES, so a small
# multiple of it is a safe cap whatever the model size.
MAX_MESSAGE_BYTES = 4 * DEFAULT_CHUNK_BYTES + 64 * 1024

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

PROTOCOL_VERSION = 2
# The server holds a GetTask call open at most this long; clients ask again.
MAX_TASK_WAIT_S = 30.0
