"""A running job's state for its admins (`flkit status`): plain JSON-able data, no gRPC.

Read under the registry's lock, once: a consistent picture, cheap enough to ask for every few
seconds even with thousands of sites (the site list is cut at ``MAX_LISTED_SITES``; counts
cover all).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from flkit.server.controller import Controller
from flkit.server.sites import ACCEPTING, SiteRegistry

MAX_LISTED_SITES = 1000
DEFAULT_ROUNDS = 5


def _task_state(outcome: str | None) -> str:
    if outcome is None:
        return "working"
    if outcome == ACCEPTING:
        return "sending"
    return "answered" if outcome == "done" else "failed"


def job_status(registry: SiteRegistry, controller: Controller, last_rounds: int = 0,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job now: its phase, the current round, each site, the latest rounds' records."""
    last_rounds = last_rounds or DEFAULT_ROUNDS
    now = time.monotonic()
    with registry.cond:
        end = registry.end
        open_task = controller.current_task()
        sites = []
        counts: Counter[str] = Counter()
        for state in registry.sites.values():
            counts[state.status.value] += 1
            if len(sites) < MAX_LISTED_SITES:
                holds = open_task is not None and state.task is open_task
                sites.append({
                    "name": state.name,
                    "status": state.status.value,
                    "last_seen_s": None if not state.last_seen else round(now - state.last_seen, 1),
                    "task": _task_state(state.task_outcome) if holds else None,
                    "failure": state.failure,
                })
        history = list(controller.history[-last_rounds:])
        completed = sum(1 for r in controller.history if r.task == "train")
    best = controller.selector.best
    cfg = controller.config
    return {
        "job_id": registry.job_id,
        "phase": ("completed" if not end.failed else "failed") if end is not None else (
            "running" if open_task is not None or controller.history else "waiting for sites"),
        "end_reason": None if end is None else end.reason,
        "round": None if open_task is None else open_task.round,
        "task": None if open_task is None else open_task.name,
        "first_round": cfg.start_round,
        "last_round": cfg.last_round,
        "completed_rounds": completed,
        "key_metric": cfg.key_metric,
        "best": None if best is None else {"round": best.round, "score": best.value},
        "site_counts": dict(counts),
        "sites": sites,
        "rounds": [{
            "round": r.round, "task": r.task, "sites": len(r.sites), "answered": len(r.metrics),
            "failed": dict(r.failed), "score": r.score, "best": r.best, "seconds": round(r.seconds, 3),
        } for r in history],
        **(extra or {}),
    }
