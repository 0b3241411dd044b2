"""Per-thread ``sys.argv`` and line-prefixed output for sites that share one process.

Scripts read ``sys.argv`` (argparse does, at parse time) and print freely. Two
sites in two threads must each see their own arguments, and their output must
say which site printed it. Both are routed through ContextVars that only the
in-process runner sets; every other thread sees the real argv and stream.
"""

from __future__ import annotations

import sys
import threading
from contextvars import ContextVar
from typing import Any, TextIO

_argv: ContextVar[list[str] | None] = ContextVar("flkit_argv", default=None)
_prefix: ContextVar[str | None] = ContextVar("flkit_output_prefix", default=None)
_install_lock = threading.Lock()
_installed = 0
_saved: tuple[Any, TextIO, TextIO] | None = None
# Every wrapper ever installed, kept alive for the life of the process. Why: CPython 3.11's
# print() holds a *borrowed* reference to sys.stdout while it writes (fixed upstream in 3.13,
# gh-130163). A site thread printing while the last site's uninstall restores the real stream
# would otherwise write through a freed object and crash the whole process (seen as a segfault
# in about 4 of 10 simulator runs with a print during a site's teardown). Two small objects per
# simulation run.
_retired: list[Any] = []


class _ContextArgv(list):
    """A list that shows the current site's argv to runner threads and the real one elsewhere."""

    def _cur(self) -> list[str]:
        value = _argv.get()
        return value if value is not None else list.copy(self)

    def __getitem__(self, i):  # type: ignore[override]
        return self._cur()[i]

    def __len__(self) -> int:
        return len(self._cur())

    def __iter__(self):
        return iter(self._cur())

    def __contains__(self, item: object) -> bool:
        return item in self._cur()

    def __repr__(self) -> str:
        return repr(self._cur())

    def __eq__(self, other: object) -> bool:
        return self._cur() == other

    __hash__ = None  # type: ignore[assignment]

    def __add__(self, other):  # type: ignore[override]
        return self._cur() + list(other)

    def index(self, *args):  # type: ignore[override]
        return self._cur().index(*args)

    def count(self, item) -> int:  # type: ignore[override]
        return self._cur().count(item)

    def copy(self) -> list[str]:  # type: ignore[override]
        return list(self._cur())

    def _mutate(self, name: str, *args):
        value = _argv.get()
        if value is None:
            return getattr(list, name)(self, *args)
        return getattr(value, name)(*args)

    def __setitem__(self, i, v):  # type: ignore[override]
        return self._mutate("__setitem__", i, v)

    def __delitem__(self, i):  # type: ignore[override]
        return self._mutate("__delitem__", i)

    def append(self, v) -> None:  # type: ignore[override]
        self._mutate("append", v)

    def extend(self, v) -> None:  # type: ignore[override]
        self._mutate("extend", v)

    def insert(self, i, v) -> None:  # type: ignore[override]
        self._mutate("insert", i, v)

    def pop(self, *args):  # type: ignore[override]
        return self._mutate("pop", *args)

    def remove(self, v) -> None:  # type: ignore[override]
        self._mutate("remove", v)

    def clear(self) -> None:  # type: ignore[override]
        self._mutate("clear")


class _PrefixedStream:
    """Writes from runner threads get '[site] ' at the start of each line."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self._at_line_start = threading.local()

    def write(self, text: str) -> int:
        prefix = _prefix.get()
        if prefix is None:
            return self._inner.write(text)
        start = getattr(self._at_line_start, "v", True)
        out = []
        for piece in text.splitlines(keepends=True):
            if start:
                out.append(prefix)
            out.append(piece)
            start = piece.endswith("\n")
        self._at_line_start.v = start
        self._inner.write("".join(out))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install() -> None:
    """Route sys.argv/stdout/stderr through the per-site ContextVars (reference counted)."""
    global _installed, _saved
    with _install_lock:
        if _installed == 0:
            _saved = (sys.argv, sys.stdout, sys.stderr)
            sys.argv = _ContextArgv(sys.argv)
            sys.stdout = _PrefixedStream(sys.stdout)  # type: ignore[assignment]
            sys.stderr = _PrefixedStream(sys.stderr)  # type: ignore[assignment]
        _installed += 1


def uninstall() -> None:
    global _installed, _saved
    with _install_lock:
        _installed -= 1
        if _installed == 0 and _saved is not None:
            _retired.append((sys.argv, sys.stdout, sys.stderr))
            sys.argv, sys.stdout, sys.stderr = _saved
            _saved = None


def set_site_io(argv: list[str], prefix: str) -> None:
    """Called inside a site's own context, before its script runs."""
    _argv.set(list(argv))
    _prefix.set(prefix)
