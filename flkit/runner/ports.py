"""Ports for launch commands: ``{PORT}`` in a command is each site's own rendezvous port.

Two simulated sites that both run ``torch.distributed.run --master_port=...`` on one
machine must not share a port, so each site gets its own (given, or a free one).
"""

from __future__ import annotations

import socket

PORT_PLACEHOLDER = "{PORT}"


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def fill_port(command: str, port: int) -> str:
    return command.replace(PORT_PLACEHOLDER, str(port))
