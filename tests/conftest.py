"""Shared fixtures: a real FLServer on loopback and Sessions that talk to it."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import torch

from flkit.client.session import Session
from flkit.client.settings import SiteSettings
from flkit.server.config import WorkflowConfig
from flkit.server.server import FLServer

SCRIPTS = Path(__file__).parent / "scripts"
NVFLARE_JOBS = Path(__file__).parent / "nvflare_jobs"
REPO = Path(__file__).resolve().parent.parent

# NVFlare import -> flkit import, as the README's table gives them (module prefixes; the imported
# names stay the same).
NVFLARE_IMPORTS = {
    "import nvflare.client as flare": "import flkit as flare",
    "import nvflare.client.lightning as flare": "import flkit_lightning as flare",
    "from nvflare.client.tracking import": "from flkit.tracking import",
    "from nvflare.app_opt.pt.job_config.fed_avg import": "from flkit.job import",
    "from nvflare.app_opt.pt.job_config.base_fed_job import": "from flkit.job import",
    "from nvflare.app_opt.pt.job_config.model import": "from flkit.job import",
    "from nvflare.client.config import": "from flkit.job import",
    "from nvflare.app_common.workflows.cross_site_model_eval import": "from flkit.job import",
    "from nvflare.app_common.widgets.validation_json_generator import": "from flkit.job import",
    "from nvflare.app_opt.tracking.tb.tb_receiver import": "from flkit.job import",
    "from nvflare.app_opt.tracking.mlflow.mlflow_receiver import": "from flkit.job import",
    "from nvflare.app_opt.tracking.wandb.wandb_receiver import": "from flkit.job import",
    "from nvflare.job_config.script_runner import": "from flkit.job import",
    "from nvflare.job_config.api import": "from flkit.job import",
    "from nvflare.app_common.launchers.subprocess_launcher import": "from flkit.job import",
    "from nvflare.app_common.workflows.fedavg import": "from flkit.job import",
    "from nvflare.app_common.widgets.intime_model_selector import": "from flkit.job import",
    "from nvflare.app_opt.pt.recipes.fedavg import": "from flkit.job import",
    "from nvflare.app_opt.pt.recipes.fedeval import": "from flkit.job import",
    "from nvflare.app_opt.pt.recipes import": "from flkit.job import",
    "from nvflare.recipe.sim_env import": "from flkit.job import",
    "from nvflare.recipe.poc_env import": "from flkit.job import",
    "from nvflare.recipe.utils import": "from flkit.job import",
    "from nvflare.recipe import": "from flkit.job import",
    "from nvflare.apis.dxo import": "from flkit.job import",
    "from nvflare.app_common.workflows.scaffold import": "from flkit.job import",
    "from nvflare.app_opt.pt import": "from flkit.pt import",
    "from nvflare.app_opt.pt.fedproxloss import": "from flkit.pt import",
    "from nvflare.app_opt.pt.scaffold import": "from flkit.pt import",
    "from nvflare.app_common.app_constant import": "from flkit import",
}


def nvflare_to_flkit(folder: Path, dest: Path) -> Path:
    """Copy an NVFlare-shaped job folder to ``dest`` with only its nvflare import lines changed."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("__pycache__", "README.md"))
    changed_any = False
    for path in dest.rglob("*.py"):
        lines = path.read_text().splitlines(keepends=True)
        out = []
        for line in lines:
            new = line
            for old, repl in NVFLARE_IMPORTS.items():
                if line.startswith(old + " ") or line.rstrip("\n") == old:
                    new = repl + line[len(old):]
                    break
            assert not re.match(r"\s*(import|from)\s+nvflare", new), f"{path.name}: no flkit import for {line!r}"
            changed_any |= new != line
            out.append(new)
        path.write_text("".join(out))
    assert changed_any, f"{folder} has no nvflare import to change"
    return dest


def with_flkit_import(script: Path, folder: Path) -> Path:
    """Copy an NVFlare-style test script into ``folder`` with only its NVFlare import lines changed
    (as the README's import table says: ``NVFLARE_IMPORTS``)."""
    src = script.read_text()
    lines = []
    for line in src.splitlines(keepends=True):
        for old, repl in NVFLARE_IMPORTS.items():
            if line.startswith(old + " ") or line.rstrip("\n") == old:
                line = repl + line[len(old):]
                break
        lines.append(line)
    changed = "".join(lines)
    diff = [(a, b) for a, b in zip(src.splitlines(), changed.splitlines(), strict=True) if a != b]
    assert diff and all("nvflare" in a for a, _ in diff), "only the import lines may change"
    assert not re.search(r"^\s*(import|from)\s+nvflare", changed, re.M), \
        f"{script.name}: an nvflare import has no flkit equivalent"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / script.name).write_text(changed)
    for helper in ("digits_task.py", "lit_digits.py"):
        (folder / helper).write_text((SCRIPTS / helper).read_text())
    return folder / script.name


class ServerHarness:
    """Start an FLServer with given settings and open sessions to it."""

    def __init__(self, tmp_path: Path, transport: str = "auto") -> None:
        self.tmp_path = tmp_path
        self.transport = transport  # of the sessions: "auto" is memory (the server is in this process)
        self.servers: list[FLServer] = []
        self.sessions: list[Session] = []

    def start(self, initial: dict[str, torch.Tensor], sites: list[str], strategy=None, **workflow) -> FLServer:
        workflow.setdefault("min_clients", len(sites))
        workflow.setdefault("final_validation", False)
        server = FLServer(WorkflowConfig(**workflow), sites, initial, self.tmp_path / "server", job_id="test-job",
                          strategy=strategy)
        server.start()
        self.servers.append(server)
        return server

    def session(self, server: FLServer, site: str, **overrides) -> Session:
        values = {"server": server.address, "site_name": site, "job_id": server.job_id, "token": server.token,
                  "workspace": str(self.tmp_path / site), "transport": self.transport, **overrides}
        settings = SiteSettings(**values)
        session = Session(settings)
        self.sessions.append(session)
        return session

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        for server in self.servers:
            server.stop(grace=0.5)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[ServerHarness]:
    h = ServerHarness(tmp_path)
    yield h
    h.close()


# Every transport a site in a test can use against a server of the test's process.
TRANSPORTS = ["memory", "grpc", "shm"]


@pytest.fixture(params=TRANSPORTS)
def any_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerHarness]:
    """A harness whose sessions use each transport in turn (the protocol must not depend on it)."""
    h = ServerHarness(tmp_path, transport=request.param)
    yield h
    h.close()


def in_threads(target: Callable[[str], None], names: Iterable[str], timeout: float = 60) -> dict[str, BaseException]:
    """Run ``target(name)`` for every name at once, one thread each; what each raised, by name."""
    errors: dict[str, BaseException] = {}

    def run(name: str) -> None:
        try:
            target(name)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            errors[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return errors


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    """Wait for each process (a server first, then its sites) and return their outputs; whatever
    happens, none is left running."""
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    return outs
