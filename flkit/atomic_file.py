"""Replacing a file atomically: written under a temporary name in the same folder, then renamed.

Why one helper: the server's models and state, a site's own state (SCAFFOLD's control variate) and
`flkit report`'s pages are all files a crash must leave whole or untouched. Imports nothing heavy
(no torch), so the report and the command line can use it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_file(path: Path, write: Callable[[str], None], durable: bool = True) -> None:
    """Have ``write(tmp_name)`` write the file, then let it replace ``path`` in one rename (fsync'd
    first when ``durable``). A failure leaves ``path`` as it was and no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """``data`` as the new content of ``path``, replaced atomically."""
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    atomic_write_file(path, write, durable)


__all__ = ["atomic_write_bytes", "atomic_write_file"]
