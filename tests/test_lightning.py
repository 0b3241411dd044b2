"""flkit_lightning: patch(trainer) against the real server, in-process and as Lightning DDP.

The scripts under tests/scripts record, per round and rank, what they received, loaded,
validated and trained; the tests hold those records against what the server kept.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import flkit_lightning
from flkit.errors import FLKitError, JobFailedError, ValidationError
from flkit.job import FedAvgJob, ScriptRunner
from flkit.server.persistor import load_params
from flkit_lightning.params import load_global_params

from conftest import SCRIPTS, with_flkit_import

sys.path.insert(0, str(SCRIPTS))
from digits_task import accuracy, load  # noqa: E402
from lit_digits import LitSmall  # noqa: E402

SCRIPT = SCRIPTS / "lit_digits_fl.py"
KEY = "val_acc_epoch"


def _records(record_dir: Path, site: str, rank: int = 0) -> list[dict]:
    lines = (record_dir / f"{site}-rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _run(tmp_path: Path, script_args: str = "", num_rounds: int = 3, external: bool = False, **job_kw):
    torch.manual_seed(0)
    job_kw.setdefault("final_validation", True)  # the validate task's path is part of what these tests check
    job = FedAvgJob(name="lit", initial_model=LitSmall(), n_clients=2, num_rounds=num_rounds, key_metric=KEY,
                    **job_kw)
    job.to_clients(ScriptRunner(script=str(SCRIPT), script_args=f"--record_dir {tmp_path / 'rec'} {script_args}",
                                launch_external_process=external, command="python3 -u"))
    return job.simulator_run(tmp_path / "ws", quiet=True)


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory):
    """2 in-process sites, 3 rounds + final validation; site-1 takes 23 steps per epoch, site-2 12."""
    tmp_path = tmp_path_factory.mktemp("lit")
    cwd = Path.cwd()
    os.chdir(tmp_path)  # the launcher's working directory, which the sites must not write into
    try:
        result = _run(tmp_path)
    finally:
        os.chdir(cwd)
    assert result.ok, result.reason
    return tmp_path, result


def test_key_metric_comes_from_the_explicit_validate_of_the_global_model(in_process_run):
    tmp_path, result = in_process_run
    for site in ("site-1", "site-2"):
        for rec in _records(tmp_path / "rec", site):
            server_metrics = result.rounds[rec["round"]].metrics[site]
            assert server_metrics == pytest.approx(rec["validated"])
            assert rec["loaded"] == pytest.approx(rec["received"])  # validate() saw the global model
            if rec["task"] == "train":  # fit()'s own validation scored the local model: not sent
                # (the loss, not the accuracy: 360 test images can give the same accuracy twice)
                assert rec["fit_metrics"]["val_loss"] != pytest.approx(rec["validated"]["val_loss"])


def test_best_round_is_the_round_whose_global_model_validated_best(in_process_run):
    tmp_path, result = in_process_run
    recorded = {}  # round -> mean over sites of the explicit validate() of the received model
    for site in ("site-1", "site-2"):
        for rec in _records(tmp_path / "rec", site):
            recorded.setdefault(rec["round"], []).append(rec["validated"][KEY])
    means = {r: sum(v) / len(v) for r, v in recorded.items()}
    assert len(means) == 4 and result.best_round == max(means, key=means.get)
    assert result.best_score == pytest.approx(means[result.best_round])
    # The saved best model is the very model the sites validated in that round.
    best = load_params(result.best_model_path)
    received = _records(tmp_path / "rec", "site-1")[result.best_round]["received"]
    assert float(sum(v.double().sum() for v in best.values())) == pytest.approx(received)
    net = LitSmall()
    net.load_state_dict(best)
    _, _, test_x, test_y = load()
    assert accuracy(net.model, test_x, test_y) >= 0.90  # learns: >= 90 % on digits within 3 rounds


def test_each_round_trains_the_trainers_budget_and_sends_its_steps(in_process_run):
    tmp_path, result = in_process_run
    steps_by_site = {}
    for site in ("site-1", "site-2"):
        records = _records(tmp_path / "rec", site)
        per_round = records[0]["batches"]  # max_epochs=1: one epoch of this site's shard per round
        steps_by_site[site] = per_round
        train = [rec for rec in records if rec["task"] == "train"]
        assert [rec["global_step"] for rec in train] == [per_round * r for r in (1, 2, 3)]
        final = records[-1]
        assert final["task"] == "validate" and final["steps"] == 0  # the final validate task trains nothing
    assert steps_by_site == {"site-1": 23, "site-2": 12}
    # NUM_STEPS_CURRENT_ROUND: the final global model is the steps-weighted mean of the last round.
    sent = {site: load_file(tmp_path / "rec" / f"{site}-round2.safetensors") for site in steps_by_site}
    total = sum(steps_by_site.values())
    final_global = load_params(result.global_model_path)
    for name, value in final_global.items():
        expected = sum(sent[s][name].double() * steps_by_site[s] / total for s in sent)
        if value.dtype.is_floating_point:
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_optimizer_and_scheduler_state_carry_over_between_rounds(in_process_run):
    tmp_path, _ = in_process_run
    records = [rec for rec in _records(tmp_path / "rec", "site-1") if rec["task"] == "train"]
    steps = records[0]["batches"]
    assert [rec["at_start"]["adam_step"] for rec in records] == [0.0, steps, 2 * steps]
    assert [rec["at_start"]["sched_last_epoch"] for rec in records] == [0, 1, 2]
    assert [rec["at_start"]["lr"] for rec in records] == pytest.approx([0.01, 0.008, 0.0064])


def test_in_process_sites_keep_lightning_outputs_in_their_workspace(in_process_run):
    tmp_path, _ = in_process_run
    for site in ("site-1", "site-2"):
        assert (tmp_path / "ws" / site / "lightning_logs").is_dir()
    assert not (tmp_path / "lightning_logs").exists()  # the launcher's working directory


def test_without_restore_state_and_validate_each_fit_starts_fresh_and_sends_no_metrics(tmp_path, capfd):
    result = _run(tmp_path, "--restore_state 0 --skip_validate", num_rounds=2)
    assert result.ok, result.reason
    records = _records(tmp_path / "rec", "site-1")
    assert [rec["task"] for rec in records] == ["train", "train", "validate"]
    assert [rec["at_start"]["adam_step"] for rec in records[:2]] == [0.0, 0.0]
    # Neither the sanity check nor fit()'s own validation counts as the round's metrics.
    assert all(rec["fit_metrics"].get(KEY) is not None for rec in records[:2])
    assert [r.metrics for r in result.rounds] == [{"site-1": {}, "site-2": {}}] * 3
    assert result.best_round is None
    err = capfd.readouterr().err  # the sites' warnings, from the worker processes' stderr
    assert "fit() without a validate() of the global model first" in err
    assert "task 'validate' reached fit() before any validate()" in err


def test_nvflare_lightning_script_runs_with_only_its_import_changed(tmp_path):
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_lightning_fl.py", tmp_path / "code")
    torch.manual_seed(0)
    job = FedAvgJob(name="nvflare_lit", initial_model=LitSmall(), n_clients=2, num_rounds=2, key_metric=KEY)
    job.to_clients(ScriptRunner(script=str(script)))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    assert [r.task for r in result.rounds] == ["train", "train"]  # NVFlare's FedAvg sends no extra task
    assert all(KEY in m for r in result.rounds for m in r.metrics.values())
    assert result.best_score >= 0.85
    # Two sites in one process, each with Lightning's own choice of progress bar (rich's, with its
    # process-global console), trained side by side without tripping over each other.
    for site in ("site-1", "site-2"):
        assert (tmp_path / "ws" / site / "progress_bar.txt").read_text() == "RichProgressBar"


@pytest.mark.slow
def test_lightning_ddp_two_ranks_per_site_in_step_and_no_process_left(tmp_path):
    """2 sites x Trainer(strategy="ddp", devices=2, accelerator="cpu"): Lightning starts rank 1 itself."""
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    result = _run(tmp_path, "--devices 2", num_rounds=2, external=True)
    assert result.ok, result.reason
    assert [r.task for r in result.rounds] == ["train", "train", "validate"]
    pids = set()
    for site in ("site-1", "site-2"):
        rank0, rank1 = _records(tmp_path / "rec", site, 0), _records(tmp_path / "rec", site, 1)
        # Both ranks saw the same tasks and params, validated the same, and left the loop together.
        assert [(r["round"], r["task"], r["received"], r["loaded"]) for r in rank0] == \
               [(r["round"], r["task"], r["received"], r["loaded"]) for r in rank1]
        assert [r["validated"] for r in rank0] == [r["validated"] for r in rank1]
        assert [r["round"] for r in rank0] == [0, 1, 2]
        per_round = rank0[0]["batches"]  # per rank: DDP splits the shard
        assert [r["global_step"] for r in rank0] == [per_round, 2 * per_round, 2 * per_round]
        pids |= {r["pid"] for r in rank0 + rank1}
        assert (tmp_path / "ws" / site / "output.log").is_file()
        for round_num, record in enumerate(result.rounds):
            assert record.metrics[site] == pytest.approx(rank0[round_num]["validated"])
    assert len(pids) == 4  # 2 sites x 2 rank processes
    assert {p.pid for p in me.children(recursive=True)} == before
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in pids)


def test_lightning_ddp_in_a_thread_site_is_a_clear_error(tmp_path):
    with pytest.raises(JobFailedError) as info:
        _run(tmp_path, "--devices 2", num_rounds=1)
    message = str(info.value)
    assert "needs processes of its own" in message and "launch_external_process=True" in message


def test_a_global_model_that_does_not_fit_the_module_fails_the_site_naming_the_keys(tmp_path):
    torch.manual_seed(0)
    job = FedAvgJob(name="mismatch", initial_model=torch.nn.Sequential(torch.nn.Linear(4, 2)), n_clients=1,
                    num_rounds=1, key_metric=KEY)
    job.to_clients(ScriptRunner(script=str(SCRIPT), script_args=f"--record_dir {tmp_path / 'rec'}"))
    with pytest.raises(JobFailedError) as info:
        job.simulator_run(tmp_path / "ws", quiet=True)
    message = str(info.value)
    assert "the global model does not fit the LightningModule" in message
    assert "missing keys" in message and "model.conv.weight" in message
    assert "unexpected keys (2): 0.bias, 0.weight" in message


def test_non_strict_loading_loads_the_matching_tensors_and_logs_the_rest(caplog):
    module = LitSmall()
    params = {k: torch.full_like(v, 0.5) for k, v in module.state_dict().items() if k != "model.fc.bias"}
    params["model.conv.weight"] = torch.zeros(3, 3)  # wrong shape
    params["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValidationError, match="missing keys \\(1\\): model.fc.bias"):
        load_global_params(module, params, strict=True, where="site-x, round 0")
    assert not torch.equal(module.state_dict()["model.fc.weight"], torch.full_like(params["model.fc.weight"], 0.5))

    caplog.set_level(logging.WARNING, logger="flkit.lightning")
    mismatch = load_global_params(module, params, strict=False, where="site-x, round 0")
    assert mismatch.missing == ["model.fc.bias"] and mismatch.unexpected == ["extra.weight"]
    assert mismatch.wrong_shape == ["model.conv.weight: received (3, 3), module has (8, 1, 3, 3)"]
    assert torch.equal(module.state_dict()["model.fc.weight"], params["model.fc.weight"])
    assert "site-x, round 0: loading only the matching tensors" in caplog.text
    assert "model.conv.weight: received (3, 3)" in caplog.text


def test_ddp_spawn_is_refused_before_any_process_starts():
    from pytorch_lightning import Trainer

    from flkit.errors import ConfigError
    from flkit_lightning.ranks import start_ranks

    trainer = Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False)
    children = psutil.Process().children(recursive=True)
    with pytest.raises(ConfigError, match="runs each fit\\(\\) in fresh processes"):
        start_ranks(trainer, "site-1")
    assert psutil.Process().children(recursive=True) == children
    assert not torch.distributed.is_initialized()


def test_client_api_before_patch_says_to_call_patch_first():
    for name in ("init", "receive", "is_running", "is_train", "is_evaluate", "is_submit_model", "get_site_name",
                 "get_job_id", "system_info", "is_dry_run", "log", "shutdown", "patch", "FLModel"):
        assert callable(getattr(flkit_lightning, name)), name
    with pytest.raises(FLKitError, match="before patch\\(trainer\\)"):
        flkit_lightning.is_running()
    with pytest.raises(FLKitError, match="before patch\\(trainer\\)"):
        flkit_lightning.receive()
    with pytest.raises(FLKitError, match="before patch\\(trainer\\)"):
        flkit_lightning.is_dry_run()


def test_a_pre_flight_check_trains_one_batch_when_the_script_asks(tmp_path):
    """``if flare.is_dry_run(): trainer.limit_train_batches = trainer.limit_val_batches = 1`` after
    ``patch()``: the check's one task trains one batch, and the callback sends it as one step."""
    job = FedAvgJob(name="lit-check", initial_model=LitSmall(), n_clients=1, num_rounds=3, key_metric=KEY)
    job.to_clients(ScriptRunner(script=str(SCRIPT),
                                script_args=f"--record_dir {tmp_path / 'records'} --one_batch_when_checked"))
    result = job.simulator_run(dry_run=True, backend="threads", quiet=True)
    assert result.check.passed and result.check.sites["site-1"].num_steps == 1
    assert KEY in result.check.sites["site-1"].metrics
    (record,) = _records(tmp_path / "records", "site-1")
    assert (record["steps"], record["batches"]) == (1, 1)
