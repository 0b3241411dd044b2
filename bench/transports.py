"""Benchmark: what each flkit transport costs per round, in time and memory, against the machine's limits.

For every transport that applies, model size and number of sites, a FedAvgJob with no-op sites
(bench/noop_site.py: each adds 0.001 to every tensor and sends the model back) runs in the local
simulator. There is no training, so a round's time is flkit's own cost of moving, checking,
averaging and saving the model. Transports:

* ``memory``: in-process sites (threads of the job's process), ``FLKIT_TRANSPORT=memory``;
* ``grpc``: each site an external process (``ScriptRunner(launch_external_process=True)``),
  ``FLKIT_TRANSPORT=grpc``;
* ``shm``: external processes on the same host, ``FLKIT_TRANSPORT=shm`` (shared memory).

Absolute times differ between machines, so every figure is also given as a ratio to the
machine's own limit, measured in the same run: one ``torch.Tensor.copy_`` of the whole model
(float32) into an already-touched tensor (median of 10; a fresh ``clone()``, which also pays
for page faults, is printed beside it). Other references measured in the same run: a fresh
``python -c "import torch"`` (what launching a process site costs at least) and a bare grpcio
stream of the model's bytes between two processes (bench/bare_grpc.py: the floor of the gRPC
transport; a round with S sites needs at least S downloads + S uploads).

Per configuration, measured in its own fresh child process (so peak memory and import state do
not leak from one configuration into the next): seconds per round (the controller's
``result.rounds[i].seconds``; mean of the rounds after the first, and the first alone); peak
memory of the whole process tree (private anonymous memory summed over the process and all its
descendants, plus the allocated size of ``/dev/shm/flkit*`` files and of the memfds the tree has
open, sampled every 10 ms, minus the same measure just before ``simulator_run``), in MiB and in
model copies; the time from calling ``simulator_run`` to each site's first task (the slowest
site); and how many rounds' global models were written
to disk (``saved_rounds`` in ``<workspace>/server/round_state.json``, where the run state has it).
Last, the issue's targets with the measured value and PASS/MISS.

    .venv/bin/python bench/transports.py                       # 1M,25M,100M x 2,8 sites x all transports
    .venv/bin/python bench/transports.py --quick               # 25M x 2 sites only (~1-2 min)
    .venv/bin/python bench/transports.py --params 1M --sites 2 --transports memory,grpc --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SITE_SCRIPT = HERE / "noop_site.py"
MIB = 1024 * 1024
TRANSPORTS = ("memory", "grpc", "shm")
EXTERNAL = {"memory": False, "grpc": True, "shm": True}
RESULT_TAG = "BENCH_TRANSPORTS_RESULT "
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "flkit"
FIRST_TASK_ENV = "BENCH_FIRST_TASK_DIR"  # read by noop_site.py (not FLKIT_*: external sites would not get it)
SAMPLE_INTERVAL_S = 0.01
LIMIT_REPEATS = 10
GRPC_REPEATS = 5
IMPORT_TORCH_REPEATS = 3
OTHER_LOAD_NOTE = 0.25  # cores used by processes outside the job, on average, worth a note in its row
Q = 25_000_000  # the issue's reference model size (25M params = 100 MB)


# -- sizes ---------------------------------------------------------------------------------------

def parse_count(text: str) -> int:
    """``"25M"`` -> 25_000_000; ``"500K"``, ``"1.5M"``, ``"1000"`` also work."""
    text = text.strip().upper().replace("_", "")
    scale = {"K": 1_000, "M": 1_000_000, "G": 1_000_000_000}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    value = float(number) * scale
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole count: {text!r}")
    return int(value)


def fmt_count(n: int) -> str:
    for div, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "K")):
        if n >= div and n % (div // 100) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


def model_dims(target_params: int, layers: int) -> tuple[int, int]:
    """(d, exact parameter count) of ``layers`` x Linear(d, d), as bench/round_overhead.py builds it."""
    per_layer = target_params / layers
    dim = max(1, round((-1 + math.sqrt(1 + 4 * per_layer)) / 2))  # d*d + d weights+bias per layer
    return dim, layers * (dim * dim + dim)


def int_list(text: str) -> list[int]:
    return [parse_count(x) for x in text.split(",") if x.strip()]


# -- memory of a process tree ----------------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent pid in /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def private_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, RssShmem) of one process in KiB from /proc/<pid>/status; (0, 0) if it is gone.

    Why not PSS: reading ``smaps_rollup`` walks the page tables of the process (about 10 ms for a
    2 GB process here) and takes its memory-map lock, so sampling it every few milliseconds slows
    down the very job being measured. The counters in ``status`` cost microseconds. Private
    anonymous memory is what each process allocated for itself (tensors, buffers, a copy-on-write
    page it wrote); mapped shared-memory files are counted once, by their allocated size, below.
    """
    anon = shmem = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith(b"RssShmem:"):
                    shmem = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return anon, shmem


