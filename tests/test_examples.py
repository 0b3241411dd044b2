"""The CIFAR-10 example keeps its promises: a small FL diff, a README in sync, a script that learns.

None of these tests start an FL server; they check the example's own pieces (the scripts,
the data sharding, job.py's option handling) quickly enough to run on every change.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cifar10"
ORIGINAL = "src/cifar10_original.py"
FL = "src/cifar10_fl.py"
DDP_ORIGINAL = "src/cifar10_ddp_original.py"
DDP_FL = "src/cifar10_ddp_fl.py"
LIT_ORIGINAL = "src/cifar10_lightning_original.py"
LIT_FL = "src/cifar10_lightning_fl.py"
LIT_DDP_ORIGINAL = "src/cifar10_lightning_ddp_original.py"
LIT_DDP_FL = "src/cifar10_lightning_ddp_fl.py"
MAX_CHANGED_LINES = 8

JOB_OPTIONS = [
    "--script",
    "--script_args",
    "--n_clients",
    "--num_rounds",
    "--key_metric",
    "--launch_process",
    "--launch_external_process",
    "--launch_command",
    "--ports",
    "--export_only",
    "--export_dir",
    "--workspace",
    "--threads",
    "--workers",
    "--backend",
]


def _load_data_module() -> ModuleType:
    # Loaded under its own name: a bare `import data` could pick up some other module called data.
    spec = importlib.util.spec_from_file_location("cifar10_example_data", EXAMPLE / "src" / "data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _changed_lines_ignoring_whitespace(a: Path, b: Path) -> list[str]:
    """The `<` and `>` lines of `diff -w a b` (difflib on whitespace-stripped lines without `diff`)."""
    if shutil.which("diff"):
        out = subprocess.run(["diff", "-w", str(a), str(b)], capture_output=True, text=True).stdout
        return [line for line in out.splitlines() if line.startswith(("<", ">"))]
    lines_a, lines_b = a.read_text().splitlines(), b.read_text().splitlines()
    strip = lambda lines: ["".join(line.split()) for line in lines]  # noqa: E731
    changed = []
    matcher = difflib.SequenceMatcher(None, strip(lines_a), strip(lines_b), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            changed += ["< " + line for line in lines_a[i1:i2]] + ["> " + line for line in lines_b[j1:j2]]
    return changed


def _run_job(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "job.py", "--workspace", str(tmp_path / "ws"), "--export_dir", str(tmp_path / "jobs"), *args],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(("original", "fl"), [(ORIGINAL, FL), (DDP_ORIGINAL, DDP_FL), (LIT_ORIGINAL, LIT_FL),
                                             (LIT_DDP_ORIGINAL, LIT_DDP_FL)])
def test_fl_script_differs_from_original_in_at_most_8_lines(original, fl):
    changed = _changed_lines_ignoring_whitespace(EXAMPLE / original, EXAMPLE / fl)
    assert changed, "the FL script is identical to the original"
    assert len(changed) <= MAX_CHANGED_LINES, "\n".join(changed)


def test_readme_diff_is_the_current_diff():
    if shutil.which("diff") is None:
        pytest.skip("needs the diff program")
    current = subprocess.run(
        ["diff", "-u", "--label", ORIGINAL, "--label", FL, ORIGINAL, FL],
        cwd=EXAMPLE, capture_output=True, text=True,
    ).stdout
    readme = (EXAMPLE / "README.md").read_text()
    blocks = re.findall(r"^```diff\n(.*?)^```", readme, flags=re.S | re.M)
    assert len(blocks) == 1, "examples/cifar10/README.md should hold exactly one ```diff block"
    assert blocks[0] == current, (
        "the diff in examples/cifar10/README.md is stale; regenerate it from examples/cifar10 with\n"
        f"diff -u --label {ORIGINAL} --label {FL} {ORIGINAL} {FL}"
    )


@pytest.mark.parametrize(("original", "fl"), [(DDP_ORIGINAL, DDP_FL), (LIT_ORIGINAL, LIT_FL),
                                             (LIT_DDP_ORIGINAL, LIT_DDP_FL)])
def test_readme_shows_the_current_diff_w(original, fl):
    if shutil.which("diff") is None:
        pytest.skip("needs the diff program")
    current = subprocess.run(["diff", "-w", original, fl], cwd=EXAMPLE, capture_output=True, text=True).stdout
    blocks = re.findall(r"^```text\n(.*?)^```", (EXAMPLE / "README.md").read_text(), flags=re.S | re.M)
    assert current in blocks, f"the diff -w {original} {fl} in examples/cifar10/README.md is stale; it is now:\n{current}"


@pytest.mark.slow
def test_original_script_learns_digits():
    proc = subprocess.run(
        [sys.executable, ORIGINAL, "--dataset", "digits", "--epochs", "2"],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Accuracy of the network on the test images: ([\d.]+) %", proc.stdout)
    assert match, proc.stdout
    assert float(match.group(1)) / 100 >= 0.85, proc.stdout


@pytest.mark.parametrize("num_sites", [2, 3])
def test_digits_shards_are_disjoint_and_cover_the_training_set(num_sites):
    data = _load_data_module()
    trainset, testset = data.load_datasets("digits")
    assert (len(trainset), len(testset)) == (1437, 360)
    assert tuple(trainset[0][0].shape) == (3, 32, 32)

    shards = [data.shard(trainset, f"site-{k}", num_sites).indices for k in range(1, num_sites + 1)]
    seen = [i for indices in shards for i in indices]
    assert len(seen) == len(set(seen)), "two sites share samples"
    assert sorted(seen) == list(range(len(trainset)))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert data.shard(trainset, "site-1", num_sites).indices == shards[0], "sharding is not deterministic"


def test_shard_site_names():
    data = _load_data_module()
    assert data.site_index("site-3", 3) == 2
    assert data.site_index("hospital-a", 3) == data.site_index("hospital-a", 3)  # stable, not hash()
    assert 0 <= data.site_index("hospital-a", 3) < 3
    with pytest.raises(ValueError, match="site-1..site-2"):
        data.site_index("site-3", 2)


def test_missing_cifar10_points_to_prepare_data(tmp_path):
    data = _load_data_module()
    with pytest.raises(FileNotFoundError, match="prepare_data.sh"):
        data.load_datasets("cifar10", str(tmp_path))
    script = (EXAMPLE / "prepare_data.sh").read_text()
    assert f'DATA_PATH="${{1:-{data.DEFAULT_DATA_PATH}}}"' in script, "prepare_data.sh must fill the default path"
    assert (EXAMPLE / "prepare_data.sh").stat().st_mode & 0o111, "prepare_data.sh is not executable"


def test_job_help_explains_every_option(tmp_path):
    proc = _run_job("--help", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for option in JOB_OPTIONS:
        assert option in proc.stdout, f"--help does not mention {option}"


@pytest.mark.parametrize(
    "args, message",
    [
        # more clients than ports
        (["--n_clients", "3", "--launch_process", "--launch_command", "torchrun --master_port={PORT}",
          "--ports", "7777,8888"], "2 port(s) for 3 clients"),
        # {PORT} without an external process
        (["--launch_command", "torchrun --master_port={PORT}"], "--launch_process"),
        (["--launch_process", "--launch_command", "torchrun --master_port={PORT}", "--ports", "7777,x"],
         "'x' is not a port"),
    ],
)
def test_job_rejects_bad_ports_before_starting(tmp_path, args, message):
    proc = _run_job(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ws").exists() and not (tmp_path / "jobs").exists(), "something was started"


@pytest.mark.parametrize("extra", [["--launch_process"], []])
def test_job_runs_with_ports_its_launch_command_does_not_use(tmp_path, extra):
    """NVFlare's job script has --ports 7777,8888 by default and uses them only where the launch
    command has {PORT}: the mission's `--launch_process --ports 7777,8888` runs, with one note."""
    proc = _run_job("--script", "src/cifar10_fl.py", *extra, "--ports", "7777,8888", "--export_only",
                    tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("--ports 7777,8888 is not used") == 1, proc.stderr
    job = json.loads((tmp_path / "jobs" / "cifar10_fedavg" / "job.json").read_text())
    runner = job["clients"]
    assert runner["launch_external_process"] == bool(extra) and runner["command"] == "python3 -u"
