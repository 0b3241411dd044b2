"""Reading a saved model (a checkpoint) and checking that it fits the job's model.

A checkpoint is a ``.safetensors`` file, or a torch checkpoint read with
``torch.load(weights_only=True)`` (tensors only, never arbitrary objects): a state_dict, NVFlare's
``{"model": state_dict, ...}`` or Lightning's ``{"state_dict": ...}``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import torch

from flkit.errors import ConfigError
from flkit.wire.codec import Params

# Keys named in full in a mismatch message; the rest are counted.
KEYS_SHOWN = 10


def load_checkpoint(path: Path, what: str = "initial_ckpt") -> Params:
    """The checkpoint's tensors; ConfigError (naming ``what`` and the path) when it is missing or
    is not a tensors-only checkpoint."""
    return _parse(Path(path), _read(Path(path), what), what)


def read_model_file(path: Path, what: str) -> tuple[Params, str]:
    """The checkpoint's tensors and the sha256 of its bytes: read once, so the digest is of the
    very bytes the tensors came from."""
    path = Path(path)
    data = _read(path, what)
    return _parse(path, data, what), hashlib.sha256(data).hexdigest()


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from None


def _parse(path: Path, data: bytes, what: str) -> Params:
    if path.suffix == ".safetensors":
        import safetensors
        import safetensors.torch

        try:
            return safetensors.torch.load(data)
        except (safetensors.SafetensorError, ValueError) as exc:
            raise ConfigError(f"{what} {path} is not a readable safetensors file: {exc}") from None
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"{what} {path} is not a tensors-only torch checkpoint: {exc}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):  # NVFlare's {"model": state_dict, ...}
        loaded = loaded["model"]
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning checkpoints
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"{what} {path} does not hold a state_dict of tensors")
    return loaded


def _keys(names: list[str]) -> str:
    more = len(names) - KEYS_SHOWN
    return "[" + ", ".join(names[:KEYS_SHOWN]) + (f" and {more} more" if more > 0 else "") + "]"


def check_fits(what: str, loaded: Mapping[str, torch.Tensor], model: Mapping[str, torch.Tensor]) -> None:
    """``loaded`` has exactly the model's keys, each with the model's shape; else a ConfigError
    naming the missing keys, the unexpected ones and those of another shape."""
    missing = sorted(set(model) - set(loaded))
    unexpected = sorted(set(loaded) - set(model))
    reshaped = sorted(k for k in model if k in loaded and tuple(loaded[k].shape) != tuple(model[k].shape))
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing keys {_keys(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_keys(unexpected)}")
    if reshaped:
        shapes = [f"{k} {list(loaded[k].shape)} (the model's: {list(model[k].shape)})" for k in reshaped]
        parts.append(f"keys of another shape {_keys(shapes)}")
    raise ConfigError(f"{what} does not fit the job's model: {'; '.join(parts)}")
