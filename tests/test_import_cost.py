"""Importing flkit is cheap: ``import flkit`` loads no gRPC and starts no thread (the orphan
watchdog starts at ``flkit.init()``), and ``import flkit.errors``, ``flkit.cli`` and every
``flkit ... --help`` import neither torch nor gRPC. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

COMMANDS = ("simulate", "server", "client", "report")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLKIT_")}
    env.update(extra)
    return env


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env or _clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _report(code: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` (which prints one JSON object on its last line) and return that object."""
    return json.loads(_python(code, env).stdout.splitlines()[-1])


IMPORT_FLKIT = """
import json, sys, threading
import flkit
print(json.dumps({"grpc": "grpc" in sys.modules, "api": "flkit.api" in sys.modules,
                  "threads": [t.name for t in threading.enumerate()]}))
"""


@pytest.mark.parametrize("launched", [False, True], ids=["plain", "launched-by-the-runner"])
def test_import_flkit_loads_no_grpc_and_starts_no_thread(launched):
    # As a process flkit's runner launched (FLKIT_LAUNCHER_PID names a live launcher: this one),
    # the orphan watchdog would have started at import before; now it waits for flkit.init().
    env = _clean_env(FLKIT_LAUNCHER_PID=str(os.getpid())) if launched else _clean_env()
    report = _report(IMPORT_FLKIT, env)
    assert report == {"grpc": False, "api": False, "threads": ["MainThread"]}


def test_the_watchdog_starts_at_init_in_a_launched_process():
    # No FLKIT_SERVER etc.: init() fails with its ConfigError, but the watchdog starts first.
    code = """
import json, sys, threading
import flkit as flare
before = [t.name for t in threading.enumerate()]
try:
    flare.init()
except flare.ConfigError:
    pass
print(json.dumps({"before": before, "after": sorted(t.name for t in threading.enumerate())}))
"""
    report = _report(code, _clean_env(FLKIT_LAUNCHER_PID=str(os.getpid())))
    assert report == {"before": ["MainThread"], "after": ["MainThread", "flkit-orphan-watchdog"]}
    # Not launched by the runner: init() starts no watchdog.
    assert _report(code, _clean_env())["after"] == ["MainThread"]


def test_flkit_errors_and_cli_import_neither_torch_nor_grpc():
    code = """
import json, sys
import flkit.errors, flkit.cli
print(json.dumps({name: name in sys.modules for name in ("torch", "grpc", "flkit.api")}))
"""
    assert _report(code) == {"torch": False, "grpc": False, "flkit.api": False}


def test_tracking_does_not_import_the_client_api():
    # flkit.tracking and flkit.api both use flkit.client.current; neither imports the other's module.
    code = """
import json, sys
import flkit.tracking
print(json.dumps({"api": "flkit.api" in sys.modules, "grpc": "grpc" in sys.modules}))
"""
    assert _report(code) == {"api": False, "grpc": False}


def test_cli_help_exits_0_names_the_commands_and_imports_no_torch():
    proc = subprocess.run([sys.executable, "-m", "flkit.cli", "--help"], cwd=REPO, env=_clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout, proc.stdout


@pytest.mark.parametrize("args", [["--help"], *([c, "--help"] for c in COMMANDS)],
                         ids=["flkit", *COMMANDS])
def test_every_help_imports_neither_torch_nor_grpc(args):
    # The console script `flkit` is flkit.cli:main (pyproject.toml); call it as that script does.
    code = f"""
import json, sys
from flkit.cli import main
try:
    status = main.main(args={args!r}, prog_name="flkit", standalone_mode=False)
except SystemExit as exc:
    status = exc.code
print(json.dumps({{"status": status or 0, "torch": "torch" in sys.modules, "grpc": "grpc" in sys.modules,
                  "matplotlib": "matplotlib" in sys.modules}}))
"""
    proc = _python(code)
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report == {"status": 0, "torch": False, "grpc": False, "matplotlib": False}
    assert "Usage: flkit" in proc.stdout
    if args == ["--help"]:
        for command in COMMANDS:
            assert command in proc.stdout


def test_the_public_names_are_all_there():
    code = """
import json
import flkit as flare
import flkit.api as api
from flkit.model import FLModel
missing = [name for name in flare.__all__ if getattr(flare, name, None) is None]
print(json.dumps({
    "missing": missing,
    "version": flare.__version__,
    "init_is_api_init": flare.init is api.init,
    "flmodel": flare.FLModel is FLModel,
    "in_dir": sorted(set(flare.__all__) - set(dir(flare))),
    "registry_in_api": [api.current_session() is None, callable(api.require_session)],
}))
"""
    report = _report(code)
    assert report == {"missing": [], "version": "0.1.0", "init_is_api_init": True, "flmodel": True, "in_dir": [],
                      "registry_in_api": [True, True]}
    star = _report("import json\nfrom flkit import *\nprint(json.dumps([init.__module__, FLModel.__name__]))")
    assert star == ["flkit.api", "FLModel"]


def test_an_unknown_name_is_still_an_attribute_error():
    code = """
import flkit
try:
    flkit.not_a_name
except AttributeError as exc:
    print(exc)
"""
    assert "has no attribute 'not_a_name'" in _python(code).stdout
