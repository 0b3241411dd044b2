"""Picks a site's transport from its settings (``SiteSettings.transport``).

``auto`` (the default): the memory transport when the server lives in this process; else shared
memory when the server offers a /dev/shm folder this site can use (same host, same user), else
gRPC. ``memory``, ``shm`` and ``grpc`` ask for one: ``memory`` is an error when the server is
elsewhere, ``shm`` falls back to gRPC with a warning, ``grpc`` never uses files.
"""

from __future__ import annotations

from pathlib import Path

from flkit.client.settings import SiteSettings
from flkit.errors import ConfigError
from flkit.transport import memory
from flkit.transport.base import Transport

CHOICES = ("auto", "memory", "shm", "grpc")


def make_transport(settings: SiteSettings) -> Transport:
    """The transport this site should use to reach ``settings.server``."""
    choice = (settings.transport or "auto").lower()
    if choice not in CHOICES:
        raise ConfigError(f"site {settings.site_name}: transport {settings.transport!r} is not one of "
                          f"{', '.join(CHOICES)}")
    if choice in ("auto", "memory"):
        service = memory.lookup(settings.server)
        if service is not None:
            return memory.MemoryTransport(service, settings.server)
        if choice == "memory":
            raise ConfigError(f"site {settings.site_name}: transport 'memory' needs the server in this process, "
                              f"but no server of this process listens on {settings.server}")
    kit = None
    if settings.kit:
        from flkit.deploy.kit import load_kit

        kit = load_kit(Path(settings.kit))
        if kit.name != settings.site_name and kit.role != "worker":  # a pool worker's kit serves its sites
            raise ConfigError(f"site {settings.site_name}: the kit at {settings.kit} is {kit.name}'s; a site runs "
                              "with its own kit (its certificate is its identity)")
    if choice == "grpc":
        from flkit.transport.grpc_transport import GrpcTransport

        return GrpcTransport(settings.server, kit)
    from flkit.transport.shm import ShmTransport

    return ShmTransport(settings.server, required=choice == "shm", kit=kit)
