"""How a site reaches its job's server: one ``Transport`` protocol, one factory, several implementations."""

from flkit.transport.base import Transport
from flkit.transport.factory import make_transport

__all__ = ["Transport", "make_transport"]
