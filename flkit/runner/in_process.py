"""Run a site's script in this process: as `__main__` in its own thread, its own argv and context."""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import traceback
import types
from pathlib import Path
from types import CodeType

from flkit.client.settings import SiteSettings, set_context_settings
from flkit.errors import FLKitError
from flkit.runner import site_console, thread_io
from flkit.runner.outcome import SiteOutcome, report_site_failure

log = logging.getLogger("flkit.runner")


class InProcessSite:
    """One site's script running in a thread of the current process.

    An exception (or a non-zero ``sys.exit``) in the script fails the site: the
    traceback goes to the server at once, so the job never waits on a dead site.
    """

    # Seconds the simulator waits for the script to end by itself after the job ended.
    shutdown_timeout = 0.0

    def __init__(self, settings: SiteSettings, script: Path, argv: list[str], gpu: str | None = None) -> None:
        self.settings = settings
        self.script = Path(script).resolve()
        self.argv = [str(self.script), *argv]
        self.gpu = gpu
        self.outcome: SiteOutcome | None = None
        self._thread = threading.Thread(
            target=contextvars.Context().run, args=(self._main,), name=f"flkit-site-{settings.site_name}",
            daemon=True,
        )

    @property
    def site(self) -> str:
        return self.settings.site_name

    def start(self) -> None:
        if not self.script.is_file():
            raise FLKitError(f"site {self.site}: script {self.script} does not exist")
        script_dir = str(self.script.parent)
        if script_dir not in sys.path:
            sys.path.insert(0, script_dir)  # like `python script.py`, so sibling modules import
        thread_io.install()
        site_console.install()
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the script to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, grace_s: float = 0.0) -> None:
        """Nothing to end: a thread cannot be killed. A script still running after its job
        ended is a daemon thread and goes with the process."""

    def _main(self) -> None:
        from flkit import api

        error = run_script(self.script, self.argv[1:], self.settings, self.gpu)
        if error:
            log.debug("site %s failed: %s", self.site, error)
        session = api.current_session()
        if session is not None:
            session.close(failure=error)
        else:
            error = error or f"script {self.script.name} ended without calling flkit.init()"
            report_site_failure(self.settings, error)
        self.outcome = SiteOutcome(self.site, error is None, error)


def run_script(script: Path, argv: list[str], settings: SiteSettings, gpu: str | None = None,
               clear_globals: bool = False, as_main: bool = True) -> str | None:
    """Run ``script`` to its end in this thread as site ``settings.site_name``: its own ``sys.argv``,
    output prefixed with the site's name, its settings in this context (call it in a fresh
    ``contextvars.Context``). ``script``: an absolute path. Returns why the script failed, or None;
    its session stays open (``flkit.api.current_session()``) for the caller to close.
    ``clear_globals``, ``as_main``: see ``run_as_main``."""
    set_context_settings(settings)
    thread_io.set_site_io([str(script), *argv], f"[{settings.site_name}] ")
    site_console.use_own_console()
    make_site_folder(settings.workspace)
    error = None
    try:
        if gpu is not None:
            import torch

            torch.cuda.set_device(int(str(gpu).split(",")[0]))  # this thread's current device
        run_as_main(script, clear_globals, as_main)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            error = f"script {script.name} exited with status {exc.code}"
    except BaseException as exc:
        error = _describe(script, exc)
    finally:
        site_console.uninstall()
        thread_io.uninstall()
    return error


def make_site_folder(path: str) -> None:
    """Make a site's folder if it is missing (one stat when it is there: a pool runs a site's script
    once per task)."""
    if not os.path.isdir(path):
        os.makedirs(path, exist_ok=True)

# Compiled scripts by (path, mtime, size): a worker pool runs the same script once per task.
_compiled: dict[tuple[str, int, int], CodeType] = {}
_compiled_lock = threading.Lock()
MAX_COMPILED = 64


def run_as_main(script: Path, clear_globals: bool = False, as_main: bool = True) -> None:
    """Run ``script`` as ``__main__``, as ``runpy.run_path`` does for a file (the same module
    attributes, and ``sys.modules["__main__"]`` while it runs), with its code compiled once.

    ``clear_globals``: empty the module's globals once the script ended. Its functions refer to
    them, so without this only the garbage collector frees what the script made (its model, the
    received params); a worker pool that runs script after script wants them gone at once.
    ``as_main``: the module is ``sys.modules["__main__"]`` while the script runs (and the one it
    replaced afterwards), as with ``python script.py``.
    """
    stat = script.stat()
    key = (str(script), stat.st_mtime_ns, stat.st_size)
    with _compiled_lock:
        code = _compiled.get(key)
    if code is None:
        code = compile(script.read_bytes(), str(script), "exec", dont_inherit=True)
        with _compiled_lock:
            if len(_compiled) >= MAX_COMPILED:
                _compiled.pop(next(iter(_compiled)))  # the oldest
            _compiled[key] = code
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=str(script), __cached__=None, __loader__=None, __package__="", __spec__=None)
    saved = sys.modules.get("__main__")
    if as_main:
        sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if as_main:
            if saved is not None:
                sys.modules["__main__"] = saved
            elif sys.modules.get("__main__") is module:
                del sys.modules["__main__"]
        if clear_globals and sys.modules.get("__main__") is not module:
            module.__dict__.clear()


def _describe(script: Path, exc: BaseException) -> str:
    """One summary line, then the traceback from the script's own frames on."""
    tb = exc.__traceback__
    while tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() != script:
        tb = tb.tb_next
    lines = traceback.format_exception(type(exc), exc, tb or exc.__traceback__)
    head = f"script {script.name} raised {type(exc).__name__}: {exc}".splitlines()[0]
    return head + "\n" + "".join(lines).rstrip()
