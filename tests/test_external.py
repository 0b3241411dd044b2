"""Sites as external processes: plain `python3 -u`, and `torch.distributed.run` with gloo DDP.

Every test runs real subprocesses against the real server on loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from flkit.errors import JobFailedError
from flkit.job import FedAvgJob, ScriptRunner
from flkit.server.persistor import load_params

from conftest import REPO, SCRIPTS, with_flkit_import

sys.path.insert(0, str(SCRIPTS))
from digits_task import SmallNet, accuracy, load  # noqa: E402

TORCHRUN = "python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port={PORT}"


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_two_external_sites_learn_digits(tmp_path):
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_fl.py", tmp_path / "code")
    torch.manual_seed(0)
    job = FedAvgJob(name="external", initial_model=SmallNet(), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(script), script_args="--epochs 2", launch_external_process=True,
                                command="python3 -u"))
    result = job.simulator_run(tmp_path / "ws", quiet=True)

    assert result.ok, result.reason
    assert [r.task for r in result.rounds] == ["train", "train", "train"]  # NVFlare's FedAvg: no extra task
    best = SmallNet()
    best.load_state_dict(load_params(result.best_model_path))
    _, _, test_x, test_y = load()
    assert accuracy(best, test_x, test_y) >= 0.85
    # Each site ran in its own workspace folder, which also keeps the script's output.
    for site in ("site-1", "site-2"):
        assert (tmp_path / "ws" / site / "tracking.jsonl").is_file()
        assert f"site={site} current_round=2" in (tmp_path / "ws" / site / "output.log").read_text()


def _weighted_mean(paths_and_weights: list[tuple[Path, float]]) -> dict[str, torch.Tensor]:
    total = sum(w for _, w in paths_and_weights)
    out: dict[str, torch.Tensor] = {}
    for path, weight in paths_and_weights:
        for name, value in load_file(path).items():
            out[name] = out.get(name, 0) + value.double() * (weight / total)
    return out


def _assert_params_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        if actual[name].dtype.is_floating_point:
            torch.testing.assert_close(actual[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
        else:  # integer buffers are averaged exactly and rounded
            assert torch.equal(actual[name], value.round().to(actual[name].dtype)), name


@pytest.mark.slow
def test_nvflare_ddp_script_under_torchrun_aggregates_rank0_results(tmp_path):
    """2 sites x torchrun --nproc_per_node=2 (gloo), NVFlare's DDP pattern with only its import changed."""
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_ddp_fl.py", tmp_path / "code")
    torch.manual_seed(0)
    # final_validation: a validate task too, so is_evaluate() is checked on every rank
    job = FedAvgJob(name="ddp", initial_model=SmallNet(), n_clients=2, num_rounds=2, final_validation=True)
    job.to_clients(ScriptRunner(script=str(script), launch_external_process=True, command=TORCHRUN))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason

    ws = tmp_path / "ws"
    steps = {"site-1": 10, "site-2": 20}  # 320 rows / 32 per batch x (site index) epochs
    for site in steps:
        seen = [(ws / site / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
        # Both ranks went through the same tasks with the same params, and left the loop together.
        assert seen[0] == seen[1]
        tasks = [(e["round"], e["task"], e["is_train"], e["is_evaluate"]) for e in map(json.loads, seen[0])]
        assert tasks == [(0, "train", True, False), (1, "train", True, False), (2, "validate", False, True)]

    def sent(rnd: int) -> list[tuple[Path, float]]:
        return [(ws / site / f"sent_round{rnd}.safetensors", float(n)) for site, n in steps.items()]

    # Round 1's global model, as every rank of every site received it, is the steps-weighted
    # mean of what the two rank 0s sent in round 0; the final model is that of round 1.
    expected_round1 = _weighted_mean(sent(0))
    for site in steps:
        for rank in (0, 1):
            _assert_params_equal(load_file(ws / site / f"received_round1_rank{rank}.safetensors"), expected_round1)
    _assert_params_equal(load_params(result.global_model_path), _weighted_mean(sent(1)))


@pytest.mark.slow
def test_rank_raising_mid_round_fails_the_site_and_leaves_no_process(tmp_path):
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_ddp_fl.py", tmp_path / "code")
    job = FedAvgJob(name="ddp_crash", initial_model=SmallNet(), n_clients=2, num_rounds=3)
    job.to(ScriptRunner(str(script), "--crash_rank 1 --crash_round 1", launch_external_process=True,
                        command=TORCHRUN), "site-1")
    job.to(ScriptRunner(str(script), launch_external_process=True, command=TORCHRUN), "site-2")
    with pytest.raises(JobFailedError) as failure:
        job.simulator_run(tmp_path / "ws", quiet=True)

    message = str(failure.value)
    assert "site-1: script nvflare_cifar10_ddp_fl.py exited with status 1" in message
    state = json.loads((tmp_path / "ws" / "server" / "round_state.json").read_text())
    assert state["status"] == "failed" and state["completed_rounds"] == 1
    # The server learned of the failure from the runner (exit status and stderr), not from a
    # heartbeat timeout: the crash's traceback is in the site's failure report.
    log = (tmp_path / "ws" / "site-1" / "output.log").read_text()
    assert "RuntimeError: deliberate failure on rank 1 in round 1" in log
    # No rank, and no torchrun agent, of either site survives.
    for site in ("site-1", "site-2"):
        for rank in (0, 1):
            pid, agent = map(int, (tmp_path / "ws" / site / f"pid_rank{rank}.txt").read_text().split())
            assert _gone(pid) and _gone(agent), f"{site} rank {rank}: pid {pid} or agent {agent} still runs"


def test_crash_report_has_exit_status_and_stderr_tail_in_server_log_and_summary(tmp_path, caplog):
    """A plain external script that crashes: its exit status and last stderr lines reach the server."""
    from flkit.sim.simulator import simulate

    job = FedAvgJob(name="crash_ext", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=2)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"), script_args="--crash_round 1",
                                launch_external_process=True))
    with caplog.at_level("WARNING", logger="flkit.server"):
        result = simulate(job.export_job(tmp_path / "jobs"), tmp_path / "ws", quiet=True)

    assert not result.ok and "site-2" in result.reason
    error = result.site_errors["site-2"]
    assert error.startswith("script crash_in_round.py exited with status 1")
    assert "lines of stderr:" in error and "RuntimeError: deliberate failure in round 1" in error
    server_log = "\n".join(r.getMessage() for r in caplog.records if r.name == "flkit.server")
    assert "site site-2 failed: script crash_in_round.py exited with status 1" in server_log
    assert "RuntimeError: deliberate failure in round 1" in server_log


