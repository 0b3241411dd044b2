"""An evaluate-only run's result: every site's metrics for one model, their mean, the failures.

``evaluation.json`` (in the server's folder) says which model was scored (the file it came from
and that file's sha256), each site's metrics, each metric's mean over the sites that reported it,
and why each site that gave no metrics gave none (its script failed, it timed out, it never
joined or left before the task).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flkit.server.persistor import write_json
from flkit.server.sites import SiteState, SiteStatus
from flkit.strategy.base import mean_metrics

EVALUATION_FILE = "evaluation.json"


def absent_reason(state: SiteState) -> str:
    """Why a site of the job had no part in the evaluation task."""
    if state.status == SiteStatus.FAILED:
        return state.failure or "failed"
    if state.status == SiteStatus.EXPECTED:
        return "did not join the job"
    if state.status == SiteStatus.LEFT:
        return "left the job before the evaluation"
    return "was not given the evaluation task"


def evaluation_report(*, job_id: str, model: Mapping[str, Any] | None, round_num: int, sites: list[str],
                      metrics: Mapping[str, Mapping[str, float]], failed: Mapping[str, str],
                      key_metric: str | None, status: str, reason: str | None) -> dict[str, Any]:
    """What ``evaluation.json`` holds. ``sites``: every site of the job, in the job's order;
    ``failed``: why each site without metrics has none."""
    answered = [s for s in sites if s in metrics]
    return {
        "job_id": job_id,
        "task": "validate",
        "round": round_num,
        "model": dict(model) if model is not None else None,
        "sites": list(sites),
        "answered": answered,
        "metrics": {s: dict(metrics[s]) for s in answered},
        "mean": mean_metrics({s: metrics[s] for s in answered}),
        "failed": {s: failed[s] for s in sites if s in failed and s not in metrics},
        "key_metric": key_metric,
        "status": status,
        "reason": reason,
    }


def write_evaluation(directory: Path, report: Mapping[str, Any]) -> Path:
    path = Path(directory) / EVALUATION_FILE
    write_json(path, report)
    return path
