"""The new core is fully typed: ``mypy --strict`` passes on its modules (issue 11).

The list of modules lives in one place, pyproject.toml's ``[[tool.mypy.overrides]]`` entry with
``strict = true``; this test reads it from there and runs mypy on exactly those modules with the
project's config (other flkit modules they import are analysed for their types, not reported).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = REPO / "pyproject.toml"


def strict_modules() -> list[str]:
    config: dict[str, Any] = tomllib.loads(PYPROJECT.read_text())
    overrides = config["tool"]["mypy"]["overrides"]
    strict = [o for o in overrides if o.get("strict") is True]
    assert len(strict) == 1, "pyproject.toml should have one [[tool.mypy.overrides]] entry with strict = true"
    assert strict[0].get("ignore_errors") is False, "the strict entry must undo the flkit.* ignore_errors"
    modules = strict[0]["module"]
    return [modules] if isinstance(modules, str) else list(modules)


def test_strict_modules_name_existing_files():
    for module in strict_modules():
        path = REPO / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


def test_core_passes_mypy_strict(tmp_path):
    args = [sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir", str(tmp_path / "mypy")]
    for module in strict_modules():
        args += ["-m", module]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mypy failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"


def test_no_bare_type_ignore_in_strict_modules():
    for module in strict_modules():
        path = REPO / Path(*module.split("."))
        path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        for n, line in enumerate(path.read_text().splitlines(), 1):
            at = line.find("type: ignore")
            if at >= 0:
                assert line[at + len("type: ignore"):].startswith("["), f"{path}:{n}: bare type: ignore"
