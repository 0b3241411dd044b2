"""Tensors in ``FLModel.meta``: carried as tensors beside the model's params, never as JSON or a pickle.

Why: some algorithms send model-sized state with a task or a result that is not the model itself
(SCAFFOLD's control variates: NVFlare puts them in ``meta["scaffold_c_global"]`` and
``meta["scaffold_c_diff"]`` as dicts of arrays). Meta is JSON on the wire; tensors travel as
safetensors bytes. So a meta value that is a dict of tensors (or numpy arrays) rides in the same
params payload under the key ``flkit.meta/<meta key>/<tensor name>``, through every transport
unchanged, and is split off again on arrival (``unpack``), before the params are checked against
the global model. The receiver checks the group itself (finite values; the strategy checks what it
expects).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from flkit.errors import ValidationError

PREFIX = "flkit.meta/"

Groups = dict[str, dict[str, torch.Tensor]]


def is_tensor_group(value: object) -> bool:
    """Whether a meta value travels as tensors: a non-empty dict of str -> tensor / numpy array."""
    return (isinstance(value, Mapping) and bool(value)
            and all(isinstance(k, str) and isinstance(v, (torch.Tensor, np.ndarray)) for k, v in value.items()))


def split_meta(meta: Mapping[str, Any] | None) -> tuple[dict[str, Any], Groups]:
    """``meta`` without its tensor groups, and the groups as CPU tensors (numpy arrays are wrapped,
    not copied; CUDA tensors are moved once)."""
    plain: dict[str, Any] = {}
    groups: Groups = {}
    for key, value in (meta or {}).items():
        if is_tensor_group(value):
            if "/" in str(key):
                raise ValidationError(f"meta key {key!r} holds tensors, so it may not contain '/'")
            groups[str(key)] = {name: _cpu(name, t) for name, t in value.items()}
        else:
            plain[key] = value
    return plain, groups


def _cpu(name: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value.detach()
    if tensor.is_sparse:
        raise ValidationError(f"meta tensor '{name}' is sparse; send it dense")
    return tensor.cpu().contiguous()


def pack(params: Mapping[str, torch.Tensor], groups: Groups) -> dict[str, torch.Tensor]:
    """A new dict: ``params`` with the groups' tensors added under ``flkit.meta/<key>/<name>``."""
    out = dict(params)
    for key, tensors in groups.items():
        for name, tensor in tensors.items():
            out[f"{PREFIX}{key}/{name}"] = tensor
    return out


def unpack(params: Mapping[str, torch.Tensor] | None) -> tuple[dict[str, torch.Tensor] | None, Groups]:
    """The params without the meta tensors, and the meta tensors by meta key. Cheap when there are
    none (the usual case): one pass over the keys."""
    if params is None:
        return None, {}
    if not any(name.startswith(PREFIX) for name in params):
        return params if isinstance(params, dict) else dict(params), {}
    model: dict[str, torch.Tensor] = {}
    groups: Groups = {}
    for name, tensor in params.items():
        if not name.startswith(PREFIX):
            model[name] = tensor
            continue
        key, sep, tensor_name = name[len(PREFIX):].partition("/")
        if not key or not sep or not tensor_name:
            raise ValidationError(f"tensor name {name!r} is not '{PREFIX}<meta key>/<tensor name>'")
        groups.setdefault(key, {})[tensor_name] = tensor
    return model, groups


__all__ = ["PREFIX", "Groups", "is_tensor_group", "pack", "split_meta", "unpack"]
