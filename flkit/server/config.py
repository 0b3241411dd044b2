"""Workflow settings the server needs; loaded from a job folder's JSON config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from flkit.errors import ConfigError
from flkit.model import ParamsType


@dataclass
class WorkflowConfig:
    """FedAvg round loop settings (NVFlare's names where they exist).

    Timeouts are in seconds; ``None`` means no limit (a lapsed heartbeat still ends a dead site).
    """

    num_rounds: int = 2
    min_clients: int = 1
    key_metric: str = "accuracy"
    negate_key_metric: bool = False
    params_transfer_type: str = "FULL"
    # After the last round, send the final global model to the sites as a validate
    # task so it is scored (and can win best-model selection) like every other.
    final_validation: bool = True
    # How long to wait for the expected sites to join before starting with min_clients.
    join_timeout_s: float = 300.0
    # Longest a round may take; sites that have not answered by then are dropped.
    round_timeout_s: float | None = None
    heartbeat_interval_s: float = 5.0
    # A site not heard from for this long is considered dead.
    heartbeat_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.min_clients < 1:
            raise ConfigError(f"min_clients must be >= 1, got {self.min_clients}")
        try:
            self.params_transfer_type = ParamsType(self.params_transfer_type).value
        except ValueError:
            raise ConfigError(
                f"params_transfer_type must be FULL or DIFF, got {self.params_transfer_type!r}"
            ) from None
        if not self.key_metric:
            raise ConfigError("key_metric must be a non-empty metric name")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError("heartbeat_timeout_s must be larger than heartbeat_interval_s")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkflowConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown workflow settings: {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)
