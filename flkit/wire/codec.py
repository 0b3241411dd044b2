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


def json_to_dict(text: str, what: str) -> dict[str, Any]:
    """Decode a JSON object sent by the other side; anything else is a ValidationError."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValidationError(f"malformed {what} JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValidationError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as every transport delivers them: checked like ``metrics_to_json`` and plain numbers."""
    text = metrics_to_json(metrics)
    return json.loads(text) if text else {}


def plain_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """Meta as every transport delivers it: strict JSON values (tensors and numpy scalars become numbers)."""
    text = meta_to_json(meta)
    return json.loads(text) if text else {}
