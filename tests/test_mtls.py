"""Mutual TLS with provisioned kits: a site is who its certificate says, on a real server on loopback.

Raw gRPC stubs play the attacker: a site with another project's certificate, a site presenting
another site's name, a revoked site with an open call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from flkit.client.session import Session
from flkit.client.settings import SiteSettings
from flkit.deploy.kit import load_kit
from flkit.deploy.provision import add_site, provision, revoke
from flkit.errors import CommunicationError
from flkit.messages import ErrorCode, ServiceError
from flkit.runner.ports import free_port
from flkit.server.config import WorkflowConfig
from flkit.server.server import FLServer
from flkit.transport.grpc_transport import GrpcTransport
from flkit.transport.tls import channel_credentials, channel_options
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.grpc_options import ERROR_KEY, OPTIONS, PROTOCOL_VERSION

from conftest import REPO, SCRIPTS, finish

PARAMS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}


def _kits(folder: Path, name: str = "demo", sites: tuple[str, ...] = ("site-1", "site-2"), port: int = 8002) -> Path:
    project = folder / f"{name}.yml"
    project.write_text(json.dumps({"name": name, "server": {"host": "localhost", "port": port},
                                   "sites": list(sites), "admins": ["admin"]}))
    out = folder / f"kits-{name}"
    provision(project, out)
    return out


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    return _kits(tmp_path_factory.mktemp("mtls"))


def _server(kits: Path, tmp_path: Path, sites=("site-1", "site-2"), **workflow) -> FLServer:
    cfg = WorkflowConfig.from_dict({"num_rounds": 1, "min_clients": 1, "join_timeout_s": 60, **workflow})
    srv = FLServer(cfg, list(sites), PARAMS, tmp_path / "server", job_id="job", address="127.0.0.1:0",
                   kit=load_kit(kits / "server"), shared_memory=False)
    srv.start()
    return srv


def _stub(kits_dir: Path, who: str, port: int) -> tuple[grpc.Channel, pb_grpc.FLKitStub]:
    kit = load_kit(kits_dir / who)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(kit), options=OPTIONS + channel_options(kit))
    return channel, pb_grpc.FLKitStub(channel)


def _until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _join(stub, site: str) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(site_name=site, job_id="job", protocol_version=PROTOCOL_VERSION), timeout=10)


def _error_code(exc: grpc.RpcError) -> str | None:
    return dict(exc.trailing_metadata() or ()).get(ERROR_KEY)


def test_sites_join_over_mtls_and_cannot_act_for_another_site(kits, tmp_path):
    srv = _server(kits, tmp_path)
    try:
        ch1, site1 = _stub(kits, "site-1", srv.port)
        ch2, site2 = _stub(kits, "site-2", srv.port)
        reply = _join(site1, "site-1")
        assert reply.session_id
        # site-2's certificate presenting site-1's name
        with pytest.raises(grpc.RpcError) as err:
            _join(site2, "site-1")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert _error_code(err.value) == ErrorCode.FORBIDDEN.value
        assert "site-2" in err.value.details() and "site-1" in err.value.details()
        # site-2 using site-1's session: heartbeat, task, failure report
        with pytest.raises(grpc.RpcError) as err:
            site2.Heartbeat(pb.HeartbeatRequest(session_id=reply.session_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            site2.ReportFailure(pb.FailureReport(site_name="site-1", job_id="job", reason="framed"), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            list(site2.GetTask(pb.GetTaskRequest(session_id=reply.session_id, wait_s=0), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # a result for site-1's session sent with site-2's certificate: refused before any payload is read
        header = pb.ResultChunk(header=pb.ResultHeader(session_id=reply.session_id, task_id="t", payload_size=8))
        with pytest.raises(grpc.RpcError) as err:
            site2.SubmitResult(iter([header, pb.ResultChunk(payload=b"\0" * 8)]), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # site-1 is unharmed
        assert site1.Heartbeat(pb.HeartbeatRequest(session_id=reply.session_id), timeout=10).job_running
        assert srv.registry.sites["site-1"].failure is None
        # an admin certificate is no site
        cha, admin = _stub(kits, "admin", srv.port)
        with pytest.raises(grpc.RpcError) as err:
            _join(admin, "admin")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        for ch in (ch1, ch2, cha):
            ch.close()
    finally:
        srv.stop()


def test_a_certificate_of_another_project_is_refused_at_the_handshake(kits, tmp_path):
    other = _kits(tmp_path, name="other")
    srv = _server(kits, tmp_path)
    try:
        settings = SiteSettings(server=f"127.0.0.1:{srv.port}", site_name="site-1", job_id="job", token="",
                                kit=str(other / "site-1"), connect_timeout_s=2.0, workspace=str(tmp_path),
                                transport="grpc")  # not the memory transport of this process
        session = Session(settings)
        with pytest.raises(CommunicationError) as err:
            session.connect()
        text = str(err.value)
        assert "TLS" in text and "certificate" in text, text
        session.transport.close()
        assert srv.registry.sites["site-1"].session_id is None
        # plain text to a TLS server is refused too
        plain = GrpcTransport(f"127.0.0.1:{srv.port}")
        with pytest.raises(ServiceError) as err:
            plain.join("site-1", "job", "", timeout=2)
        assert err.value.code == ErrorCode.UNAVAILABLE
        plain.close()
    finally:
        srv.stop()


def test_revoking_a_site_closes_its_open_call_and_refuses_the_next(tmp_path):
    kits = _kits(tmp_path)
    srv = _server(kits, tmp_path)
    try:
        ch, site2 = _stub(kits, "site-2", srv.port)
        sid = _join(site2, "site-2").session_id
        waiting: dict[str, object] = {}

        def wait_for_task():  # the round never starts (site-1 never joins): the call stays open
            try:
                waiting["items"] = list(site2.GetTask(pb.GetTaskRequest(session_id=sid, wait_s=25), timeout=60))
            except grpc.RpcError as exc:
                waiting["error"] = exc

        thread = threading.Thread(target=wait_for_task)
        thread.start()
        _until(lambda: "site-2" in srv._watcher.interceptor._active, "site-2's call to be open at the server")
        revoke(kits, "site-2")  # the server's kit watcher (every second) picks it up: no restart, no call here
        thread.join(10)
        assert not thread.is_alive(), "the revoked site's open call was not closed"
        assert waiting["error"].code() == grpc.StatusCode.CANCELLED
        with pytest.raises(grpc.RpcError) as err:
            _join(site2, "site-2")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "site-2" in err.value.details() and "revoked" in err.value.details()
        assert "revoked" in (srv.registry.sites["site-2"].failure or "")
        ch.close()
    finally:
        srv.stop()


def test_a_site_added_while_the_server_runs_can_join(tmp_path):
    kits = _kits(tmp_path)
    cfg = WorkflowConfig.from_dict({"num_rounds": 1, "min_clients": 1, "join_timeout_s": 60})
    srv = FLServer(cfg, ["site-1", "site-2"], PARAMS, tmp_path / "server", job_id="job", address="127.0.0.1:0",
                   kit=load_kit(kits / "server"), shared_memory=False, accept_new_sites=True)
    srv.start()
    try:
        add_site(kits, "site-3")
        _until(lambda: "site-3" in srv.registry.sites, "the kit watcher to admit site-3")
        ch, site3 = _stub(kits, "site-3", srv.port)
        assert _join(site3, "site-3").session_id
        assert "site-3" in srv.registry.sites
        ch.close()
    finally:
        srv.stop()


def test_a_job_site_without_a_certificate_is_a_setup_error(kits, tmp_path):
    cfg = WorkflowConfig.from_dict({"num_rounds": 1})
    with pytest.raises(Exception, match="site-9.*flkit provision --add-site"):
        FLServer(cfg, ["site-1", "site-9"], PARAMS, tmp_path / "s", job_id="job", kit=load_kit(kits / "server"))


@pytest.mark.slow
def test_a_job_over_mtls_with_flkit_server_and_flkit_client_processes(tmp_path):
    from flkit.job import FedAvgJob, ScriptRunner

    port = free_port()
    kits = _kits(tmp_path, port=port)
    job = FedAvgJob(name="mtls", initial_model=torch.nn.Linear(4, 2), n_clients=2, num_rounds=2)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "crash_in_round.py"), script_args="--crash_round 99"))
    job_dir = job.export_job(tmp_path / "jobs")
    flkit = [sys.executable, "-m", "flkit.cli"]
    server = subprocess.Popen([*flkit, "server", str(job_dir), "--host", "127.0.0.1", "--port", str(port),
                               "--kit", str(kits / "server"), "-w", str(tmp_path / "server")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen([*flkit, "client", str(job_dir), "--kit", str(kits / site),
                                 "--server", f"127.0.0.1:{port}", "-w", str(tmp_path / site)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for site in ("site-1", "site-2")]
    server_out, *client_outs = finish([server, *clients])
    assert server.returncode == 0, server_out
    assert "mutual TLS" in server_out
    assert [c.returncode for c in clients] == [0, 0], client_outs
    state = json.loads((tmp_path / "server" / "round_state.json").read_text())
    assert state["status"] == "completed" and state["completed_rounds"] == 2


def test_server_and_client_need_a_kit_or_an_explicit_insecure(tmp_path, kits):
    from click.testing import CliRunner

    from flkit.cli import main

    job = tmp_path / "job"
    job.mkdir()
    out = CliRunner().invoke(main, ["server", str(job)])
    assert out.exit_code != 0 and "--kit" in out.output and "--insecure" in out.output
    out = CliRunner().invoke(main, ["client", str(job), "--kit", str(kits / "site-1"), "--site", "site-2"])
    assert out.exit_code != 0 and "site-1's" in out.output
    out = CliRunner().invoke(main, ["client", str(job), "--kit", str(kits / "server")])
    assert out.exit_code != 0 and "not a site's" in out.output


def test_flkit_status_and_prodenv_follow_a_running_job_with_an_admin_certificate(tmp_path):
    from click.testing import CliRunner

    from flkit.cli import main
    from flkit.job import ProdEnv
    from flkit.job.envs import ABORTED, RUNNING

    kits = _kits(tmp_path)
    srv = _server(kits, tmp_path)
    try:
        address = f"127.0.0.1:{srv.port}"
        out = CliRunner().invoke(main, ["status", "--kit", str(kits / "admin"), "--server", address, "--json"])
        assert out.exit_code == 0, out.output
        state = json.loads(out.output[out.output.index("{"):])
        assert state["job_id"] == "job" and state["phase"] == "waiting for sites"
        assert {s["name"] for s in state["sites"]} == {"site-1", "site-2"}
        out = CliRunner().invoke(main, ["status", "--kit", str(kits / "admin"), "--server", address])
        assert out.exit_code == 0 and "site-1" in out.output and "days left" in out.output
        out = CliRunner().invoke(main, ["status", "--kit", str(kits)])  # every certificate's expiry
        assert out.exit_code == 0 and "site-2" in out.output and "admin" in out.output
        # a site's certificate may not ask
        ch, site1 = _stub(kits, "site-1", srv.port)
        with pytest.raises(grpc.RpcError) as err:
            site1.Status(pb.StatusRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        ch.close()

        env = ProdEnv(str(kits / "admin"), server=address, workspace_root=str(tmp_path / "jobs"))
        assert env.get_job_status("job") == RUNNING
        with pytest.raises(Exception, match="serves job 'job', not 'other'"):
            env.get_job_status("other")
        env.abort_job("job")
        assert srv.wait(10).failed and "aborted by admin admin" in srv.outcome.reason
        assert env.get_job_status("job") == ABORTED
        assert env.get_job_result("job", timeout=5) == str(tmp_path / "server")
    finally:
        srv.stop()


def test_the_admin_calls_are_refused_by_a_plain_text_server(tmp_path):
    cfg = WorkflowConfig.from_dict({"num_rounds": 1})
    srv = FLServer(cfg, ["site-1"], PARAMS, tmp_path / "server", job_id="job", address="127.0.0.1:0",
                   shared_memory=False)
    srv.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        stub = pb_grpc.FLKitStub(channel)
        for call, request in ((stub.Status, pb.StatusRequest()), (stub.Abort, pb.AbortRequest(reason="x"))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "admin certificate" in err.value.details()
        assert srv.registry.end is None
        channel.close()
    finally:
        srv.stop()


def test_a_join_already_past_the_certificate_check_when_the_site_is_revoked_is_refused(tmp_path):
    from flkit.server.sites import SiteRegistry

    registry = SiteRegistry("job", ["site-1"], None, 60.0, {})
    registry.revoke("site-1")  # the revocation lands between the interceptor's check and the join
    with pytest.raises(ServiceError) as err:
        registry.join("site-1", "job", "")
    assert err.value.code == ErrorCode.BAD_TOKEN and "revoked" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_the_simulator_over_mtls_pools_sites_under_a_worker_certificate(tmp_path, backend, caplog):
    """The pool's workers (processes, or Ray actors) connect back over mutual TLS with the worker kit."""
    from flkit.job import FedAvgJob, ScriptRunner
    from flkit.sim.simulator import simulate

    if backend == "ray":
        pytest.importorskip("ray", reason='the Ray backend needs the flkit[ray] extra (part of "dev")')

    job = FedAvgJob(name="simtls", initial_model=torch.nn.Linear(3, 2), n_clients=4, num_rounds=2)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "round_site_update.py")))
    with caplog.at_level("INFO", logger="flkit.server"):
        result = simulate(job.export_job(tmp_path / "jobs"), tmp_path / "ws", threads=2, backend=backend,
                          quiet=True, tls=True)
    assert result.ok, result.reason
    assert "(mutual TLS)" in caplog.text  # the server took only TLS: the workers' links were TLS
    worker = load_kit(tmp_path / "ws" / "kits" / "pool-worker")
    assert worker.role == "worker"
    assert not (tmp_path / "ws" / "kits" / "site-1").exists()  # pooled sites need no certificate of their own


