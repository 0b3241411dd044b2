"""Exceptions that name what went wrong, so users never have to read a gRPC status dump."""

from __future__ import annotations

from typing import Any


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


class CheckFailedError(JobFailedError):
    """A pre-flight check (``simulator_run(dry_run=True)``) found errors; ``report`` holds the
    findings of every site (``flkit.sim.check.CheckReport``), and the message lists each error."""

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report
