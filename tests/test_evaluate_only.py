"""Evaluate-only runs (workflow mode "evaluate", NVFlare's FedEvalRecipe and EvalController): a
saved model goes to every site once as a validate task and each site's metrics come back; nothing
is trained, aggregated or changed.

Real simulator runs on scikit-learn's digits: a model trained here (one FL round, or centrally) is
evaluated by 3 sites, each on its own split of the test set, and every number the job reports is
compared with the same model scored directly in the test. Through FedEvalRecipe + SimEnv, through
a job.json with `flkit simulate`, and through the plain job API; plus refused checkpoints, failing
and silent sites, and the settings an evaluate-only job refuses.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flkit.errors import ConfigError
from flkit.job import EvalController, FedAvg, FedAvgJob, FedEvalRecipe, FedJob, PTModel, ScriptRunner, SimEnv
from flkit.job.config import load_job
from flkit.model import FLModel
from flkit.server.config import WorkflowConfig
from flkit.server.persistor import load_params
from flkit.sim.simulator import simulate

from conftest import REPO, SCRIPTS

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet, eval_split, load, train  # noqa: E402

EVAL_SCRIPT = str(SCRIPTS / "digits_eval.py")
SITES = ["site-1", "site-2", "site-3"]
WAIT_S = 30.0


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def direct_scores(params: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Each site's metrics for ``params``, computed here on that site's split (as digits_eval.py does)."""
    net = SmallNet()
    net.load_state_dict(params)
    net.eval()
    scores = {}
    for site in SITES:
        x, y = eval_split(site, len(SITES))
        logits = net(x)
        scores[site] = {"accuracy": (logits.argmax(1) == y).float().mean().item(),
                        "loss": torch.nn.functional.cross_entropy(logits, y).item()}
    return scores


def assert_scored(report: dict, expected: dict[str, dict[str, float]], sites: list[str]) -> None:
    """Every site in ``sites`` reported exactly the directly computed metrics; the mean is theirs."""
    assert report["answered"] == sites and sorted(report["metrics"]) == sorted(sites)
    for site in sites:
        for name, value in expected[site].items():
            assert report["metrics"][site][name] == pytest.approx(value, abs=1e-6), (site, name)
    for name in ("accuracy", "loss"):
        mean = sum(expected[s][name] for s in sites) / len(sites)
        assert report["mean"][name] == pytest.approx(mean, abs=1e-6)


def table_rows(output: str) -> dict[str, list[str]]:
    """The evaluation table's rows as printed: first cell -> the other cells (a cell wrapped onto
    further lines joined again)."""
    rows: dict[str, list[str]] = {}
    last = None
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if not cells:
            last = None
        elif cells[0]:
            last = rows[cells[0]] = cells[1:]
        elif last is not None:
            for i, more in enumerate(cells[1:]):
                last[i] = f"{last[i]} {more}".strip()
    return rows


@pytest.fixture(scope="module")
def fl_trained(tmp_path_factory) -> Path:
    """A global model trained by one FedAvg round over 2 sites (the model an evaluation scores)."""
    root = tmp_path_factory.mktemp("fl_trained")
    torch.manual_seed(0)
    job = FedAvgJob(name="train", initial_model=SmallNet(), n_clients=2, num_rounds=1)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "digits_transport.py")))
    result = job.simulator_run(root / "ws", quiet=True, backend="threads")
    assert result.ok
    return result.global_model_path


@pytest.fixture(scope="module")
def central_pt(tmp_path_factory) -> Path:
    """A model trained centrally (one epoch on 480 images: a second), saved as a torch checkpoint."""
    path = tmp_path_factory.mktemp("central") / "digits_net.pt"
    torch.manual_seed(1)
    net = SmallNet()
    train_x, train_y, _, _ = load()
    train(net, train_x[:480], train_y[:480], epochs=1, seed=1)
    torch.save(net.state_dict(), path)
    return path


# -- through the recipe, as a user runs it ------------------------------------------------------------