def test_a_worker_certificate_acts_only_for_the_pools_sessions(tmp_path):
    project = tmp_path / "p.yml"
    project.write_text(json.dumps({"name": "w", "server": {"host": "localhost", "port": 8002},
                                   "sites": ["site-1"], "workers": ["worker-1"]}))
    provision(project, tmp_path / "kits")
    kits = tmp_path / "kits"
    cfg = WorkflowConfig.from_dict({"num_rounds": 1, "min_clients": 1, "join_timeout_s": 60})
    srv = FLServer(cfg, ["site-1", "pooled-1"], PARAMS, tmp_path / "server", job_id="job", address="127.0.0.1:0",
                   kit=load_kit(kits / "server"), shared_memory=False, vouched_sites=frozenset({"pooled-1"}))
    srv.start()
    try:
        pooled = srv.service.join("pooled-1", "job", "", local=True).session_id  # as the simulator's pool does
        ch1, site1 = _stub(kits, "site-1", srv.port)
        beating = _join(site1, "site-1").session_id
        chw, worker = _stub(kits, "worker-1", srv.port)
        with pytest.raises(grpc.RpcError) as err:
            _join(worker, "pooled-1")  # a worker never joins
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:  # nor uses a session of a site that connects by itself
            list(worker.GetTask(pb.GetTaskRequest(session_id=beating, wait_s=0), timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:  # nor calls what a pooled site never needs
            worker.Heartbeat(pb.HeartbeatRequest(session_id=pooled), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        chunks = list(worker.GetTask(pb.GetTaskRequest(session_id=pooled, wait_s=0), timeout=10))
        assert chunks  # the pool's own session: served
        for ch in (ch1, chw):
            ch.close()
    finally:
        srv.stop()
