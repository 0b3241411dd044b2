"""Tensor and metadata codec: safetensors bytes for params, strict JSON for the rest.

Why safetensors: it is raw little-endian bytes plus a JSON header with dtype
and shape, so decoding can never execute code (no pickle), and the library
checks that the header and the byte lengths agree.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from flkit.errors import ValidationError

Params = dict[str, torch.Tensor]


def _as_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise ValidationError(
            f"param '{name}' is a {type(value).__name__}; params must map names to torch tensors or numpy arrays"
        )
    if tensor.layout != torch.strided:
        raise ValidationError(f"param '{name}' has layout {tensor.layout}; only dense tensors can be sent")
    return tensor.detach().to("cpu").contiguous()


def to_cpu_params(params: Mapping[str, Any]) -> Params:
    """Return name -> dense contiguous CPU tensor; tensors sharing memory get their own copy.

    safetensors refuses aliased tensors (tied weights), so the second and later
    names that point at the same storage are cloned; nothing else is copied.
    """
    if not isinstance(params, Mapping):
        raise ValidationError(f"params must be a dict of name -> tensor, got {type(params).__name__}")
    out: Params = {}
    storages: set[int] = set()
    for name, value in params.items():
        if not isinstance(name, str):
            raise ValidationError(f"param names must be strings, got {name!r}")
        tensor = _as_tensor(name, value)
        if tensor.numel() > 0:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in storages:
                tensor = tensor.clone()
                ptr = tensor.untyped_storage().data_ptr()
            storages.add(ptr)
        out[name] = tensor
    return out


def encode_params(params: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> bytes:
    """Serialize params to a safetensors blob (optional string metadata in its header)."""
    meta = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    return safetensors.torch.save(to_cpu_params(params), metadata=meta)


def decode_params(blob: bytes | bytearray | memoryview) -> Params:
    """Parse a safetensors blob; malformed input raises ValidationError, never executes anything."""
    try:
        return safetensors.torch.load(blob if isinstance(blob, bytes) else bytes(blob))
    except (safetensors.SafetensorError, ValueError, RuntimeError) as exc:
        raise ValidationError(f"malformed params payload: {exc}") from exc


def to_plain(key: str, value: Any, what: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValidationError(f"{what} '{key}' is a tensor of shape {tuple(value.shape)}; send a number")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return value


def metrics_to_json(metrics: Mapping[str, Any] | None) -> str:
    """Encode metrics as JSON; each value must be a finite number."""
    if not metrics:
        return ""
    out: dict[str, float | int] = {}
    for key, raw in metrics.items():
        value = to_plain(str(key), raw, "metric")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(f"metric '{key}' is {type(value).__name__} {value!r}; metrics must be numbers")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValidationError(f"metric '{key}' is {value}; metrics must be finite")
        out[str(key)] = value
    return json.dumps(out, allow_nan=False)


def meta_to_json(meta: Mapping[str, Any] | None) -> str:
    """Encode meta as strict JSON (tensors/numpy scalars become numbers)."""
    if not meta:
        return ""
    out = {str(k): to_plain(str(k), v, "meta") for k, v in meta.items()}
    try:
        return json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"meta must be JSON-serializable with finite numbers: {exc}") from exc


# Bounds on JSON that the other side sends (a result's metrics and meta, a task's meta): far above
# any real use, and low enough that parsing and storing it cost nothing worth mentioning.
MAX_JSON_CHARS = 1 << 20
MAX_JSON_DEPTH = 32


def quote(value: object, limit: int = 40) -> str:
    """``repr`` of at most the first ``limit`` characters of ``value`` (and how long it was), for
    error messages and logs that name something the other side sent: never longer than about
    ``limit`` + 30 characters whatever it sent."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN or Infinity)")


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (0 for a scalar); no recursion."""
    depth = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        depth = max(depth, level + 1)
        stack.extend((child, level + 1) for child in item if isinstance(child, (dict, list)))
    return depth


def json_to_dict(text: str, what: str, max_chars: int = MAX_JSON_CHARS,
                 max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """Decode a JSON object sent by the other side; anything else is a ValidationError.

    Strict JSON (no NaN or Infinity) of at most ``max_chars`` characters nested at most
    ``max_depth`` deep: deeper nesting than Python's recursion limit raises RecursionError inside
    ``json.loads``, which is refused here like any other malformed text.
    """
    if not text:
        return {}
    if len(text) > max_chars:
        raise ValidationError(f"{what} JSON has {len(text)} characters, more than the {max_chars} allowed")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValidationError(f"malformed {what} JSON: nested too deeply (at most {max_depth} levels)") from None
    except ValueError as exc:
        raise ValidationError(f"malformed {what} JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a JSON object, got {type(value).__name__}")
    if json_depth(value) > max_depth:
        raise ValidationError(f"malformed {what} JSON: nested too deeply (at most {max_depth} levels)")
    return value


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as every transport delivers them: checked like ``metrics_to_json`` and plain numbers."""
    text = metrics_to_json(metrics)
    return json.loads(text) if text else {}


def plain_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Meta as every transport delivers it: strict JSON values (tensors and numpy scalars become numbers)."""
    text = meta_to_json(meta)
    return json.loads(text) if text else {}