@pytest.mark.slow
def test_recipe_in_simenv_scores_the_saved_model_at_every_site(tmp_path, fl_trained, capsys):
    before, stamp = fl_trained.read_bytes(), fl_trained.stat().st_mtime_ns
    recipe = FedEvalRecipe(name="digits_eval", model=SmallNet(), eval_ckpt=str(fl_trained), min_clients=3,
                           eval_script=EVAL_SCRIPT, eval_args="--num_sites 3")
    run = recipe.execute(SimEnv(num_clients=3, workspace_root=str(tmp_path / "sim")))
    output = capsys.readouterr().out
    assert run.get_status() == "FINISHED:COMPLETED", output[-3000:]
    server = Path(run.get_result()) / "server"

    # Every site scored exactly the trained model (the script refuses any task but validate).
    expected = direct_scores(load_params(fl_trained))
    report = json.loads((server / "evaluation.json").read_text())
    assert_scored(report, expected, SITES)
    assert (report["status"], report["failed"], report["task"], report["sites"]) == ("completed", {}, "validate",
                                                                                     SITES)
    assert report["model"]["sha256"] == sha256(fl_trained)
    assert report["model"]["copied_from"] == str(fl_trained.resolve())
    assert Path(report["model"]["path"]).read_bytes() == before
    assert report["reason"].startswith("evaluated the model at 3 of 3 site(s)")

    # Nothing was trained or changed: the trained model's file is untouched, the job writes no model.
    assert fl_trained.read_bytes() == before and fl_trained.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in server.iterdir()) == ["evaluation.json", "metrics.json", "round_state.json"]

    # metrics.json: the history in the shape every run writes, one validate record.
    metrics = json.loads((server / "metrics.json").read_text())
    assert (metrics["mode"], metrics["status"], metrics["num_rounds"], metrics["best"]) == ("evaluate", "completed",
                                                                                           1, None)
    [record] = metrics["rounds"]
    assert (record["task"], record["answered"], record["failed"], record["weights"]) == ("validate", SITES, {}, {})
    assert record["metrics"] == report["metrics"] and record["mean"] == report["mean"]

    # The printed table: one row per site, the mean row, the numbers of evaluation.json.
    rows = table_rows(output)
    assert rows["site"][:2] == ["accuracy", "loss"]
    for site in SITES:
        assert rows[site][:2] == [f"{expected[site]['accuracy']:.4f}", f"{expected[site]['loss']:.4f}"]
    assert rows["mean (3 site(s))"][:2] == [f"{report['mean']['accuracy']:.4f}", f"{report['mean']['loss']:.4f}"]
    assert f"evaluation -> {server / 'evaluation.json'}" in output


@pytest.mark.slow
def test_a_site_whose_script_raises_is_reported_in_the_table_and_the_json(tmp_path, central_pt, capsys):
    recipe = FedEvalRecipe(name="one_fails", model=SmallNet(), eval_ckpt=str(central_pt), min_clients=3,
                           eval_script=EVAL_SCRIPT, eval_args="--num_sites 3 --fail_site site-2")
    run = recipe.execute(SimEnv(num_clients=3, workspace_root=str(tmp_path / "sim")))
    output = capsys.readouterr().out
    assert run.get_status() == "FINISHED:COMPLETED", output[-3000:]  # not fatal: two sites answered
    report = json.loads((Path(run.get_result()) / "server" / "evaluation.json").read_text())
    expected = direct_scores(torch.load(central_pt, weights_only=True))
    assert_scored(report, expected, ["site-1", "site-3"])
    assert list(report["failed"]) == ["site-2"]
    assert report["failed"]["site-2"].startswith("script digits_eval.py raised OSError: site-2 cannot read its "
                                                 "evaluation data")
    assert report["model"]["sha256"] == sha256(central_pt)  # the .pt file, read with weights_only=True
    assert "1 failed (site-2: script digits_eval.py raised OSError" in report["reason"]
    rows = table_rows(output)
    assert rows["site-2"][:2] == ["-", "-"] and "OSError: site-2 cannot read" in " ".join(rows["site-2"])
    assert rows["mean (2 site(s))"][0] == f"{report['mean']['accuracy']:.4f}"


@pytest.mark.slow
def test_when_no_site_answers_the_job_fails_with_every_reason(tmp_path, central_pt):
    recipe = FedEvalRecipe(name="all_fail", model=SmallNet(), eval_ckpt=str(central_pt), min_clients=1,
                           eval_script=EVAL_SCRIPT, eval_args="--num_sites 1 --fail_site site-1")
    run = recipe.execute(SimEnv(num_clients=1, workspace_root=str(tmp_path / "sim")))
    assert run.get_status() == "FINISHED:EXECUTION_EXCEPTION"
    report = json.loads((Path(run.get_result()) / "server" / "evaluation.json").read_text())
    assert (report["status"], report["answered"], report["metrics"]) == ("failed", [], {})
    assert "OSError: site-1 cannot read" in report["failed"]["site-1"]
    assert report["reason"].startswith("no site answered the evaluation (site-1: script digits_eval.py raised")