def shm_bytes() -> tuple[int, int, int]:
    """(allocated bytes, apparent size, count) of the files in ``/dev/shm/flkit*`` (files or folders)."""
    allocated = size = count = 0
    try:
        entries = [e for e in os.scandir(SHM_DIR) if e.name.startswith(SHM_PREFIX)]
    except OSError:
        return 0, 0, 0
    while entries:
        entry = entries.pop()
        try:
            if entry.is_dir(follow_symlinks=False):
                entries.extend(os.scandir(entry.path))
                continue
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        allocated += st.st_blocks * 512
        size += st.st_size
        count += 1
    return allocated, size, count


def memfd_paths(pids: list[int]) -> list[str]:
    """The ``/proc/<pid>/fd/<n>`` links of the memfds open in ``pids`` (flkit keeps a global model
    in one when it has no /dev/shm folder for it: flkit.shared_model)."""
    paths = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith("/memfd:"):
                    paths.append(path)
            except OSError:
                continue
    return paths


def memfd_bytes(paths: list[str]) -> int:
    """Allocated bytes of these memfds, each file counted once however many processes or mappings
    use it."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            total += st.st_blocks * 512
    return total


def measure(pids: list[int], memfds: list[str]) -> dict[str, int]:
    """One sample: private memory summed over ``pids`` plus the job's shared-memory files and
    ``memfds``, in bytes."""
    anon = shmem = 0
    for pid in pids:
        a, s = private_kib(pid)
        anon += a
        shmem += s
    shm_alloc, shm_size, shm_files = shm_bytes()
    memfd = memfd_bytes(memfds)
    return {"total": anon * 1024 + shm_alloc + memfd, "anon": anon * 1024, "rss_shmem": shmem * 1024,
            "shm": shm_alloc, "memfd": memfd, "shm_size": shm_size, "shm_files": shm_files, "procs": len(pids)}


def measure_tree(root: int) -> dict[str, int]:
    """One sample of ``root``'s whole process tree (``measure``)."""
    pids = process_tree(root)
    return measure(pids, memfd_paths(pids))


class PeakSampler(threading.Thread):
    """Samples the memory of ``root``'s process tree every ``interval`` seconds and keeps the
    largest sample.

    Why the tree and its memfds are looked up only every ``rescan`` samples: finding them scans all
    of /proc (about 0.5 ms here), and the sampler runs in the server's process, so it would take
    that much CPU and GIL from the job every 10 ms; reading the known processes' counters costs a
    tenth of it. A process is seen within ``rescan * interval`` of its start (a new Python process
    takes far longer than that to grow).
    """

    def __init__(self, root: int, interval: float = SAMPLE_INTERVAL_S, rescan: int = 10) -> None:
        super().__init__(name="bench-memory-sampler", daemon=True)
        self.root = root
        self.interval = interval
        self.rescan = rescan
        self.peak: dict[str, int] | None = None
        self.samples = 0
        self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        memfds: list[str] = []
        while not self._halt.is_set():
            if self.samples % self.rescan == 0:
                pids = process_tree(self.root)
                memfds = memfd_paths(pids)
            sample = measure(pids, memfds)
            self.samples += 1
            self.max_procs = max(self.max_procs, sample["procs"])
            if self.peak is None or sample["total"] > self.peak["total"]:
                self.peak = sample
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# -- one configuration (child process) -----------------------------------------------------------

