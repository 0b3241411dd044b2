"""Which code a job folder needs: the script and the local modules it imports, nothing else.

NVFlare places a script at ``custom/<its path as given>`` (``src/train.py`` ->
``custom/src/train.py``) and brings the local modules it imports along. flkit does the same,
so NVFlare launch commands such as ``python3 -u custom/src/train.py`` name the right file.
"Local" means a module file or package next to the script (or next to a module already
taken), found by reading the import statements with ``ast``: data, logs, checkpoints and
unrelated scripts in the same folder stay out of the job.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path, PurePosixPath

from flkit.errors import ConfigError
from flkit.runner.external import CODE_DIR


def script_destination(script: str) -> PurePosixPath:
    """Where a script given as ``script`` lands inside the job folder (``custom/...``)."""
    path = PurePosixPath(Path(script).as_posix())
    if path.is_absolute() or ".." in path.parts:
        return PurePosixPath(CODE_DIR, path.name)
    return PurePosixPath(CODE_DIR, *[p for p in path.parts if p != "."])


def local_modules(script: Path) -> list[Path]:
    """The script and every local module or package it imports, directly or through each other."""
    script = script.resolve()
    root = script.parent
    todo, seen = [script], {script}
    while todo:
        current = todo.pop()
        for found in _imported_files(current, root):
            if found not in seen:
                seen.add(found)
                todo.append(found)
    return sorted(seen)


def _imported_files(path: Path, root: Path) -> list[Path]:
    if path.suffix != ".py":
        return []
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read as Python ({exc})") from None
    names: list[tuple[str, Path]] = []  # (dotted name, folder it is relative to)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, root) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = root if node.level == 0 else _up(path.parent, node.level - 1)
            module = node.module or ""
            names.append((module, base))
            names += [(f"{module}.{alias.name}".strip("."), base) for alias in node.names]
    found = []
    for dotted, base in names:
        if not dotted:
            continue
        target = base.joinpath(*dotted.split("."))
        for candidate in (target.with_suffix(".py"), target / "__init__.py"):
            if candidate.is_file() and candidate.resolve().is_relative_to(root):
                found.append(candidate.resolve())
    return found


def _up(folder: Path, levels: int) -> Path:
    for _ in range(levels):
        folder = folder.parent
    return folder


def copy_script(script: Path, job_dir: Path, destination: PurePosixPath, placed: dict[Path, Path]) -> None:
    """Copy the script to ``job_dir/destination`` and its local modules beside it, keeping their
    layout relative to the script's folder. ``placed`` (target -> source, shared by every script
    of the job) refuses two different files for one place: two sites' ``helper.py`` from two
    folders must not overwrite each other silently."""
    source_root = script.resolve().parent
    dest_root = job_dir.joinpath(*destination.parts).parent
    for path in local_modules(script):
        target = dest_root / path.relative_to(source_root)
        if path == script.resolve():
            target = job_dir.joinpath(*destination.parts)
        earlier = placed.get(target)
        if earlier is not None and earlier != path:
            raise ConfigError(f"{earlier} and {path} would both be {target.relative_to(job_dir)} in the job "
                              "folder; put the scripts in one folder or give their modules different names")
        placed[target] = path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
