"""Rank 0 shares what it got from the server with the other ranks of a torch.distributed job.

Under ``torch.distributed.run`` only rank 0 talks to the server. Every task state it
learns (a task with its params, "no task yet", the end of the job, an error) is broadcast
over the process group the script initialised, so that every rank sees the same params,
task name, round and ``is_running()`` answer, and loops end together on all ranks.

What travels is bytes, never pickle: a JSON header and the params' safetensors bytes, sent
as uint8 tensors (two collectives per state: the two lengths, then header + params). On
gloo the tensors stay on the CPU; on NCCL they go through the current CUDA device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flkit.errors import ConfigError, ValidationError

# Header "kind"s, one per state rank 0 can be in after asking the server; WAITING: rank 0 still
# waits for a task (sent periodically so the other ranks' collective wait never times out).
CONFIG, TASK, NO_TASK, END, ERROR, WAITING = "config", "task", "no_task", "end", "error", "waiting"


def env_rank() -> tuple[int, int]:
    """(rank, world size) as the launcher announced them (torchrun sets RANK and WORLD_SIZE)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} are not integers"
        ) from None


def process_group_rank() -> tuple[int, int] | None:
    """(rank, world size) of the initialised default process group, or None when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


@dataclass
class SharedState:
    """One state as every rank sees it."""

    kind: str
    header: dict[str, Any]
    payload: bytes = b""


class RankLink:
    """Broadcasts rank 0's states over the default process group.

    Every rank must make the same sequence of calls (the Client API guarantees it by
    sharing exactly once per state change, on every rank).
    """

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = str(dist.get_backend()).lower()
        # A mixed "cpu:gloo,cuda:nccl" group takes CPU tensors through gloo.
        if "nccl" in backend and "gloo" not in backend:
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.shared_config = False

    def timeout_s(self) -> float | None:
        """The process group's collective timeout in seconds (None when torch does not tell):
        the longest the other ranks can wait in one broadcast for rank 0's next state."""
        try:
            group = self._dist.distributed_c10d._get_default_group()
            timeout = group._get_backend(self.device).options._timeout
            return float(timeout.total_seconds())
        except (AttributeError, RuntimeError, TypeError, ValueError):
            return None

    @classmethod
    def current(cls) -> RankLink | None:
        """A link over the script's process group; None without one (or with a single rank)."""
        ranks = process_group_rank()
        if ranks is None or ranks[1] < 2:
            return None
        return cls()

    def send(self, kind: str, header: dict[str, Any], payload: bytes | None = None) -> None:
        """Rank 0: share one state."""
        head = json.dumps({"kind": kind, **header}).encode()
        body = payload or b""
        sizes = torch.tensor([len(head), len(body)], dtype=torch.int64, device=self.device)
        self._dist.broadcast(sizes, src=0)
        buf = torch.empty(len(head) + len(body), dtype=torch.uint8)
        view = buf.numpy()
        view[: len(head)] = np.frombuffer(head, dtype=np.uint8)
        if body:
            view[len(head) :] = np.frombuffer(body, dtype=np.uint8)
        self._dist.broadcast(buf.to(self.device), src=0)

    def receive(self) -> SharedState:
        """Rank > 0: wait for rank 0's next state."""
        sizes = torch.empty(2, dtype=torch.int64, device=self.device)
        self._dist.broadcast(sizes, src=0)
        head_len, body_len = (int(x) for x in sizes.cpu().tolist())
        if head_len <= 0 or body_len < 0:
            raise ValidationError(f"rank {self.rank}: malformed state from rank 0 (sizes {head_len}, {body_len})")
        buf = torch.empty(head_len + body_len, dtype=torch.uint8, device=self.device)
        self._dist.broadcast(buf, src=0)
        view = buf.cpu().numpy()
        try:
            header = json.loads(view[:head_len].tobytes())
        except ValueError as exc:
            raise ValidationError(f"rank {self.rank}: malformed state header from rank 0: {exc}") from None
        # One copy of the params' bytes, straight from the buffer (not the whole buffer, then a slice).
        return SharedState(kind=str(header.pop("kind", "")), header=header, payload=view[head_len:].tobytes())
