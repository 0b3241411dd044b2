"""SCAFFOLD's client side (NVFlare's ``PTScaffoldHelper``: the same methods and arguments).

A script calls ``init(model)`` once, and each round ``load_global_controls(meta["scaffold_c_global"])``,
``get_params()``, ``model_update(...)`` after every optimiser step, ``terms_update(...)`` after
training, and answers with ``meta["scaffold_c_diff"] = get_delta_controls()`` (see flkit.strategy.scaffold).

What differs from NVFlare's helper, on purpose: the site's own control variate ``c_local`` is
kept in the site's folder (``<site workspace>/scaffold/c_local.round-<r>.safetensors``), not only
in this object. NVFlare's lives in the script's memory, so it is lost (silently reset to zeros)
when a site's script runs in another process next round (more sites than workers in a
simulation, a restarted site) and it runs ahead of a server that resumed from an earlier round.
Here ``load_global_controls`` takes, from the site's folder, the ``c_local`` of the round the server
names (``meta["scaffold_c_local_round"]``: the last round whose change it aggregated), and
``terms_update`` writes the new one under the task's round. Outside a flkit site (no
``flkit.init()``), it keeps ``c_local`` in memory as NVFlare's does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from flkit.atomic_file import atomic_write_file
from flkit.errors import FLKitError

STATE_DIR = "scaffold"
_FILE = re.compile(r"^c_local\.round-(\d+)\.safetensors$")
LOCAL_ROUND_KEY = "scaffold_c_local_round"  # (flkit.strategy.scaffold's; not imported: no server code on a site)


def get_lr_values(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate of each of the optimiser's parameter groups."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def _site_task() -> tuple[Path, int, Any, bool] | None:
    """(the site's folder, the task's round, the server's c_local round, whether this rank writes)
    when running as a flkit site with a task in hand; else None."""
    from flkit.client.current import current_session

    session = current_session()
    task = None if session is None else session.state.task
    if session is None or task is None:
        return None
    writes = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                  and torch.distributed.get_rank() != 0)
    return Path(session.settings.workspace), task.round, task.meta.get(LOCAL_ROUND_KEY), writes


class PTScaffoldHelper:
    """SCAFFOLD's control variates on a site (Karimireddy et al., 2020, option II)."""

    def __init__(self) -> None:
        self.cnt = 0
        self.c_global: dict[str, torch.Tensor] | None = None
        self.c_local: dict[str, torch.Tensor] | None = None
        self.c_delta_para: dict[str, np.ndarray | torch.Tensor] | None = None
        self._round: int | None = None  # the task whose c_local terms_update writes

    def init(self, model: torch.nn.Module) -> None:
        """Zero control variates shaped like the model's floating tensors (on the model's device)."""
        floats = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.c_global = {k: torch.zeros_like(v) for k, v in floats.items()}
        self.c_local = {k: torch.zeros_like(v) for k, v in floats.items()}

    def _require(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        if self.c_global is None or self.c_local is None:
            raise FLKitError("PTScaffoldHelper: call init(model) first")
        return self.c_global, self.c_local

    def load_global_controls(self, weights: Mapping[str, Any]) -> None:
        """Take the server's control variate (``meta["scaffold_c_global"]``), and this site's own one
        of the round the server names, from the site's folder."""
        c_global, c_local = self._require()
        missing = sorted(set(c_global) - set(weights))
        if missing:
            raise FLKitError(f"PTScaffoldHelper: the global controls lack {missing[:5]} of the model's tensors")
        with torch.no_grad():
            for name, value in weights.items():
                if name in c_global:
                    c_global[name].copy_(torch.as_tensor(value))
        site = _site_task()
        if site is None:
            return
        folder, self._round, local_round, _ = site
        self._load_local(folder / STATE_DIR, local_round, c_local)

    @staticmethod
    def _load_local(folder: Path, local_round: Any, c_local: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            if local_round is None:  # the server has none of this site's changes: c_local starts at zero
                for tensor in c_local.values():
                    tensor.zero_()
                return
            path = folder / f"c_local.round-{int(local_round)}.safetensors"
            if not path.is_file():
                raise FLKitError(f"PTScaffoldHelper: this site's control variate of round {local_round} is missing "
                                 f"({path}); the server's control variate holds it, so SCAFFOLD cannot go on "
                                 "consistently (was the site's folder cleared?)")
            saved = safetensors.torch.load_file(str(path))
            for name, tensor in c_local.items():
                if name not in saved or saved[name].shape != tensor.shape:
                    raise FLKitError(f"PTScaffoldHelper: {path} does not fit the model (tensor '{name}')")
                tensor.copy_(saved[name])
        # Older rounds' files go, but for the newest one before it: the server's saved state may lag its
        # live one by a round (it is written while the next round trains), and a server that resumes
        # from that saved state names that round.
        older = sorted((int(m.group(1)), path) for path in folder.iterdir()
                       if (m := _FILE.match(path.name)) and int(m.group(1)) < int(local_round))
        for _, path in older[:-1]:
            path.unlink(missing_ok=True)

    def get_params(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c_global, c_local) for this round's ``model_update`` calls; resets the step count."""
        self.cnt = 0
        return self._require()

    def model_update(self, model: torch.nn.Module, curr_lr: float, c_global_para: Mapping[str, torch.Tensor],
                     c_local_para: Mapping[str, torch.Tensor]) -> None:
        """After an optimiser step: ``w -= lr * (c_global - c_local)`` on the model's floating tensors."""
        state = model.state_dict()
        with torch.no_grad():
            for name, c_global in c_global_para.items():
                state[name].sub_(c_global - c_local_para[name], alpha=curr_lr)
        self.cnt += 1

    def terms_update(self, model: torch.nn.Module, curr_lr: float, c_global_para: Mapping[str, torch.Tensor],
                     c_local_para: Mapping[str, torch.Tensor], model_global: torch.nn.Module) -> None:
        """After training: ``c_local+ = c_local - c_global + (w_global - w) / (cnt * lr)``; keeps the
        change for ``get_delta_controls`` and writes the new c_local to the site's folder."""
        _, c_local = self._require()
        if self.cnt <= 0 or not curr_lr:
            raise FLKitError("PTScaffoldHelper.terms_update: no model_update steps were taken this round "
                             "(or the learning rate is 0)")
        state, global_state = model.state_dict(), model_global.state_dict()
        delta: dict[str, np.ndarray | torch.Tensor] = {}
        with torch.no_grad():
            for name, old in c_local_para.items():
                new = old - c_global_para[name] + (global_state[name] - state[name]) / (self.cnt * curr_lr)
                change = (new - old).cpu()
                # numpy arrays, as NVFlare's helper gives; bfloat16 has no numpy type: it stays a tensor
                delta[name] = change if change.dtype == torch.bfloat16 else change.numpy()
                c_local[name].copy_(new)
        self.c_delta_para = delta
        site = _site_task()
        if site is not None and site[3]:  # under the task's own round (the task in hand now)
            self._save_local(site[0] / STATE_DIR, site[1], c_local)

    @staticmethod
    def _save_local(folder: Path, round_num: int, c_local: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in c_local.items()}
        # a crash leaves the old file or the new one, never half of one
        atomic_write_file(folder / f"c_local.round-{round_num}.safetensors",
                          lambda tmp: safetensors.torch.save_file(tensors, tmp))

    def get_delta_controls(self) -> dict[str, np.ndarray | torch.Tensor]:
        """This round's change of c_local (numpy arrays, as NVFlare's helper gives): send it in
        ``meta["scaffold_c_diff"]``."""
        if self.c_delta_para is None:
            raise ValueError("c_delta_para hasn't been computed yet: call terms_update() first")
        return self.c_delta_para


__all__ = ["PTScaffoldHelper", "get_lr_values"]