def machine_limit(numel: int, repeats: int = LIMIT_REPEATS) -> dict[str, Any]:
    """Median seconds of one ``dst.copy_(src)`` into a touched tensor and of one fresh ``src.clone()``."""
    import torch

    src = torch.full((numel,), 1.0, dtype=torch.float32)
    dst = torch.zeros(numel, dtype=torch.float32)
    dst.copy_(src)  # warm
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - t0)
    del dst
    clones = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fresh = src.clone()
        clones.append(time.perf_counter() - t0)
        del fresh
    del src
    return {"copy_s": statistics.median(copies), "clone_s": statistics.median(clones), "copy_all_s": copies,
            "clone_all_s": clones}


def cpu_busy_s() -> tuple[float, float]:
    """(seconds of CPU the whole machine spent busy, seconds this process and its waited-for children
    spent), so the CPU that other processes used during the job can be told apart."""
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def read_saved_rounds(server_dir: Path) -> int | None:
    """Rounds whose global model was written to disk, if the run state says (else None)."""
    try:
        state = json.loads((server_dir / "round_state.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("saved_rounds", "rounds_saved"):
        value = state.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, list):
            return len(value)
    return None


def run_one(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one (transport, params, sites) job in this process and return its measurements."""
    transport, sites, rounds = cfg["transport"], cfg["sites"], cfg["rounds"]
    os.environ["FLKIT_TRANSPORT"] = transport  # before flkit is imported; external sites inherit the env
    out: dict[str, Any] = {"transport": transport, "params_target": cfg["params"], "sites": sites,
                           "rounds": rounds, "layers": cfg["layers"], "pid": os.getpid()}
    import torch

    dim, _ = model_dims(cfg["params"], cfg["layers"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(cfg["layers"])])
    state = model.state_dict()
    n_params = sum(t.numel() for t in state.values())
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    out.update(params=n_params, model_bytes=model_bytes, dim=dim, torch_threads=torch.get_num_threads())
    out.update(machine_limit(n_params))  # before flkit is imported: a core mid-rewrite cannot stop it

    ws = Path(cfg["workspace"])
    first_dir = ws / "bench_first_task"
    first_dir.mkdir()
    os.environ[FIRST_TASK_ENV] = str(first_dir)
    sampler: PeakSampler | None = None
    try:
        from flkit.job import FedAvgJob
        from flkit.runner.script_runner import ScriptRunner

        job = FedAvgJob(name="bench", initial_model=model, n_clients=sites, num_rounds=rounds,
                        final_validation=False)
        job.to_clients(ScriptRunner(script=str(SITE_SCRIPT), launch_external_process=EXTERNAL[transport]))
        gc.collect()
        baseline = measure_tree(os.getpid())
        sampler = PeakSampler(os.getpid())
        sampler.start()
        busy0, own0 = cpu_busy_s()
        t0 = time.time()
        p0 = time.perf_counter()
        try:
            result = job.simulator_run(ws, quiet=True)
        finally:
            wall = time.perf_counter() - p0
            sampler.stop()
            busy1, own1 = cpu_busy_s()
            out["other_cpu_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall if wall > 0 else None
        peak = sampler.peak or baseline
        out.update(
            wall_s=wall,
            baseline_mib=baseline["total"] / MIB,
            peak_mib=(peak["total"] - baseline["total"]) / MIB,
            peak_model_copies=(peak["total"] - baseline["total"]) / model_bytes,
            peak_parts_mib={k: (peak[k] - baseline[k]) / MIB for k in ("anon", "rss_shmem", "shm", "memfd")},
            peak_abs_mib=peak["total"] / MIB,
            peak_procs=peak["procs"],
            max_procs=sampler.max_procs,
            memory_samples=sampler.samples,
        )
        train = [r.seconds for r in result.rounds if r.task == "train"]
        out["round_s"] = train
        out["rounds_ran"] = len(train)
        if train:
            rest = train[1:] or train
            out["first_round_s"] = train[0]
            out["s_per_round"] = statistics.fmean(rest)
            out["x_copy"] = out["s_per_round"] / out["copy_s"]
        firsts = {}
        for path in first_dir.glob("*.txt"):
            try:
                firsts[path.stem] = float(path.read_text()) - t0
            except ValueError:
                pass
        out["first_task_s_by_site"] = firsts
        if firsts:
            out["first_task_s"] = max(firsts.values())
            out["first_task_min_s"] = min(firsts.values())
        if len(firsts) < sites:
            out["note"] = f"first-task time from {len(firsts)} of {sites} sites"
        out["saved_rounds"] = read_saved_rounds(ws / "server")
    except BaseException as exc:
        text = str(exc).strip().splitlines()
        out["error"] = f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
    finally:
        os.environ.pop(FIRST_TASK_ENV, None)
        shutil.rmtree(ws, ignore_errors=True)
    return out


def child_main(config_json: str) -> int:
    try:
        out = run_one(json.loads(config_json))
    except BaseException as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


# -- the parent: references ------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "-"

    cpu = "-"
    mem_kib = 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "ram_gib": mem_kib / MIB, "python": platform.python_version(), "kernel": platform.release(),
            "torch": version("torch"), "grpcio": version("grpcio"), "safetensors": version("safetensors"),
            "flkit": version("flkit")}


def import_torch_s(repeats: int = IMPORT_TORCH_REPEATS) -> dict[str, Any]:
    """Wall time of a fresh ``python -c 'import torch'`` (median)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "all_s": times}


def grpc_floor(model_bytes: dict[int, int], repeats: int = GRPC_REPEATS) -> dict[int, dict[str, Any]]:
    """Bare grpcio upload and download of each model size between this process and a child."""
    sys.path.insert(0, str(HERE))
    from bare_grpc import measure

    by_bytes = measure(sorted(set(model_bytes.values())), repeats)
    return {target: by_bytes[n] for target, n in model_bytes.items()}


def run_config(cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh child process; its result, or what went wrong."""
    shm_before = {e.name for e in os.scandir(SHM_DIR) if e.name.startswith(SHM_PREFIX)} \
        if SHM_DIR.is_dir() else set()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own group (it is a session leader)
        except ProcessLookupError:
            pass
        stdout, stderr = proc.communicate()
        timed_out = True
    base = {"transport": cfg["transport"], "params_target": cfg["params"], "sites": cfg["sites"],
            "child_s": time.perf_counter() - t0, "child_rc": proc.returncode}
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
    result: dict[str, Any] = {**base, **json.loads(lines[-1][len(RESULT_TAG):])} if lines else dict(base)
    if timed_out:
        result["error"] = f"timed out after {timeout:.0f} s" + (f"; {result['error']}" if "error" in result else "")
    elif not lines:
        tail = [ln for ln in (stderr or "").splitlines() if ln.strip()][-3:]
        result["error"] = f"child exited with status {proc.returncode}: " + " | ".join(tail)[-300:]
    if SHM_DIR.is_dir():
        left = sorted({e.name for e in os.scandir(SHM_DIR) if e.name.startswith(SHM_PREFIX)} - shm_before)
        if left:
            result["shm_left"] = left
    shutil.rmtree(cfg["workspace"], ignore_errors=True)  # the child removes it, unless it was killed
    if "error" in result:
        result["output_tail"] = ((stdout or "")[-2000:], (stderr or "")[-2000:])
    return result


# -- the parent: report --------------------------------------------------------------------------------

def fmt(value: Any, spec: str = ".3f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def limits_by_size(results: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """copy_ and clone medians per model size, over the configurations that measured them."""
    out: dict[int, dict[str, Any]] = {}
    for r in results:
        if "copy_s" not in r:
            continue
        entry = out.setdefault(r["params_target"], {"copy": [], "clone": [], "params": r["params"],
                                                    "model_bytes": r["model_bytes"]})
        entry["copy"].append(r["copy_s"])
        entry["clone"].append(r["clone_s"])
    for entry in out.values():
        entry["copy_s"] = statistics.median(entry["copy"])
        entry["clone_s"] = statistics.median(entry["clone"])
    return out


def find(results: list[dict[str, Any]], transport: str, params: int, sites: int) -> dict[str, Any] | None:
    for r in results:
        if r["transport"] == transport and r["params_target"] == params and r["sites"] == sites:
            return r
    return None


def evaluate_targets(results: list[dict[str, Any]], import_torch: float | None,
                     floor: dict[int, dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The issue's targets: name, measured value (text), limit (text), PASS/MISS/not run."""
    rows: list[dict[str, Any]] = []

    def add(name: str, r: dict[str, Any] | None, key: str, limit: float | None, unit: str,
            value: float | None = None) -> None:
        row = {"target": name, "measured": None, "limit": limit, "status": "not run", "unit": unit}
        if r is not None:
            if "error" in r and value is None and r.get(key) is None:
                row["status"] = "failed"
            else:
                v = value if value is not None else r.get(key)
                if v is not None and limit is not None:
                    row.update(measured=v, status="PASS" if v <= limit else "MISS")
                elif v is not None:
                    row.update(measured=v, status="no limit")
        rows.append(row)

    for transport, params, sites, limit in (("memory", Q, 2, 20), ("memory", 4 * Q, 2, 20),
                                            ("memory", Q, 8, 60), ("shm", Q, 2, 25), ("grpc", Q, 2, 100)):
        add(f"{transport} {fmt_count(params)} x {sites}: s/round <= {limit} x copy_",
            find(results, transport, params, sites), "x_copy", limit, "x copy_")
    r = find(results, "grpc", Q, 2)
    floor_q = (floor or {}).get(Q)
    ratio = None
    if r is not None and floor_q and r.get("s_per_round") is not None:
        ratio = r["s_per_round"] / (2 * (floor_q["upload_s"] + floor_q["download_s"]))
    add("grpc 25M x 2: s/round <= 2 x bare grpcio (2 downloads + 2 uploads)", r if floor_q else None,
        "_", 2, "x floor", ratio)
    add("memory 25M x 2: peak above baseline <= 8 model copies", find(results, "memory", Q, 2),
        "peak_model_copies", 8, "copies")
    add("memory 25M x 2: simulator_run to first task <= 0.5 s", find(results, "memory", Q, 2),
        "first_task_s", 0.5, "s")
    for transport in ("grpc", "shm"):
        add(f"{transport} 25M x 2: simulator_run to first task <= import torch + 1 s",
            find(results, transport, Q, 2), "first_task_s",
            None if import_torch is None else import_torch + 1.0, "s")
    return rows


def print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)
    m = report["machine"]
    console.print(f"[bold]flkit transports benchmark[/]  {time.strftime('%Y-%m-%d %H:%M')}")
    console.print(f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['ram_gib']:.1f} GiB RAM, "
                  f"Linux {m['kernel']}")
    console.print(f"python {m['python']}, torch {m['torch']}, grpcio {m['grpcio']}, safetensors {m['safetensors']}, "
                  f"flkit {m['flkit']}")
    console.print(f"rounds per job: {report['rounds']} (s/round = mean of rounds 2..N; first round alone), "
                  f"layers: {report['layers']}")
    it = report.get("import_torch")
    console.print(f"fresh `python -c 'import torch'`: {fmt(it and it['median_s'])} s (median of "
                  f"{IMPORT_TORCH_REPEATS})")

    limits = report["limits"]
    floor = report.get("grpc_floor") or {}
    table = Table(title="limits (ratios below are to one copy_ of the model, measured in each configuration's "
                        "own process)", title_justify="left")
    for col in ("params", "model MiB", "copy_ ms", "clone ms", "clone x copy_", "grpc up ms", "grpc down ms",
                "grpc 1 transfer x copy_", "grpc round floor 2 sites s", "8 sites s"):
        table.add_column(col, justify="right")
    for target in report["params"]:
        lim = limits.get(target)
        fl = floor.get(target)
        copy_s = lim["copy_s"] if lim else None
        one = (fl["upload_s"] + fl["download_s"]) / 2 if fl else None
        table.add_row(
            fmt_count(target),
            fmt(report["model_bytes"][target] / MIB, ".1f"),
            fmt(copy_s and copy_s * 1e3, ".2f"),
            fmt(lim and lim["clone_s"] * 1e3, ".2f"),
            fmt(lim and lim["clone_s"] / lim["copy_s"], ".1f"),
            fmt(fl and fl["upload_s"] * 1e3, ".1f"),
            fmt(fl and fl["download_s"] * 1e3, ".1f"),
            fmt(one / copy_s if one and copy_s else None, ".1f"),
            fmt(fl and 2 * (fl["upload_s"] + fl["download_s"]), ".3f"),
            fmt(fl and 8 * (fl["upload_s"] + fl["download_s"]), ".3f"),
        )
    console.print(table)

    for transport in report["transports"]:
        rows = [r for r in report["results"] if r["transport"] == transport]
        if not rows:
            continue
        how = "in-process sites" if not EXTERNAL[transport] else "external process sites"
        table = Table(title=f"{transport} ({how}, FLKIT_TRANSPORT={transport})", title_justify="left")
        for col in ("params", "sites", "copy_ ms", "s/round", "x copy_", "first round s", "peak MiB", "peak x model",
                    "first task s", "saved/ran", "note"):
            table.add_column(col, justify="left" if col == "note" else "right")
        for r in rows:
            notes = []
            if "error" in r:
                notes.append(f"[red]{r['error']}[/]")
            if r.get("note"):
                notes.append(r["note"])
            if (r.get("other_cpu_cores") or 0) > OTHER_LOAD_NOTE:
                notes.append(f"other processes busy: {r['other_cpu_cores']:.1f} cores")
            if r.get("shm_left"):
                notes.append(f"{len(r['shm_left'])} /dev/shm/flkit* file(s) left after the job")
            ran = r.get("rounds_ran")
            saved = r.get("saved_rounds")
            table.add_row(
                fmt_count(r["params_target"]), str(r["sites"]), fmt(r.get("copy_s") and r["copy_s"] * 1e3, ".2f"),
                fmt(r.get("s_per_round")), fmt(r.get("x_copy"), ".1f"), fmt(r.get("first_round_s")),
                fmt(r.get("peak_mib"), ".0f"), fmt(r.get("peak_model_copies"), ".1f"),
                fmt(r.get("first_task_s"), ".2f"),
                f"{'-' if saved is None else saved}/{'-' if ran is None else ran}",
                "; ".join(notes),
            )
        console.print(table)

    table = Table(title="targets (issue 11)", title_justify="left")
    for col in ("target", "measured", "limit", "result"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for t in report["targets"]:
        colour = {"PASS": "green", "MISS": "red"}.get(t["status"], "yellow")
        table.add_row(t["target"], fmt(t["measured"], ".2f") + (f" {t['unit']}" if t["measured"] is not None else ""),
                      fmt(t["limit"], ".2f"), f"[{colour}]{t['status']}[/]")
    console.print(table)


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int_list, default=int_list("1M,25M,100M"),
                    help="model sizes, comma list with K/M suffixes (default 1M,25M,100M)")
    ap.add_argument("--sites", type=int_list, default=[2, 8], help="site counts, comma list (default 2,8)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="rounds per job (default 4; s/round is the mean of rounds after the first)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS),
                    help=f"comma list of {', '.join(TRANSPORTS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="25M params x 2 sites only")
    ap.add_argument("--layers", type=int, default=5, help="square Linear layers per model (default 5)")
    ap.add_argument("--workspace", default=None,
                    help="folder for the jobs' temporary workspaces (default: a new temporary folder); "
                         "each job's folder is removed after it, a folder that existed before is kept")
    ap.add_argument("--json", dest="json_file", default=None, help="also write all results as JSON to this file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may take (default 1800)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = ap.parse_args(argv)
    if args.one is not None:
        return child_main(args.one)

    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    bad = [t for t in transports if t not in TRANSPORTS]
    if bad or not transports:
        ap.error(f"--transports: unknown {bad}; choose from {', '.join(TRANSPORTS)}")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    params, sites = ([Q], [2]) if args.quick else (args.params, args.sites)

    if args.workspace:
        root = Path(args.workspace).resolve()
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root, created = Path(tempfile.mkdtemp(prefix="flkit-bench-transports-")), True

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    report: dict[str, Any] = {"bench": "transports", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "machine": machine_info(), "rounds": args.rounds, "layers": args.layers,
                              "params": params, "sites": sites, "transports": transports}
    try:
        progress("measuring a fresh `python -c 'import torch'` ...")
        try:
            report["import_torch"] = import_torch_s()
        except (OSError, subprocess.CalledProcessError) as exc:
            report["import_torch"] = None
            progress(f"  failed: {exc}")
        model_bytes = {p: 4 * model_dims(p, args.layers)[1] for p in params}
        report["grpc_floor"] = None
        if "grpc" in transports:
            progress(f"measuring the bare grpcio floor for {', '.join(fmt_count(p) for p in params)} ...")
            try:
                report["grpc_floor"] = grpc_floor(model_bytes)
            except Exception as exc:
                progress(f"  failed: {type(exc).__name__}: {exc}")

        configs = [{"transport": t, "params": p, "sites": s, "rounds": args.rounds, "layers": args.layers}
                   for t in transports for p in params for s in sites]
        results = []
        for i, cfg in enumerate(configs, 1):
            label = f"[{i}/{len(configs)}] {cfg['transport']} {fmt_count(cfg['params'])} x {cfg['sites']} sites"
            progress(f"{label} ...")
            cfg["workspace"] = tempfile.mkdtemp(
                prefix=f"{cfg['transport']}-{fmt_count(cfg['params'])}x{cfg['sites']}-", dir=root)
            r = run_config(cfg, args.timeout)
            results.append(r)
            if "error" in r:
                progress(f"{label}: FAILED ({r['child_s']:.0f} s): {r['error']}")
            else:
                progress(f"{label}: {fmt(r.get('s_per_round'))} s/round ({fmt(r.get('x_copy'), '.1f')} x copy_), "
                         f"first round {fmt(r.get('first_round_s'))} s, peak {fmt(r.get('peak_mib'), '.0f')} MiB "
                         f"({fmt(r.get('peak_model_copies'), '.1f')} x model), first task "
                         f"{fmt(r.get('first_task_s'), '.2f')} s; {r['child_s']:.0f} s in all")
        report["results"] = results
    finally:
        if created:
            shutil.rmtree(root, ignore_errors=True)

    report["limits"] = limits_by_size(results)
    report["model_bytes"] = model_bytes
    floor = report.get("grpc_floor")
    it = report.get("import_torch")
    report["targets"] = evaluate_targets(results, it and it["median_s"], floor)
    print_report(report)
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results -> {args.json_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