# -- through job.json and `flkit simulate` ------------------------------------------------------------


def simulate_cli(job_dir: Path, workspace: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(job_dir), "-w", str(workspace), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_job_json_evaluate_mode_runs_with_flkit_simulate(tmp_path, fl_trained, central_pt):
    """A job folder whose job.json says "workflow": {"mode": "evaluate"}: first as exported by the
    recipe, then edited by hand to score another saved model placed in the folder."""
    folder = FedEvalRecipe(name="cli_eval", model=SmallNet(), eval_ckpt=str(fl_trained), min_clients=3,
                           eval_script=EVAL_SCRIPT, eval_args="--num_sites 3").export(tmp_path / "jobs")
    data = json.loads((folder / "job.json").read_text())
    assert (data["workflow"]["mode"], data["eval_ckpt"]) == ("evaluate", f"eval_ckpt/{fl_trained.name}")
    proc = simulate_cli(folder, tmp_path / "ws")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ws" / "server" / "evaluation.json").read_text())
    assert_scored(report, direct_scores(load_params(fl_trained)), SITES)
    rows = table_rows(proc.stdout)
    assert rows["site-3"][0] == f"{report['metrics']['site-3']['accuracy']:.4f}"

    # By hand: the centrally trained .pt in the folder, and workflow settings written out in full.
    shutil.copy(central_pt, folder / "central.pt")
    data["eval_ckpt"] = "central.pt"
    del data["eval_ckpt_source"]
    data["workflow"] = {"mode": "evaluate", "min_clients": 2, "round_timeout_s": 120, "key_metric": "accuracy"}
    (folder / "job.json").write_text(json.dumps(data))
    proc = simulate_cli(folder, tmp_path / "ws2", "-n", "3", "--backend", "threads")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ws2" / "server" / "evaluation.json").read_text())
    expected = direct_scores(torch.load(central_pt, weights_only=True))
    assert_scored(report, expected, SITES)
    assert report["model"] == {"path": str((folder / "central.pt").resolve()), "sha256": sha256(central_pt)}
    mean = sum(expected[s]["accuracy"] for s in SITES) / 3
    assert report["reason"].endswith(f"mean accuracy={mean:.4g}")


def with_workflow(folder: Path, **changes) -> Path:
    data = json.loads((folder / "job.json").read_text())
    data.update(changes)
    (folder / "job.json").write_text(json.dumps(data))
    return folder


def test_flkit_simulate_refuses_an_unknown_mode(tmp_path):
    folder = FedEvalRecipe(name="bad", model=SmallNet(), min_clients=1, eval_script=EVAL_SCRIPT).export(tmp_path)
    proc = simulate_cli(with_workflow(folder, workflow={"mode": "evaluation"}), tmp_path / "ws")
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "workflow mode must be one of ['train', 'evaluate'], got 'evaluation'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "ws" / "server").exists()  # refused before anything ran


@pytest.mark.parametrize("workflow, message", [
    ({"mode": "evaluate", "num_rounds": 3}, "num_rounds=3 does not apply"),
    ({"mode": "evaluate", "stop_cond": "accuracy >= 0.9", "final_validation": True},
     "trains nothing: final_validation, stop_cond do not apply"),
    ({"mode": "evaluate", "cross_site_eval": {"submit_model": False}}, "trains nothing: cross_site_eval does not"),
    ({"mode": ["evaluate"]}, "workflow mode must be one of"),
])
def test_a_job_folder_with_training_settings_in_evaluate_mode_is_refused(tmp_path, workflow, message):
    folder = FedEvalRecipe(name="bad", model=SmallNet(), min_clients=1, eval_script=EVAL_SCRIPT).export(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_job(with_workflow(folder, workflow=workflow))


# -- checkpoints that do not fit ---------------------------------------------------------------------


def mismatched_state() -> dict[str, torch.Tensor]:
    state = dict(SmallNet().state_dict())
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(2, 2)
    state["conv.weight"] = torch.zeros(4, 1, 3, 3)
    return state


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_checkpoint_whose_keys_do_not_match_is_refused_naming_the_keys(tmp_path, suffix):
    path = tmp_path / f"other{suffix}"
    torch.save(mismatched_state(), path) if suffix == ".pt" else save_file(mismatched_state(), path)
    expected = (r"eval_ckpt .*other.* does not fit the job's model: missing keys \[fc.bias\]; unexpected keys "
                r"\[head.weight\]; keys of another shape \[conv.weight \[4, 1, 3, 3\] \(the model's: \[8, 1, 3, 3\]\)\]")
    with pytest.raises(ConfigError, match=expected):
        FedEvalRecipe(model=SmallNet(), eval_ckpt=str(path), min_clients=1, eval_script=EVAL_SCRIPT)


def test_the_plain_job_api_refuses_a_checkpoint_that_does_not_fit_when_exported(tmp_path):
    state = mismatched_state()
    state["fc.bias"] = torch.zeros(10)  # every model key is there (PTModel takes it): extra and reshaped ones
    path = tmp_path / "other.safetensors"
    save_file(state, path)
    job = FedJob(name="plain", min_clients=1)
    job.to_server(PTModel(SmallNet(), initial_ckpt=str(path)))
    job.to_server(EvalController())
    job.to_clients(ScriptRunner(EVAL_SCRIPT))
    with pytest.raises(ConfigError, match=r"eval_ckpt .*other.safetensors does not fit the job's model: unexpected "
                                          r"keys \[head.weight\]; keys of another shape \[conv.weight"):
        job.export_job(tmp_path / "jobs")
    assert not (tmp_path / "jobs" / "plain").exists()


def test_a_job_folder_whose_eval_ckpt_does_not_fit_is_refused_by_the_simulator(tmp_path):
    folder = FedEvalRecipe(name="misfit", model=SmallNet(), min_clients=1, eval_script=EVAL_SCRIPT).export(tmp_path)
    torch.save(mismatched_state(), folder / "other.pt")
    with_workflow(folder, eval_ckpt="other.pt")
    with pytest.raises(ConfigError, match=r"job 'misfit': eval_ckpt other.pt does not fit the job's model: missing "
                                          r"keys \[fc.bias\]; unexpected keys \[head.weight\]"):
        simulate(folder, tmp_path / "ws", quiet=True)
    assert not (tmp_path / "ws" / "server").exists()
    with_workflow(folder, eval_ckpt="../outside.pt")
    with pytest.raises(ConfigError, match="eval_ckpt '../outside.pt' is outside the job folder"):
        load_job(folder)


def test_a_pickled_object_in_a_pt_checkpoint_is_never_loaded(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": SmallNet().state_dict(), "extra": Path("x")}, path)
    with pytest.raises(ConfigError, match="is not a tensors-only torch checkpoint"):
        FedEvalRecipe(model=SmallNet(), eval_ckpt=str(path), min_clients=1, eval_script=EVAL_SCRIPT)


def test_eval_ckpt_must_exist_where_the_job_is_built_and_needs_evaluate_mode(tmp_path):
    with pytest.raises(ConfigError, match="eval_ckpt '/srv/models/net.pt' does not exist here"):
        FedEvalRecipe(model=SmallNet(), eval_ckpt="/srv/models/net.pt", min_clients=1, eval_script=EVAL_SCRIPT)
    with pytest.raises(ConfigError, match=r"needs model=\.\.\. .* or eval_ckpt=\.\.\."):
        FedEvalRecipe(min_clients=1, eval_script=EVAL_SCRIPT)
    job = FedAvgJob(name="train_job", initial_model=SmallNet(), n_clients=1, num_rounds=1)
    job.to_clients(ScriptRunner(EVAL_SCRIPT))
    folder = job.export_job(tmp_path)
    save_file(SmallNet().state_dict(), folder / "net.safetensors")
    with_workflow(folder, eval_ckpt="net.safetensors")
    with pytest.raises(ConfigError, match=r"eval_ckpt names the model an evaluate-only job scores; it needs "
                                          r"\"workflow\": \{\"mode\": \"evaluate\"\}"):
        load_job(folder)


# -- the plain job API ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_fedjob_with_eval_controller_is_an_evaluate_only_job(tmp_path, central_pt):
    """NVFlare's way without the recipe: PTModel (with the checkpoint) and EvalController on the
    server, a runner on the sites. Without a checkpoint the model's own weights are scored."""
    job = FedJob(name="plain_eval", min_clients=3)
    comp_ids = job.to_server(PTModel(SmallNet(), initial_ckpt=str(central_pt)))
    job.to_server(EvalController(persistor_id=comp_ids["persistor_id"], timeout=120))
    job.to_clients(ScriptRunner(EVAL_SCRIPT, script_args="--num_sites 3"))
    result = job.simulator_run(tmp_path / "ws", n_clients=3, quiet=True, backend="threads")
    assert result.ok and result.evaluation is not None
    assert_scored(result.evaluation, direct_scores(torch.load(central_pt, weights_only=True)), SITES)
    assert result.evaluation_path == tmp_path / "ws" / "server" / "evaluation.json"
    assert [r.task for r in result.rounds] == ["validate"] and not result.global_model_path.exists()

    torch.manual_seed(3)
    own = SmallNet()
    job = FedJob(name="own_weights", min_clients=3)
    job.to_server(own)
    job.to_server(EvalController())
    job.to_clients(ScriptRunner(EVAL_SCRIPT, script_args="--num_sites 3"))
    result = job.simulator_run(tmp_path / "ws2", n_clients=3, quiet=True, backend="threads")
    assert_scored(result.evaluation, direct_scores(own.state_dict()), SITES)
    model_file = tmp_path / "ws2" / "job" / "own_weights" / "initial_model.safetensors"
    assert result.evaluation["model"] == {"path": str(model_file.resolve()), "sha256": sha256(model_file)}


def test_one_workflow_per_job():
    job = FedJob(name="both")
    job.to_server(FedAvg(num_clients=2, num_rounds=1))
    with pytest.raises(ConfigError, match="FedAvg \\(training\\) or EvalController \\(evaluate-only\\), not both"):
        job.to_server(EvalController())
    job = FedJob(name="both")
    job.to_server(EvalController())
    with pytest.raises(ConfigError, match="not both"):
        job.to_server(FedAvg(num_clients=2, num_rounds=1))
    with pytest.raises(ConfigError, match="not both"):
        FedAvgJob(initial_model=SmallNet(), n_clients=2).to_server(EvalController())
    with pytest.raises(ConfigError, match="EvalController timeout must be a positive number"):
        EvalController(timeout=0)
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['mode'\]"):  # the controller says it
        FedJob(name="moded", mode="evaluate")


def test_an_evaluate_only_job_refuses_training_settings(tmp_path):
    job = FedJob(name="eval_cse", min_clients=1, final_validation=True)
    job.to_server(SmallNet())
    job.to_server(EvalController())
    job.to_clients(ScriptRunner(EVAL_SCRIPT))
    with pytest.raises(ConfigError, match="workflow mode 'evaluate' trains nothing: final_validation does not apply"):
        job.export_job(tmp_path)
    with pytest.raises(ConfigError, match="trains nothing: clients_per_round, aggregation_weights, cross_site_eval"):
        WorkflowConfig(mode="evaluate", clients_per_round=1, aggregation_weights={"site-1": 2.0},
                       cross_site_eval={})
    assert WorkflowConfig.from_dict({"mode": "evaluate"}).num_rounds == 1


# -- the server: sites that time out or never join -----------------------------------------------------


def test_a_site_that_does_not_answer_in_time_is_reported_not_fatal(harness):
    """round_timeout_s (the recipe's validation_timeout) ends the wait; the silent site is listed."""
    initial = {"w": torch.ones(2, 2)}
    server = harness.start(initial, SITES, mode="evaluate", min_clients=3, round_timeout_s=1.0)
    sessions = {s: harness.session(server, s) for s in SITES}
    for session in sessions.values():
        session.connect(timeout=WAIT_S)
    for site in ("site-1", "site-3"):
        model = sessions[site].receive(timeout=WAIT_S)
        assert model is not None and sessions[site].task_name == "validate"
        assert torch.equal(model.params["w"], initial["w"])
        sessions[site].send(FLModel(metrics={"accuracy": 0.5 if site == "site-1" else 0.7}))
    assert sessions["site-2"].receive(timeout=WAIT_S) is not None  # it got the task, and stays silent
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    report = server.controller.evaluation
    assert report["failed"] == {"site-2": "no answer within round_timeout_s=1"}
    assert report["mean"] == {"accuracy": pytest.approx(0.6)} and report["answered"] == ["site-1", "site-3"]
    assert json.loads(server.controller.evaluation_path.read_text()) == report
    assert not server.persistor.global_model_path.exists() and not server.persistor.best_model_path.exists()
