"""Early stopping with NVFlare's syntax and meaning: ``stop_cond="accuracy >= 0.9"`` ends the job
after the first round whose sites' mean accuracy meets it; ``patience=N`` after N rounds in a row
without a new best key metric. Real simulator runs; each test checks the round the job ended at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flkit.errors import ConfigError
from flkit.job import FedAvgJob, FedAvgRecipe, ScriptRunner, SimEnv
from flkit.server.config import WorkflowConfig

from conftest import SCRIPTS

SCRIPT = str(SCRIPTS / "scheduled_accuracy.py")


def _run(tmp_path, accuracies: str, num_rounds: int = 8, **options) -> tuple[dict, object]:
    job = FedAvgJob(name="early", initial_model=torch.nn.Linear(3, 2), n_clients=2, num_rounds=num_rounds,
                    **options)
    job.to_clients(ScriptRunner(script=SCRIPT, script_args=f"--accuracies {accuracies}"))
    result = job.simulator_run(tmp_path / "ws", threads=2, quiet=True, backend="threads")
    state = json.loads((tmp_path / "ws" / "server" / "round_state.json").read_text())
    return state, result


def test_stop_cond_ends_the_job_after_the_first_round_it_holds(tmp_path):
    state, _ = _run(tmp_path, "0.5,0.7,0.92,0.95,0.99", stop_cond="accuracy >= 0.9")
    assert [r["round"] for r in state["history"]] == [0, 1, 2]  # round 2 is the first with 0.92 >= 0.9
    assert state["status"] == "completed"
    assert "completed 3 round(s) (stopped early: accuracy >= 0.9 held in round 2" in state["reason"]


def test_patience_ends_the_job_after_n_rounds_without_a_new_best(tmp_path):
    # best 0.8 in round 1; rounds 2 and 3 do not beat it (patience=2): the job ends after round 3
    state, _ = _run(tmp_path, "0.5,0.8,0.7,0.8,0.9", patience=2)
    assert [r["round"] for r in state["history"]] == [0, 1, 2, 3]
    assert [r["best"] for r in state["history"]] == [True, True, False, False]
    assert "no improvement of accuracy in 2 round(s), patience=2 (best 0.8 in round 1)" in state["reason"]


def test_patience_without_a_key_metric_follows_stop_conds_metric_and_direction(tmp_path):
    # no key metric: patience watches stop_cond's metric, lower is better ("<="); best 0.3 in round 1
    state, _ = _run(tmp_path, "0.5,0.3,0.4,0.35,0.1", key_metric=None, stop_cond="accuracy <= 0.05", patience=2)
    assert [r["round"] for r in state["history"]] == [0, 1, 2, 3]
    assert "no improvement of accuracy in 2 round(s), patience=2 (best 0.3 in round 1)" in state["reason"]


def test_without_a_condition_met_every_round_runs(tmp_path):
    state, _ = _run(tmp_path, "0.5,0.6,0.7", num_rounds=3, stop_cond="accuracy >= 0.9", patience=2)
    assert [r["round"] for r in state["history"]] == [0, 1, 2]
    assert state["reason"].startswith("completed 3 round(s); best accuracy=0.7")


def test_the_recipe_passes_stop_cond_and_patience_to_job_json(tmp_path):
    recipe = FedAvgRecipe(name="early", min_clients=2, num_rounds=6, model=torch.nn.Linear(3, 2),
                          train_script=SCRIPT, train_args="--accuracies 0.5,0.95", stop_cond="accuracy >= 0.9",
                          patience=3)
    folder = recipe.export(tmp_path / "out")
    workflow = json.loads((folder / "job.json").read_text())["workflow"]
    assert (workflow["stop_cond"], workflow["patience"]) == ("accuracy >= 0.9", 3)
    run = recipe.execute(SimEnv(num_clients=2, workspace_root=str(tmp_path / "sim")))
    assert run.get_status().endswith("COMPLETED")
    state = json.loads((Path(run.get_result()) / "server" / "round_state.json").read_text())
    assert [r["round"] for r in state["history"]] == [0, 1]  # 0.95 >= 0.9 in round 1


@pytest.mark.parametrize(("options", "message"), [
    ({"stop_cond": "accuracy>=0.9"}, "stop_cond must look like 'accuracy >= 0.95'"),
    ({"stop_cond": "accuracy >= high"}, "is not a number"),
    ({"patience": 0}, "patience must be an int >= 1"),
    ({"patience": 2, "key_metric": None}, "it needs a key_metric or a stop_cond"),
])
def test_bad_early_stopping_settings_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        WorkflowConfig(**options)


def test_every_run_writes_its_history_to_metrics_json(tmp_path):
    """``<workspace>/server/metrics.json``, whatever tracking is on: per round the sites that
    answered, their weights and timings, their metrics and means, the score and the best round."""
    state, _ = _run(tmp_path, "0.5,0.8,0.7", num_rounds=3)
    metrics = json.loads((tmp_path / "ws" / "server" / "metrics.json").read_text())
    assert (metrics["status"], metrics["key_metric"], metrics["key_metric_mode"]) == ("completed", "accuracy", "max")
    assert metrics["best"] == {"round": 1, "score": 0.8}
    assert [r["round"] for r in metrics["rounds"]] == [0, 1, 2]
    for record, accuracy, best in zip(metrics["rounds"], (0.5, 0.8, 0.7), (True, True, False), strict=True):
        assert record["answered"] == ["site-1", "site-2"] and record["failed"] == {}
        assert record["weights"] == {"site-1": 1.0, "site-2": 1.0}
        assert record["mean"] == {"accuracy": accuracy} and record["best"] is best
        assert all(0 <= t <= record["seconds"] for t in record["answered_after_s"].values())
        assert set(record["answered_after_s"]) == {"site-1", "site-2"}
    assert metrics["reason"] == state["reason"]
