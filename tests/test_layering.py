"""The layering of ../shared/ARCHITECTURE.md, checked on the import statements of every module.

No module above the transports imports grpc or the generated protobuf code; the gRPC servicer
talks to the JobService only (not to the registry or the controller); the domain types import
nothing of flkit but errors.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = [REPO / "flkit", REPO / "flkit_lightning"]
GRPC = ("grpc", "flkit.wire.flkit_pb2", "flkit.wire.flkit_pb2_grpc")
# The only modules that may speak gRPC: the transports, the server's endpoint, the wire itself.
GRPC_ALLOWED = {
    "flkit/transport/grpc_transport.py",
    "flkit/transport/tls.py",  # credentials of a startup kit, for gRPC channels and servers
    "flkit/server/service.py",
    "flkit/server/server.py",
    "flkit/server/identity.py",  # the endpoint's interceptor: a caller's identity from its certificate
    "flkit/wire/flkit_pb2.py",
    "flkit/wire/flkit_pb2_grpc.py",
}


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _modules() -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): _imports(p) for pkg in PACKAGES for p in sorted(pkg.rglob("*.py"))}


def test_nothing_above_the_transports_imports_grpc():
    offenders = {name: sorted(i for i in imports if i == "grpc" or i.startswith(("grpc.", *GRPC)))
                 for name, imports in _modules().items() if name not in GRPC_ALLOWED}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}, f"modules above the transports import gRPC: {offenders}"


def test_the_servicer_only_maps_protobuf_to_the_job_service():
    imports = _modules()["flkit/server/service.py"]
    forbidden = [i for i in imports if i.startswith(("flkit.server.controller", "flkit.server.sites",
                                                     "flkit.server.persistor", "flkit.strategy"))]
    assert forbidden == [], f"the servicer reaches past the JobService: {forbidden}"
    assert "flkit.server.job_service" in imports


def test_the_client_side_knows_transports_not_the_server():
    """Sites reach the server through a transport only. The memory transport names the JobService it
    calls, for type checkers only (the server registers itself with it at run time)."""
    for name, imports in _modules().items():
        if name == "flkit/transport/memory.py":
            source = (REPO / name).read_text()
            assert "if TYPE_CHECKING:\n    from flkit.server.job_service import JobService" in source
            continue
        if name.startswith(("flkit/client/", "flkit/transport/", "flkit_lightning/")) or name == "flkit/api.py":
            server = sorted(i for i in imports if i.startswith("flkit.server"))
            assert server == [], f"{name} imports the server: {server}"


def test_the_domain_types_stand_alone():
    imports = _modules()["flkit/messages.py"]
    flkit_deps = sorted(i for i in imports if i.startswith("flkit") and not i.startswith("flkit.errors"))
    # Params is only named for type checkers (under TYPE_CHECKING): the codec is never imported at run time.
    assert set(flkit_deps) <= {"flkit.wire.codec", "flkit.wire.codec.Params"}, flkit_deps
    source = (REPO / "flkit" / "messages.py").read_text()
    assert "if TYPE_CHECKING:" in source


def test_the_controller_knows_the_strategy_abc_not_fedavg():
    """The round loop uses Strategy and Aggregator only: any registered strategy runs in it."""
    imports = _modules()["flkit/server/controller.py"]
    assert "flkit.strategy.base" in imports
    assert not [i for i in imports if i.startswith("flkit.strategy.fedavg")]
