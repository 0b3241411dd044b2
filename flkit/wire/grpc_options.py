"""Channel and server options shared by both ends of the gRPC connection."""

from __future__ import annotations

# Params travel in chunks of this size: large enough that per-message costs vanish beside the
# copy, small enough that no message grows with the model.
CHUNK_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_BYTES = 2 * CHUNK_BYTES + 64 * 1024

OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

PROTOCOL_VERSION = 3
SERVICE_NAME = "flkit.v1.FLKit"  # package and service of proto/flkit.proto
# Trailing-metadata key of a refusal's ErrorCode (flkit.messages), so a site acts on the code.
ERROR_KEY = "flkit-error"
