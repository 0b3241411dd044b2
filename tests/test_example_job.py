"""The example as a user runs it: job.py through the simulator and the real server, learning digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flkit.server.persistor import load_params

from conftest import REPO

EXAMPLE = REPO / "examples" / "cifar10"
DIGITS_ARGS = ["--script_args", "--dataset digits", "--num_rounds", "5"]


def test_committed_job_folder_matches_a_fresh_export(tmp_path):
    """jobs/cifar10_fedavg is what job.py exports; regenerate it when the example changes:
    cd examples/cifar10 && python job.py --script_args "--dataset digits" --num_rounds 5 --export_only --export_dir ../../jobs
    """
    subprocess.run([sys.executable, "job.py", *DIGITS_ARGS, "--export_only", "--export_dir", str(tmp_path)],
                   cwd=EXAMPLE, check=True, capture_output=True, timeout=120)
    fresh, committed = tmp_path / "cifar10_fedavg", REPO / "jobs" / "cifar10_fedavg"
    names = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file()
                           and "__pycache__" not in p.parts)
    for name in names:
        assert (fresh / name).read_bytes() == (committed / name).read_bytes(), f"jobs/cifar10_fedavg/{name} is stale"


@pytest.mark.slow
def test_example_job_reaches_90_percent_on_digits(tmp_path):
    ws = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "job.py", "--script", "src/cifar10_fl.py", *DIGITS_ARGS,
                           "--workspace", str(ws)], cwd=EXAMPLE, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[site-1]" in out and "[site-2]" in out and "job completed" in out

    state = json.loads((ws / "server" / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 5
    scores = {r["round"]: r["score"] for r in state["history"]}
    assert max(scores.values()) >= 0.90, scores
    assert state["best"]["round"] == max(scores, key=scores.get)

    # The best model file loads into Net and scores what the sites reported for it.
    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        import data
        from net import Net
    finally:
        sys.path.remove(str(EXAMPLE / "src"))
    net = Net()
    net.load_state_dict(load_params(ws / "server" / "best_FL_global_model.safetensors"))
    _, testset = data.load_datasets("digits")
    x, y = testset.tensors
    with torch.no_grad():
        acc = (net.eval()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.90 and abs(acc - state["best"]["score"]) < 1e-6
    assert Path(ws / "server" / "FL_global_model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_example_runs_as_users_type_it(tmp_path):
    """The README's command: 2 sites, each a 2-rank torchrun (gloo on CPU), ports from --ports."""
    from flkit.runner.ports import free_port

    ports = f"{free_port()},{free_port()}"
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "job.py", "--script", "src/cifar10_ddp_fl.py", "--script_args", "--dataset digits --epochs 1",
         "--num_rounds", "2", "--launch_process", "--launch_command",
         "python3 -m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_port={PORT}",
         "--ports", ports, "--workspace", str(ws)],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    state = json.loads((ws / "server" / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 2
    assert all(sorted(r["metrics"]) == ["site-1", "site-2"] for r in state["history"])
    for site, port in zip(("site-1", "site-2"), ports.split(","), strict=True):
        log = (ws / site / "output.log").read_text()
        assert f"--master_port={port}" in log  # each site's own rendezvous port
        assert log.count("Accuracy before training") == 3  # rank 0 only: 2 train tasks + 1 validate


@pytest.mark.slow
def test_lightning_example_reaches_90_percent_on_digits(tmp_path):
    """The Lightning README command: 2 in-process sites, best model by val_acc_epoch."""
    ws = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "job.py", "--script", "src/cifar10_lightning_fl.py", "--key_metric",
                           "val_acc_epoch", *DIGITS_ARGS, "--workspace", str(ws)],
                          cwd=EXAMPLE, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    state = json.loads((ws / "server" / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 5
    scores = {r["round"]: r["score"] for r in state["history"]}
    assert max(scores.values()) >= 0.90, scores
    assert state["best"]["round"] == max(scores, key=scores.get)

    sys.path.insert(0, str(EXAMPLE / "src"))
    try:
        import data
        from lit_net import LitNet
    finally:
        sys.path.remove(str(EXAMPLE / "src"))
    model = LitNet()
    model.load_state_dict(load_params(ws / "server" / "best_FL_global_model.safetensors"))
    _, testset = data.load_datasets("digits")
    x, y = testset.tensors
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.90 and abs(acc - state["best"]["score"]) < 1e-6
    for site in ("site-1", "site-2"):  # Lightning's own outputs stay in each site's folder
        assert (ws / site / "lightning_logs").is_dir()


@pytest.mark.slow
def test_lightning_ddp_example_runs_as_users_type_it(tmp_path):
    """2 sites, each a Lightning Trainer(strategy="ddp", devices=2) on CPU started as `python3 -u`."""
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "job.py", "--script", "src/cifar10_lightning_ddp_fl.py", "--launch_process",
         "--script_args", "--dataset digits --epochs 1", "--num_rounds", "1", "--workspace", str(ws)],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    state = json.loads((ws / "server" / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 1
    assert all(sorted(r["metrics"]) == ["site-1", "site-2"] for r in state["history"])
    for site in ("site-1", "site-2"):
        assert "[rank: 1]" in (ws / site / "output.log").read_text()  # Lightning started the second rank


@pytest.mark.slow
def test_mission_command_runs_with_external_processes_and_unused_ports(tmp_path):
    """`python job.py --script src/cifar10_fl.py --launch_process --ports 7777,8888`, as users type it
    (with the offline data): the launch command has no {PORT}, so the ports are noted as unused."""
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [sys.executable, "job.py", "--script", "src/cifar10_fl.py", "--launch_process", "--ports", "7777,8888",
         "--script_args", "--dataset digits --epochs 1", "--num_rounds", "1", "--workspace", str(ws)],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("--ports 7777,8888 is not used (--launch_command has no {PORT})") == 1
    state = json.loads((ws / "server" / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 1
    for site in ("site-1", "site-2"):
        log = (ws / site / "output.log").read_text()
        assert "custom/src/cifar10_fl.py --dataset digits --epochs 1" in log.splitlines()[0]