def test_script_that_never_calls_init_in_time_fails_the_site(tmp_path):
    job = FedAvgJob(name="slow_init", initial_model=torch.nn.Linear(4, 2), n_clients=1, num_rounds=1)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "slow_init.py"), launch_external_process=True,
                                init_timeout_s=2))
    with pytest.raises(JobFailedError, match=r"did not call flkit.init\(\) within 2 s"):
        job.simulator_run(tmp_path / "ws", quiet=True)
    pid = int((tmp_path / "ws" / "site-1" / "slow_init.pid").read_text())
    assert _gone(pid)


def test_launch_once_false_launches_the_script_once_per_task(tmp_path):
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_fl.py", tmp_path / "code")
    torch.manual_seed(0)
    job = FedAvgJob(name="per_task", initial_model=SmallNet(), n_clients=2, num_rounds=2, final_validation=True)
    job.to_clients(ScriptRunner(script=str(script), script_args="--epochs 1", launch_external_process=True,
                                launch_once=False))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    assert [r.task for r in result.rounds] == ["train", "train", "validate"]
    assert all(len(r.metrics) == 2 for r in result.rounds)
    for site in ("site-1", "site-2"):
        # One process per task: three launches, each of which got exactly one task.
        output = (tmp_path / "ws" / site / "output.log").read_text()
        assert [line.split("current_round=")[1] for line in output.splitlines() if "current_round=" in line] == [
            "0", "1", "2"]
        assert output.count("=== flkit launch ") == 3


def test_in_process_runner_refuses_launch_once_false():
    from flkit.errors import ConfigError

    with pytest.raises(ConfigError, match="launch_once=False .* needs launch_external_process=True"):
        ScriptRunner(script=str(SCRIPTS / "one_round.py"), launch_once=False)


def _hanging_ddp_job(tmp_path: Path) -> Path:
    script = with_flkit_import(SCRIPTS / "nvflare_cifar10_ddp_fl.py", tmp_path / "code")
    job = FedAvgJob(name="hang", initial_model=SmallNet(), n_clients=1, num_rounds=1)
    job.to_clients(ScriptRunner(script=str(script), script_args="--hang", launch_external_process=True,
                                command=TORCHRUN))
    return job.export_job(tmp_path / "jobs")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-then-sigkill", "sigkill"])
