"""A rich Console of its own for each in-process site.

rich keeps one process-global Console (``rich.get_console()``). Lightning's default progress
bar (``RichProgressBar``, chosen whenever rich is installed, as it is with flkit) reconfigures
that console, clears its stack of live displays and pushes its own Live onto it. Two sites
in two threads of one process then pop each other's displays (``IndexError: pop from empty
list`` in ``Console.clear_live``). Each site is meant to behave as if it were its own machine,
so each gets its own Console.

Why the code object of ``rich.get_console`` is replaced rather than the name: Lightning (and
other libraries) bind ``from rich import get_console`` at import time, so only changing what
the one function object does reaches every caller. The original behaviour is kept for every
thread that is not a site's (the simulator, the user's own code); ``uninstall`` restores it
when the last in-process site has ended.
"""

from __future__ import annotations

import threading
import types
from contextvars import ContextVar
from dataclasses import dataclass

import rich
from rich.console import Console

_ROUTER = "_flkit_site_console_router"


@dataclass
class _Holder:
    console: Console | None = None


_site: ContextVar[_Holder | None] = ContextVar("flkit_site_console", default=None)
_lock = threading.Lock()
_installed = 0
_original_code: types.CodeType | None = None


def _routed_get_console() -> Console:
    holder = _site.get()
    if holder is None:
        return _original_get_console()
    if holder.console is None:
        holder.console = Console()
    return holder.console


def _original_get_console() -> Console:
    assert _original_code is not None
    return types.FunctionType(_original_code, rich.__dict__, "get_console")()


def _trampoline() -> Console:  # its code becomes rich.get_console's; globals are rich's
    return _flkit_site_console_router()  # noqa: F821 - defined in rich's namespace by install()


def install() -> None:
    """Route ``rich.get_console()`` through the site's own Console (reference counted)."""
    global _installed, _original_code
    with _lock:
        if _installed == 0:
            _original_code = rich.get_console.__code__
            rich.__dict__[_ROUTER] = _routed_get_console
            rich.get_console.__code__ = _trampoline.__code__
        _installed += 1


def uninstall() -> None:
    global _installed, _original_code
    with _lock:
        _installed -= 1
        if _installed == 0 and _original_code is not None:
            rich.get_console.__code__ = _original_code
            rich.__dict__.pop(_ROUTER, None)
            _original_code = None


def use_own_console() -> None:
    """Called inside a site's own context, before its script runs: rich's global console is
    this site's from now on (created at first use)."""
    _site.set(_Holder())

