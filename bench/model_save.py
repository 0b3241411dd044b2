"""Benchmark: CPU and wall time of saving the global model, buffered against O_DIRECT.

The persistor saves each round's global model beside the round (flkit.server.persistor). On a
machine whose cores run the round, the CPU a save takes is what slows the round down, so this
prints both the wall time and the saving thread's CPU time (``time.thread_time``) of
``save_params`` with and without a ``DirectWriter``, each atomic and fsync'd, into ``--folder``
(default: a new temporary folder on the disk the workspace would use; it is removed afterwards).

    .venv/bin/python bench/model_save.py [--params 25000000] [--repeats 5] [--folder DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flkit.server.direct_write import DirectWriter
from flkit.server.persistor import save_params


def measure(folder: Path, params: dict[str, torch.Tensor], direct: DirectWriter | None,
            repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.thread_time()
        save_params(folder / "model.safetensors", params, {"round": 0}, direct)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.thread_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, default=None)
    args = parser.parse_args()
    layers = 5
    dim = int((args.params / layers) ** 0.5)
    params = {f"layer{i}.weight": torch.randn(dim, dim) for i in range(layers)}
    mib = sum(t.numel() * t.element_size() for t in params.values()) / 2**20
    folder = Path(tempfile.mkdtemp(dir=args.folder))
    try:
        direct = DirectWriter()
        rows = [("buffered (safetensors.save_file)", *measure(folder, params, None, args.repeats)),
                ("O_DIRECT (DirectWriter)", *measure(folder, params, direct, args.repeats))]
        if not direct.usable:
            rows[1] = ("O_DIRECT refused here: written buffered", *rows[1][1:])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"save of {mib:.1f} MiB into {folder.parent}, median of {args.repeats}")
    print(f"{'writer':<42} {'wall ms':>8} {'CPU ms':>8}")
    for name, wall, cpu in rows:
        print(f"{name:<42} {wall * 1e3:8.1f} {cpu * 1e3:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
