"""Strategies by name: how a job names its strategy in ``job.json`` without a class path or a pickle.

``@register("name")`` puts a Strategy class under a name; ``create(name, args)`` builds it with
JSON keyword arguments. flkit's own strategies are known by name before their module is
imported (importing them costs torch). A custom strategy lives in a Python file inside the job
folder that ``job.json`` names (``"strategy": {"name": ..., "args": {...}, "file": "custom/x.py"}``);
``load_file`` runs it so its ``@register`` takes effect: the same trust as the job's scripts,
which also come from the job folder and run as they are.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from flkit.errors import ConfigError
from flkit.strategy.base import Strategy

NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# flkit's own strategies: name -> module that registers it (imported on first use).
BUILTIN = {"fedavg": "flkit.strategy.fedavg", "median": "flkit.strategy.robust",
           "trimmed-mean": "flkit.strategy.robust", "krum": "flkit.strategy.robust",
           "fedavgm": "flkit.strategy.fedopt", "fedadam": "flkit.strategy.fedopt", "fedyogi": "flkit.strategy.fedopt",
           "fedadagrad": "flkit.strategy.fedopt", "fedprox": "flkit.strategy.fedprox",
           "scaffold": "flkit.strategy.scaffold"}

S = TypeVar("S", bound=type)

_lock = threading.Lock()
_classes: dict[str, type] = {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"strategy name {name!r} is not allowed: use 1-64 lowercase letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit")
    return name


def register(name: str) -> Callable[[S], S]:
    """Class decorator: make a Strategy subclass known as ``name`` (for ``job.json``, the job API and
    ``flkit simulate --strategy``). A name belongs to one class; the same class registered again
    (its module run a second time, e.g. by a second job in one process) takes the name over."""
    _check_name(name)

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"@register({name!r}) decorates Strategy subclasses, not {cls!r}")
        with _lock:
            known = _classes.get(name)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__) \
                    and not _same_job_file(known, cls):
                raise ConfigError(f"strategy name {name!r} is already taken by {known.__module__}.{known.__qualname__}")
            _classes[name] = cls
            setattr(cls, "strategy_name", name)  # noqa: B010 - the name an export writes back
        return cls

    return decorate


def _same_job_file(a: type, b: type) -> bool:
    """Both classes come from a strategy file of a job folder and have the same name (a job loaded
    twice, or edited between two runs in one process)."""
    return a.__module__.startswith(_FILE_MODULE) and b.__module__.startswith(_FILE_MODULE) \
        and a.__qualname__ == b.__qualname__


def names() -> list[str]:
    """Every strategy name a job can use now: flkit's own, and those registered so far."""
    with _lock:
        return sorted(set(BUILTIN) | set(_classes))


def _class_of(name: str) -> type:
    with _lock:
        cls = _classes.get(name)
    if cls is None and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
        with _lock:
            cls = _classes.get(name)
    if cls is None:
        raise ConfigError(f"unknown strategy {name!r}; known: {', '.join(names())} (a custom strategy is registered "
                          "with @flkit.strategy.register in a file the job names)")
    return cls


def create(name: str, args: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy registered as ``name``, built with keyword ``args`` (JSON values)."""
    cls = _class_of(_check_name(name))
    kwargs = check_args(args, name)
    try:
        built = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"strategy {name!r} cannot be built with arguments {sorted(kwargs)}: {exc}") from None
    except (ValueError, ConfigError) as exc:
        raise ConfigError(f"strategy {name!r}: {exc}") from None
    if not isinstance(built, Strategy):
        raise ConfigError(f"strategy {name!r} did not build a Strategy")
    return built


def check_args(args: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """``args`` as a plain dict of JSON values (what job.json can hold), or ConfigError."""
    if args is None:
        return {}
    if not isinstance(args, Mapping) or not all(isinstance(k, str) for k in args):
        raise ConfigError(f"strategy {name!r}: arguments must be a dict with string keys, got {args!r:.200}")
    try:
        return dict(json.loads(json.dumps(dict(args), allow_nan=False)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {name!r}: arguments must be JSON values (they are written to job.json): "
                          f"{exc}") from None


def name_of(strategy: Strategy) -> str | None:
    """The name ``strategy``'s own class was registered under (not a parent's: a subclass needs its
    own name), or None."""
    name = vars(type(strategy)).get("strategy_name")
    return name if isinstance(name, str) else None


def spec_of(strategy: Strategy) -> dict[str, Any]:
    """``{"name", "args"}`` that rebuild ``strategy`` with ``create`` (what an export writes)."""
    name = name_of(strategy)
    if name is None or _classes.get(name) is not type(strategy):
        raise ConfigError(f"{type(strategy).__name__} is not a registered strategy: decorate it with "
                          "@flkit.strategy.register('name') so a job can name it")
    return {"name": name, "args": check_args(strategy.args, name)}


_FILE_MODULE = "flkit_job_strategy_"


def load_file(path: Path) -> list[str]:
    """Run a strategy file (a job folder's) so the strategies it registers are known; their names.

    The caller has checked that ``path`` lies inside the job folder."""
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise ConfigError(f"strategy file {path} is not a Python file")
    module_name = _FILE_MODULE + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load strategy file {path}")
    module = importlib.util.module_from_spec(spec)
    with _lock:
        before = dict(_classes)
    try:
        spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"strategy file {path.name} failed to load: {type(exc).__name__}: {exc}") from exc
    with _lock:
        return sorted(name for name, cls in _classes.items() if before.get(name) is not cls)


def check_spec(data: object, job_root: Path | None = None) -> dict[str, Any]:
    """A job's ``"strategy"`` entry, checked: ``{"name": str, "args": {...}, "file": path or absent}``.
    ``file`` is relative to the job folder and must stay inside it."""
    if not isinstance(data, dict):
        raise ConfigError(f"job 'strategy' must be {{'name': ..., 'args': {{...}}}}, got {data!r:.200}")
    unknown = set(data) - {"name", "args", "file"}
    if unknown:
        raise ConfigError(f"job 'strategy' has unknown keys {sorted(unknown)} (known: name, args, file)")
    name = _check_name(data.get("name"))
    out: dict[str, Any] = {"name": name, "args": check_args(data.get("args"), name)}
    file = data.get("file")
    if file is not None:
        if not isinstance(file, str) or not file:
            raise ConfigError(f"strategy file must be a path inside the job folder, got {file!r}")
        if job_root is not None:
            resolved = (job_root / file).resolve()
            if not resolved.is_relative_to(job_root.resolve()):
                raise ConfigError(f"strategy file {file!r} is outside the job folder")
            if not resolved.is_file():
                raise ConfigError(f"strategy file {file!r} is missing from the job folder")
        out["file"] = file
    return out


def from_spec(spec: Mapping[str, Any], job_root: Path | None = None) -> Strategy:
    """Build the strategy a checked job spec names (running its file first, if it has one)."""
    checked = check_spec(dict(spec), job_root)
    if "file" in checked:
        if job_root is None:
            raise ConfigError("a strategy file needs the job folder it lives in")
        load_file(job_root / checked["file"])
    return create(checked["name"], checked["args"])


__all__ = ["BUILTIN", "check_args", "check_spec", "create", "from_spec", "load_file", "name_of", "names", "register",
           "spec_of"]
