"""NVFlare job scripts run on flkit with only their import lines changed, as users run them.

The scripts (tests/nvflare_jobs) are our own, in the shapes of NVFlare 2.6's job API examples
(hello-world/ml-to-fl/pt) and main's recipe examples (hello-world/hello-pt, and
hello-lightning-eval's FedEvalRecipe job); each test copies one,
changes its nvflare imports to flkit ones, and runs `python <job script>` in a subprocess.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import NVFLARE_JOBS, nvflare_to_flkit

ML_TO_FL = NVFLARE_JOBS / "ml_to_fl"
HELLO_PT = NVFLARE_JOBS / "hello_pt"


def _run(folder: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None):
    proc = subprocess.run([sys.executable, *args], cwd=folder, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _state(workspace: Path) -> dict:
    return json.loads((workspace / "server" / "round_state.json").read_text())


def _module(path: Path):
    """The job folder's own module (by file, so another test's `data` or `model` cannot stand in)."""
    spec = importlib.util.spec_from_file_location(f"nvflare_job_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _accuracy(params: dict[str, torch.Tensor], folder: Path) -> float:
    """What a site's evaluate() gives for ``params``: the digits test set, the job's own network."""
    net = _module(folder / "model.py").SimpleNetwork()
    net.load_state_dict(params)
    net.eval()
    _, testset = _module(folder / "data.py").load()
    x, y = testset.tensors
    with torch.no_grad():
        return (net(x).argmax(1) == y).sum().item() / len(y)


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_26_client_api_job_runs_in_process_with_gpu_0_on_cpu(tmp_path):
    job = nvflare_to_flkit(ML_TO_FL, tmp_path / "job")
    ws = tmp_path / "ws"
    proc = _run(job, "pt_client_api_job.py", "--workdir", str(ws))
    if not torch.cuda.is_available():  # with CUDA, the sites use device 0
        assert "gpu='0' was given but CUDA is not available" in proc.stderr
    state = _state(ws)
    assert state["status"] == "completed"
    # NVFlare's FedAvg: train rounds only, no extra validation task.
    assert [r["task"] for r in state["history"]] == ["train", "train"]
    assert all(sorted(r["metrics"]) == ["site-1", "site-2"] for r in state["history"])
    assert state["history"][-1]["score"] > 0.5  # the global model after one round (chance: 0.1)
    assert "IgnoredArgumentWarning" not in proc.stderr  # framework=FrameworkType.PYTORCH is honoured


@pytest.mark.parametrize("variant", [[], ["--base_fed_job"]], ids=["FedJob", "BaseFedJob"])
def test_getting_started_job_puts_controller_model_and_selector_on_the_server(tmp_path, variant):
    job = nvflare_to_flkit(ML_TO_FL, tmp_path / "job")
    ws = tmp_path / "ws"
    _run(job, "getting_started_job.py", "--workdir", str(ws), "--export_dir", str(tmp_path / "jobs"), *variant)
    state = _state(ws)
    # FedAvg(num_clients=2, num_rounds=2): both sites answer two rounds; the selector keeps the best.
    assert state["status"] == "completed" and [r["task"] for r in state["history"]] == ["train", "train"]
    assert state["key_metric"] == "accuracy" and state["best"]["round"] == 1
    assert (ws / "server" / "best_FL_global_model.safetensors").is_file()
    exported = json.loads((tmp_path / "jobs" / "cifar10_pt_fedavg" / "job.json").read_text())
    assert sorted(exported["sites"]) == ["site-1", "site-2"]
    assert exported["workflow"]["clients_per_round"] == 2 and exported["workflow"]["min_clients"] == 2


@pytest.mark.slow
def test_26_client_api_job_with_external_processes_runs_nvflare_launch_commands(tmp_path):
    job = nvflare_to_flkit(ML_TO_FL, tmp_path / "job")
    ws = tmp_path / "ws"
    _run(job, "pt_client_api_job.py", "--workdir", str(ws), "--launch_external_process")
    assert _state(ws)["status"] == "completed"
    for site in ("site-1", "site-2"):
        folder = ws / site
        # NVFlare's layout: the site's folder holds custom/ with the job's code, and the script is
        # started as `python3 -u custom/src/cifar10_fl.py` from there.
        assert (folder / "custom" / "src" / "cifar10_fl.py").is_file()
        assert "custom/src/cifar10_fl.py" in (folder / "output.log").read_text().splitlines()[0]
        # Relative paths stay per site: each wrote its own ./cifar_net.pth.
        assert (folder / "cifar_net.pth").is_file()
    assert not (job / "cifar_net.pth").exists()


def test_26_lightning_job_with_subprocess_launcher_and_progress_bars_in_process(tmp_path):
    job = nvflare_to_flkit(ML_TO_FL, tmp_path / "job")
    ws = tmp_path / "ws"
    proc = _run(job, "lightning_job.py", "--workdir", str(ws), "--num_rounds", "3")
    # The launcher has no use in-process; the warning says so once, not once per site.
    assert proc.stderr.count("BaseScriptRunner: launcher is accepted but has no effect") == 1, proc.stderr
    state = _state(ws)
    assert state["status"] == "completed" and [r["task"] for r in state["history"]] == ["train"] * 3
    assert state["best"]["score"] > 0.4  # the sites learn: chance is 0.1
    for site in ("site-1", "site-2"):
        # Lightning's own choice of progress bar, left on, in two sites of one process.
        assert (ws / site / "progress_bar.txt").read_text() == "RichProgressBar"
        assert (ws / site / "lightning_logs").is_dir()


@pytest.mark.slow
def test_26_lightning_job_external_uses_the_launchers_command(tmp_path):
    job = nvflare_to_flkit(ML_TO_FL, tmp_path / "job")
    ws = tmp_path / "ws"
    proc = _run(job, "lightning_job.py", "--workdir", str(ws), "--launch_external_process")
    assert "launcher is accepted" not in proc.stderr
    assert _state(ws)["status"] == "completed"
    for site in ("site-1", "site-2"):
        first = (ws / site / "output.log").read_text().splitlines()[0]
        assert re.search(r"=== flkit launch 1: \S*python\S* -u custom/src/cifar10_lightning_fl.py$", first), first
        assert (ws / site / "progress_bar.txt").read_text() == "RichProgressBar"


def _check_recipe_result(result: Path, job: Path, sites: tuple[str, ...] = ("site-1", "site-2")) -> None:
    server = result / "server"
    state = json.loads((server / "round_state.json").read_text())
    assert state["status"] == "completed" and [r["task"] for r in state["history"]] == ["train", "train"]
    # The best model is the global model whose received-model score was best.
    best = load_file(server / "best_FL_global_model.safetensors")
    assert abs(_accuracy(best, job) - state["best"]["score"]) < 1e-9
    # TensorBoard event files per site, from what each site's SummaryWriter logged.
    for site in sites:
        events = _events(server / "tb_events" / site)
        assert [step for step, _ in events["loss"]] == [0, 1, 2, 3]  # 2 rounds x 2 epochs
        # ... with the values the site's script logged (its own tracking.jsonl; TensorBoard keeps float32)
        logged = [json.loads(line) for line in (result / site / "tracking.jsonl").read_text().splitlines()]
        assert [value for _, value in events["loss"]] == pytest.approx([r["value"] for r in logged], rel=1e-6)


def test_recipe_with_simenv_tracking_and_cross_site_evaluation(tmp_path):
    job = nvflare_to_flkit(HELLO_PT, tmp_path / "job")
    proc = _run(job, "job.py", "--cross_site_eval", "--workspace_root", str(tmp_path / "sim"))
    assert "Job Status is: FINISHED:COMPLETED" in proc.stdout
    result = Path(re.search(r"Result can be found in : (\S+)", proc.stdout).group(1))
    assert result == tmp_path / "sim" / "hello-pt"
    _check_recipe_result(result, job)

    # The cross-site matrix, in NVFlare's shape {evaluator: {model: {metric: value}}}: every site
    # scored the final and the best global model and both sites' own models, and each score is
    # what that model file really scores on the (shared) test set.
    server = result / "server"
    matrix = json.loads((server / "cross_site_val" / "cross_val_results.json").read_text())
    models = {"SRV_FL_global_model.safetensors": server / "FL_global_model.safetensors",
              "SRV_best_FL_global_model.safetensors": server / "best_FL_global_model.safetensors",
              "site-1": server / "cross_site_val" / "models" / "site-1.safetensors",
              "site-2": server / "cross_site_val" / "models" / "site-2.safetensors"}
    assert sorted(matrix) == ["site-1", "site-2"]
    for evaluator, scores in matrix.items():
        assert sorted(scores) == sorted(models), evaluator
        for name, path in models.items():
            assert scores[name]["accuracy"] == pytest.approx(_accuracy(load_file(path), job), abs=1e-9)
    assert "cross-site evaluation" in proc.stdout


@pytest.mark.slow
def test_recipe_in_pocenv_runs_server_and_sites_as_processes(tmp_path):
    job = nvflare_to_flkit(HELLO_PT, tmp_path / "job")
    proc = _run(job, "job.py", "--poc", env={"FLKIT_POC_WORKSPACE": str(tmp_path / "poc")})
    statuses = re.findall(r"Job Status is: (\S+)", proc.stdout)
    assert statuses[-1] == "FINISHED:COMPLETED", proc.stdout
    result = Path(re.search(r"Result can be found in : (\S+)", proc.stdout).group(1))
    assert result.parent == tmp_path / "poc" and result.name.startswith("hello-pt-")
    _check_recipe_result(result, job)
    for name in ("server", "site-1", "site-2"):
        assert (result / "logs" / f"{name}.log").is_file()
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(result) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]


@pytest.mark.slow
def test_fedeval_recipe_job_in_pocenv_scores_a_saved_model_at_every_site(tmp_path):
    """main's FedEvalRecipe, run as its hello-lightning-eval job.py runs it (here with hello-pt's
    client.py, whose validate answer is the metrics alone), in a PocEnv: `flkit server` and
    `flkit client` are processes of their own (tests/test_evaluate_only.py runs it in SimEnv)."""
    job = nvflare_to_flkit(HELLO_PT, tmp_path / "job")
    torch.manual_seed(0)
    model = _module(job / "model.py").SimpleNetwork()
    trainset, _ = _module(job / "data.py").load()
    x, y = trainset.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, 1280, 32):  # 40 steps: a model that scores well above chance
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
        optimizer.step()
    ckpt = tmp_path / "pretrained_model.pt"
    torch.save(model.state_dict(), ckpt)
    saved = ckpt.read_bytes()
    proc = _run(job, "eval_job.py", "--checkpoint", str(ckpt), "--poc",
                env={"FLKIT_POC_WORKSPACE": str(tmp_path / "poc")})
    assert re.findall(r"Job Status is: (\S+)", proc.stdout)[-1] == "FINISHED:COMPLETED", proc.stdout
    result = Path(re.search(r"Result can be found in : (\S+)", proc.stdout).group(1))
    report = json.loads((result / "server" / "evaluation.json").read_text())
    expected = _accuracy(model.state_dict(), job)
    assert expected > 0.5
    assert report["metrics"] == {"site-1": {"accuracy": pytest.approx(expected, abs=1e-9)},
                                 "site-2": {"accuracy": pytest.approx(expected, abs=1e-9)}}
    assert (report["failed"], report["status"]) == ({}, "completed")
    assert report["model"]["sha256"] == hashlib.sha256(saved).hexdigest() and ckpt.read_bytes() == saved
    printed = (result / "logs" / "server.log").read_text()  # what `flkit server` printed
    assert f"{expected:.4f}" in printed and "mean (2 site(s))" in printed