def test_killing_the_launcher_leaves_no_process_behind(tmp_path, how):
    job_dir = _hanging_ddp_job(tmp_path)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flkit.cli", "simulate", str(job_dir), "-w", str(tmp_path / "ws")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )
    try:
        ready = set()
        for line in launcher.stdout:  # both ranks report READY once they are mid-round
            ready.update(re.findall(r"READY rank=(\d+)", line))  # two ranks' lines can interleave
            if len(ready) == 2:
                break
        assert len(ready) == 2, "the ranks never got their task"
        tree = psutil.Process(launcher.pid).children(recursive=True)
        assert len(tree) >= 3  # torchrun's agent and its two workers
        if how == "sigterm-then-sigkill":
            launcher.send_signal(signal.SIGTERM)
            try:
                launcher.wait(timeout=30)  # it ends its sites' process trees, then exits
            except subprocess.TimeoutExpired:
                pass
        launcher.kill()
        launcher.wait(timeout=30)
        _, alive = psutil.wait_procs(tree, timeout=60)
        assert not [p for p in alive if not _gone(p.pid)], f"survivors: {alive}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.stdout.close()


def test_job_py_names_the_site_whose_port_is_taken(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as probe:  # a port free right now (port + 1 may be anyone's)
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "job.py", "--script", "src/cifar10_ddp_fl.py", "--launch_process",
             "--launch_command", TORCHRUN, "--ports", f"{free},{port}", "--workspace", str(tmp_path / "ws")],
            cwd=REPO / "examples" / "cifar10", capture_output=True, text=True, timeout=60,
        )
    assert proc.returncode == 2
    assert f"port {port} of site-2 is already in use" in proc.stderr
    assert not (tmp_path / "ws").exists()  # nothing started


def test_follower_without_process_group_fails_fast_instead_of_hanging(monkeypatch):
    from flkit.client.follower import FollowerSession
    from flkit.client.settings import SiteSettings
    from flkit.errors import ConfigError

    settings = SiteSettings(server="127.0.0.1:1", site_name="site-1", job_id="j", token="t")
    follower = FollowerSession(settings, rank=1, world_size=2)
    with pytest.raises(ConfigError, match="no torch.distributed process group is initialised"):
        follower.is_running()
    with pytest.raises(ConfigError, match="no torch.distributed process group is initialised"):
        follower.receive()


def test_launch_once_false_crash_is_reported_with_its_stderr(tmp_path):
    from flkit.sim.simulator import simulate

    job = FedAvgJob(name="per_task_crash", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=3)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"), script_args="--crash_round 1",
                                launch_external_process=True, launch_once=False))
    result = simulate(job.export_job(tmp_path / "jobs"), tmp_path / "ws", quiet=True)
    assert not result.ok
    error = result.site_errors["site-2"]
    assert error.startswith("script crash_in_round.py exited with status 1")
    assert "RuntimeError: deliberate failure in round 1" in error
    assert (tmp_path / "ws" / "site-2" / "output.log").read_text().count("=== flkit launch ") == 2


@pytest.mark.slow
def test_a_ddp_site_waits_longer_than_its_process_group_timeout_between_tasks(tmp_path):
    """site-1 is a 2-rank torchrun whose gloo group times out after 3 s; site-2 takes 6 s per task,
    so site-1's ranks wait 6 s for each next task. Rank 0 tells the other rank it still waits
    (every third of the group's timeout), so neither rank's collective times out."""
    code = tmp_path / "code"
    code.mkdir()
    for name in ("ddp_sit_out.py", "slow_answer.py"):
        shutil.copy(SCRIPTS / name, code / name)
    job = FedAvgJob(name="sit_out", initial_model={"w": torch.zeros(3)}, n_clients=2, num_rounds=2, key_metric=None)
    job.to(ScriptRunner(script=str(code / "ddp_sit_out.py"), launch_external_process=True, command=TORCHRUN),
           "site-1")
    job.to(ScriptRunner(script=str(code / "slow_answer.py")), "site-2")
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    for rank in (0, 1):
        lines = (tmp_path / "ws" / "site-1" / f"rounds_rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(x)["round"] for x in lines] == [0, 1], rank
    assert torch.equal(load_params(result.global_model_path)["w"], torch.full((3,), 2.0))
