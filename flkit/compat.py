"""Saying so when an NVFlare argument has no effect in flkit.

NVFlare job scripts pass arguments that only mean something inside NVFlare (pipes, cell
connections, executor objects). flkit accepts them, so the script runs with its import
changed, and names each one in a warning instead of ignoring it silently or failing with a
TypeError. They are ``warnings``, so Python shows each once per line of the user's code that
caused it (a loop building one runner per site warns once), and ``-W`` or ``filterwarnings``
can silence them by category.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

# flkit's own packages: frames in them are not the user's (a separator ends each, so a user's
# folder that merely starts with the same name, e.g. flkit_examples/, is the user's).
_PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parent.parent / name) + os.sep
                      for name in ("flkit", "flkit_lightning"))


class IgnoredArgumentWarning(UserWarning):
    """An NVFlare argument was accepted but has no effect in flkit (the message says why)."""


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside flkit, so the warning points at the user's line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIRS):
        frame = frame.f_back
        level += 1
    return level


def warn_ignored(owner: str, argument: str, why: str) -> None:
    """Warn that ``owner``'s ``argument`` has no effect here, and why."""
    warnings.warn(f"{owner}: {argument} is accepted but has no effect in flkit: {why}", IgnoredArgumentWarning,
                  stacklevel=_user_stacklevel())


def warn_if_set(owner: str, values: dict[str, Any], defaults: dict[str, Any], why: dict[str, str]) -> None:
    """``warn_ignored`` for every argument in ``why`` whose value differs from NVFlare's default."""
    for name, reason in why.items():
        value = values.get(name, defaults.get(name))
        if _plain(value) != _plain(defaults.get(name)):
            warn_ignored(owner, name, reason)


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)
