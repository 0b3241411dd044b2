"""One site-task in a worker: the site's script, run to its end with the session the pool opened.

Isolated site-tasks (the ``processes`` and ``ray`` backends) run as if on the site's own machine:
in the site's folder ``<workspace>/<site>``, with fresh module globals (the script's, and those of
the modules it imported from the job's code, which are dropped afterwards) and with ``random``,
numpy and torch seeded from the job's seed, the site, the round and the task. A worker runs one
site-task at a time, so changing the working directory and the global RNGs is safe there.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import hashlib
import os
import random
import sys
import sysconfig
from pathlib import Path

from flkit.client.current import Handover, set_handover
from flkit.client.settings import SiteSettings
from flkit.messages import JoinReply
from flkit.runner import site_console, thread_io
from flkit.runner.in_process import make_site_folder, run_script
from flkit.sim.backend import SiteTask
from flkit.transport.base import Transport


def task_seed(job_seed: object, site: str, round_num: int, task_name: str) -> int:
    """The seed of one site-task: the same job gives the same site the same seed in the same round."""
    digest = hashlib.sha256(f"{job_seed}:{site}:{round_num}:{task_name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: torch.manual_seed takes any of them


def run_site_task(task: SiteTask, transport: Transport, isolate: bool) -> tuple[str | None, list[str]]:
    """Run the task's script to its end in this thread: why it failed (or None), and the server's
    files the site no longer maps (for the pool to tell the server: see ``Transport.take_released``).

    The script's globals are emptied when it ends, so what it made goes at once, and the site lets
    go of the global model's file (the server may write a later model into it). Where something
    still holds the file (a reference cycle), the garbage collector runs first."""
    error, prefetch_used = contextvars.Context().run(_run, task, transport, isolate)
    released = transport.take_released(task.session_id)
    if task.task is not None and not prefetch_used:  # given for this site, never mapped: the server may reuse it
        released.append(str(task.task["params_file"]))
    if transport.holds_files(task.session_id):
        gc.collect()
        if isolate:
            gc.freeze()  # what is left is libraries the script imported: no later collection scans them
        released += transport.take_released(task.session_id)
    return error, released


def _run(task: SiteTask, transport: Transport, isolate: bool) -> tuple[str | None, bool]:
    """Why the script failed (or None), and whether the task the pool took for it was used."""
    settings = SiteSettings(**task.settings)
    transport.use_offers(task.offers)  # the worker's transport serves the sessions the pool opened
    first = None if task.task is None else transport.task_from_file(task.session_id, task.task)
    handover = Handover(JoinReply(task.session_id, task.job_config, 0.0, task.offers), transport, first)
    set_handover(handover)
    before = _ModuleMark() if isolate else None
    cwd = os.getcwd() if isolate else ""
    script_dir = str(Path(task.script).parent)
    added_path = False
    if isolate:
        make_site_folder(settings.workspace)
        os.chdir(settings.workspace)
        if task.seed is not None:
            _seed(task.seed)
        if script_dir not in sys.path:
            sys.path.insert(0, script_dir)  # like `python script.py`: sibling modules import
            added_path = True
    elif script_dir not in sys.path:
        sys.path.insert(0, script_dir)  # shared by the threads, and left: another site may import now
    thread_io.install()
    site_console.install()
    try:
        # Worker processes run the script as __main__ (it is theirs alone); threads leave the
        # simulator's __main__ in place (two threads swapping it would restore each other's).
        error = run_script(Path(task.script), task.argv, settings, task.gpu, clear_globals=True, as_main=isolate)
        if not handover.sessions:
            error = error or f"script {Path(task.script).name} ended without calling flkit.init()"
        for session in handover.sessions:  # (one; flkit.shutdown() may have closed it already)
            session.close()  # the pool's session: records flushed, nothing else
    finally:
        if isolate:
            os.chdir(cwd)
            if added_path and script_dir in sys.path:
                sys.path.remove(script_dir)
            assert before is not None
            _drop_job_modules(before.new(), task.code_roots)
    return error, first is not None and bool(handover.sessions)


_realpath = functools.lru_cache(maxsize=64)(os.path.realpath)  # of the job's code folders
# Where installed libraries live: never dropped, even inside the job's folder.
_LIBRARIES = tuple(os.path.join(os.path.realpath(p), "") for p in
                   {sys.prefix, sys.base_prefix, *(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))})


class _ModuleMark:
    """Which modules are new since this mark. ``sys.modules`` keeps the order of insertion, so the new
    ones are those after the mark, unless a module before it was removed meanwhile (then compare all)."""

    def __init__(self) -> None:
        self.count = len(sys.modules)
        self.last = next(reversed(sys.modules)) if sys.modules else None

    def new(self) -> list[str]:
        names = list(sys.modules)
        if self.count and len(names) >= self.count and names[self.count - 1] == self.last:
            return names[self.count:]
        return names  # something before the mark went: look at every module (each is checked by its file)


def _seed(seed: int) -> None:
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.manual_seed(seed)
        # torch.manual_seed would also queue a seeding of every accelerator not yet initialised, with
        # a stack trace, at every site-task; seed one only once it is in use.
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(seed)


def _drop_job_modules(new: list[str], roots: list[str]) -> None:
    """Forget the modules this site-task imported from the job's code (``net.py``, ``data.py``...),
    so the next site-task imports them afresh, with fresh globals. Libraries stay imported."""
    prefixes = tuple(os.path.join(_realpath(r), "") for r in roots)
    for name in new:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if not path:
            continue
        real = os.path.realpath(path)
        # A virtualenv inside the job's folder holds libraries, not the job's code.
        if real.startswith(prefixes) and not real.startswith(_LIBRARIES):
            del sys.modules[name]
