"""Exceptions that name what went wrong, so users never have to read a gRPC status dump."""

from __future__ import annotations


class FLKitError(RuntimeError):
    """Base class of every error flkit raises on purpose."""


class ConfigError(FLKitError):
    """The job or the environment is set up wrongly (missing setting, bad value)."""


class CommunicationError(FLKitError):
    """The server could not be reached, or stopped answering, within the allowed time."""


class ValidationError(FLKitError):
    """A model or result does not fit the job (wrong keys, shapes, dtypes, non-finite values)."""


class ResultRejectedError(FLKitError):
    """The server refused a result; the message says which site and tensor, and why."""


class JobFailedError(FLKitError):
    """The federated job ended in failure (a site crashed, too few sites answered...)."""
