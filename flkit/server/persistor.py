"""Saving global models and round state atomically, so a crash never leaves a torn file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch

from flkit.wire.codec import Params, encode_params

GLOBAL_MODEL_FILE = "FL_global_model.safetensors"
BEST_MODEL_FILE = "best_FL_global_model.safetensors"
STATE_FILE = "round_state.json"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_params(path: Path, params: Params, metadata: dict[str, Any] | None = None) -> None:
    """Write params as safetensors (string metadata only), replacing ``path`` atomically."""
    write_blob(Path(path), encode_params(params, metadata or {}))


def write_blob(path: Path, blob: bytes) -> None:
    """Write an already-encoded safetensors blob, replacing ``path`` atomically."""
    _atomic_write(Path(path), lambda fh: fh.write(blob))


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, replacing ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=True).encode()
    _atomic_write(Path(path), lambda fh: fh.write(text))


def load_params(path: Path) -> Params:
    return safetensors.torch.load_file(str(path))


class Persistor:
    """Owns the server's output folder: the global model, the best model and the round state."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def global_model_path(self) -> Path:
        return self.directory / GLOBAL_MODEL_FILE

    @property
    def best_model_path(self) -> Path:
        return self.directory / BEST_MODEL_FILE

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def save_global(self, blob: bytes) -> None:
        """``blob`` is the encoded global model, the same bytes the next round sends to sites."""
        write_blob(self.global_model_path, blob)

    def save_best(self, params: Params, round_num: int, key_metric: str, score: float) -> None:
        save_params(
            self.best_model_path, params, {"round": round_num, "key_metric": key_metric, "score": repr(score)}
        )

    def save_state(self, state: dict[str, Any]) -> None:
        write_json(self.state_path, state)

    def server_models(self, include_best: bool) -> list[tuple[str, Path]]:
        """The server's models for cross-site evaluation, named ``SRV_<file name>`` as NVFlare does:
        the final global model, then the best one (when this run selected one)."""
        paths = [self.global_model_path] + ([self.best_model_path] if include_best else [])
        return [(f"SRV_{path.name}", path) for path in paths]
