"""FLModel and ParamsType: the plain data that scripts exchange with the server.

The constructor and its checks follow NVFlare's ``FLModel`` so a script written
for ``nvflare.client`` constructs models the same way here. No I/O lives here.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class ParamsType(str, Enum):
    """What ``FLModel.params`` holds: the whole model, or the change to it."""

    FULL = "FULL"
    DIFF = "DIFF"


class MetaKey:
    """Meta keys understood by flkit (the same strings as NVFlare's ``FLMetaKey``)."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"
    INITIAL_METRICS = "initial_metrics"


# NVFlare spells the class FLMetaKey; scripts import it under that name.
FLMetaKey = MetaKey


class AlgorithmConstants:
    """Meta keys of the algorithms whose client side flkit ships (NVFlare's ``AlgorithmConstants``,
    the same strings): SCAFFOLD's control variates and FedProx's coefficient."""

    SCAFFOLD_CTRL_DIFF = "scaffold_c_diff"  # a site's change of its control variate (tensors)
    SCAFFOLD_CTRL_GLOBAL = "scaffold_c_global"  # the server's control variate, sent with each task (tensors)
    FEDPROX_MU = "fedprox_mu"  # FedProx's coefficient, sent with each training task


class FLModel:
    """A model (or its change) with metrics, round numbers and free-form meta.

    Args:
        params_type: FULL or DIFF. If None and ``params`` is given, FULL is assumed.
        params: name -> tensor (or numpy array) mapping, e.g. a ``state_dict``.
        optimizer_params: optional optimizer state (kept locally, never sent).
        metrics: name -> number, e.g. ``{"accuracy": 0.93}``.
        start_round, current_round, total_rounds: round bookkeeping.
        meta: free-form JSON-able dict, e.g. ``{"NUM_STEPS_CURRENT_ROUND": 120}``.
    """

    def __init__(
        self,
        params_type: ParamsType | str | None = None,
        params: Any = None,
        optimizer_params: Any = None,
        metrics: dict[str, Any] | None = None,
        start_round: int | None = 0,
        current_round: int | None = None,
        total_rounds: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if params_type is None:
            if params is not None:
                params_type = ParamsType.FULL
        else:
            params_type = ParamsType(params_type)
        if params_type in (ParamsType.FULL, ParamsType.DIFF) and params is None:
            raise ValueError(f"params must be provided when params_type is {params_type.value}")
        if params is not None and not isinstance(params, dict):
            raise TypeError(f"params must be a dict of name -> tensor, got {type(params).__name__}")
        if metrics is not None and not isinstance(metrics, dict):
            raise TypeError(f"metrics must be a dict, got {type(metrics).__name__}")
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        self.params_type = params_type
        self.params = params
        self.optimizer_params = optimizer_params
        self.metrics = metrics
        self.start_round = start_round
        self.current_round = current_round
        self.total_rounds = total_rounds
        self.meta = {} if meta is None else meta

    def __repr__(self) -> str:
        n = 0 if self.params is None else len(self.params)
        pt = None if self.params_type is None else self.params_type.value
        return (
            f"FLModel(params_type={pt}, params=<{n} tensors>, metrics={self.metrics}, "
            f"current_round={self.current_round}, total_rounds={self.total_rounds}, meta={self.meta})"
        )
