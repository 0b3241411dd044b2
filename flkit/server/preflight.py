"""The pre-flight check's look at one train result (``WorkflowConfig.dry_run``, ``flkit check``).

A run refuses a result at its first problem; the check takes every result and lists all of its
problems, with the messages a run would give (the same functions of ``flkit.server.validation``),
plus what a run takes silently: a missing NUM_STEPS_CURRENT_ROUND (a warning), a missing key
metric, and params whose type does not match what they hold. Nothing of the result is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from flkit.errors import ValidationError
from flkit.messages import Result
from flkit.model import MetaKey, ParamsType
from flkit.server.validation import (
    check_metrics,
    default_weight,
    missing_key_metric,
    params_problems,
    params_type_of,
    weight_of,
)
from flkit.wire.codec import Params

# A FULL result closer to zero than this share of its distance to the received model is taken for a
# difference (and a DIFF result for full weights, the other way round). One batch of training moves
# a model far less than its own size, so a correct result is nowhere near this line.
LOOKS_LIKE_THE_OTHER = 0.5


@dataclass
class ResultCheck:
    """What the check found in one site's train result."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    params_type: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    num_steps: Any = None  # NUM_STEPS_CURRENT_ROUND as sent (None: not sent)


def examine(site: str, result: Result, expected: Params, key_metric: str | None) -> ResultCheck:
    """Every problem of ``result`` (a train task's answer) against the global model ``expected``."""
    found = ResultCheck(num_steps=result.meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND))
    try:
        found.metrics = check_metrics(site, result.metrics)
    except ValidationError as exc:
        found.errors.append(str(exc))
    else:
        missing = missing_key_metric(site, key_metric, found.metrics)
        if missing is not None:
            found.errors.append(missing)
        elif key_metric is None and not found.metrics:
            found.warnings.append(f"site {site} sent no metrics (the job has no key_metric, so nothing needs them)")
    try:
        weight_of(site, result.meta)
    except ValidationError as exc:
        found.errors.append(str(exc))
    note = default_weight(site, result.meta)
    if note is not None:
        found.warnings.append(note)
    if result.params is None:
        found.errors.append(f"site {site}: a train task must be answered with params")
        return found
    try:
        params_type = params_type_of(site, result.params_type)
    except ValidationError as exc:
        found.errors.append(str(exc))
        return found
    found.params_type = params_type.value
    problems = list(params_problems(site, result.params, expected))
    found.errors.extend(problems)
    if not problems:
        found.errors.extend(_type_mismatch(site, result.params, expected, params_type))
        idle = _untrained(site, result.params, expected, params_type)
        if idle is not None:
            found.warnings.append(idle)
    return found


def _norms(params: Params, expected: Params) -> tuple[float, float]:
    """(|params|, |params - expected|) over the floating tensors, in float64."""
    size = distance = 0.0
    for name, ref in expected.items():
        if not ref.is_floating_point():
            continue
        value = params[name].double()
        size += float(value.square().sum())
        distance += float((value - ref.double()).square().sum())
    return math.sqrt(size), math.sqrt(distance)


def _type_mismatch(site: str, params: Params, expected: Params, params_type: ParamsType) -> list[str]:
    """A FULL result that holds a difference, or a DIFF result that holds full weights."""
    size, distance = _norms(params, expected)
    if params_type == ParamsType.FULL and size < LOOKS_LIKE_THE_OTHER * distance:
        return [f"site {site}: the result is sent as FULL params but looks like a difference: it is closer to zero "
                f"(norm {size:.4g}) than to the model it received (distance {distance:.4g}); send the trained "
                "weights, or FLModel(params_type=ParamsType.DIFF, ...)"]
    if params_type == ParamsType.DIFF and distance < LOOKS_LIKE_THE_OTHER * size:
        return [f"site {site}: the result is sent as DIFF params but looks like full weights: it is closer to the "
                f"model it received (distance {distance:.4g}) than to zero (norm {size:.4g}); send trained - "
                "received, or FULL params"]
    return []


def _untrained(site: str, params: Params, expected: Params, params_type: ParamsType) -> str | None:
    """A result that changes nothing: the received model sent back, or a DIFF of zeros."""
    if params_type == ParamsType.FULL:
        same = all(torch.equal(params[name], ref) for name, ref in expected.items())
        what = "equals the model it received"
    else:
        same = all(not bool(params[name].any()) for name in expected)
        what = "is a DIFF of zeros"
    if not same:
        return None
    return f"site {site}: the result {what}: the script trained nothing in this task"
