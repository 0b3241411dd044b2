"""The README's NVFlare import table holds: every name it lists imports from the flkit module it gives,
and the tests' own import rewriting (conftest.NVFLARE_IMPORTS) agrees with it."""

from __future__ import annotations

import importlib
import re

import pytest

from conftest import NVFLARE_IMPORTS, REPO


def _table_rows() -> list[tuple[str, str]]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## NVFlare drop-in"):]
    table = section[: section.index("**Behaviours")]
    rows = []
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        nvflare_cell, flkit_cell = [cell.strip() for cell in line.strip().strip("|").split("|")][:2]
        rows.append((re.findall(r"`([^`]+)`", nvflare_cell)[0], re.findall(r"`([^`]+)`", flkit_cell)[0]))
    return rows


ROWS = _table_rows()


def _names(statement: str) -> list[str]:
    return [n.strip() for n in statement.split(" import ", 1)[1].split(",")]


def test_the_table_lists_the_job_api_and_recipe_api():
    listed = {name for nvflare, _ in ROWS if nvflare.startswith("from ") for name in _names(nvflare)}
    for name in ("FedAvgJob", "FedJob", "BaseFedJob", "ScriptRunner", "BaseScriptRunner", "FrameworkType",
                 "SubprocessLauncher", "FedAvg", "IntimeModelSelector", "FedAvgRecipe", "SimEnv", "PocEnv", "Run",
                 "add_experiment_tracking", "add_cross_site_evaluation", "SummaryWriter"):
        assert name in listed, name


@pytest.mark.parametrize(("nvflare", "flkit"), ROWS, ids=[row[0] for row in ROWS])
def test_every_name_in_the_table_imports_from_flkit(nvflare, flkit):
    if flkit.startswith("import "):  # `import nvflare.client as flare` -> `import flkit as flare`
        module = importlib.import_module(flkit.split()[1])
        assert callable(module.receive) and callable(module.send)
        return
    target = flkit.split(" import ", 1)[0].removeprefix("from ").strip()
    module = importlib.import_module(target)
    for name in _names(nvflare):
        assert hasattr(module, name), f"{name} is not importable from {target}"
        assert name in getattr(module, "__all__", [name]), f"{name} is missing from {target}.__all__"


@pytest.mark.parametrize(("nvflare", "flkit"), ROWS, ids=[row[0] for row in ROWS])
def test_the_tests_rewrite_imports_as_the_table_says(nvflare, flkit):
    """Each NVFlare module in the table is one the NVFlare-shaped tests can rewrite."""
    head = nvflare.split(" import ", 1)[0] + " import" if nvflare.startswith("from ") else nvflare
    expected = flkit.split(" import ", 1)[0] + " import" if flkit.startswith("from ") else flkit
    assert NVFLARE_IMPORTS.get(head) == expected
