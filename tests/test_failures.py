"""Bad input gets a clear error naming the cause; the global model is never corrupted; nothing hangs."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from flkit.client.session import Session
from flkit.client.settings import SiteSettings
from flkit.errors import CommunicationError, FLKitError, ResultRejectedError
from flkit.messages import ErrorCode, ServiceError
from flkit.model import FLModel
from flkit.server.persistor import load_params
from flkit.wire import flkit_pb2 as pb

from conftest import ServerHarness

INITIAL = {"fc.weight": torch.ones(3, 2), "fc.bias": torch.zeros(3)}
GOOD = {"fc.weight": torch.full((3, 2), 2.0), "fc.bias": torch.full((3,), 0.5)}

BAD_RESULTS = {
    "wrong key": ({"fc.weight": torch.ones(3, 2), "fc.bais": torch.zeros(3)}, r"site-bad.*missing \['fc.bias'\]"),
    "wrong shape": ({"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(3)},
                    r"site-bad: tensor 'fc.weight' has shape \(2, 3\), expected \(3, 2\)"),
    "wrong dtype": ({"fc.weight": torch.ones(3, 2, dtype=torch.float64), "fc.bias": torch.zeros(3)},
                    r"site-bad: tensor 'fc.weight' has dtype torch.float64, expected torch.float32"),
    "nan": ({"fc.weight": torch.ones(3, 2), "fc.bias": torch.tensor([0.0, float("nan"), 0.0])},
            r"site-bad: tensor 'fc.bias' has 1 non-finite value"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", list(BAD_RESULTS))
def test_bad_result_is_rejected_and_global_model_stays_clean(harness, kind):
    bad_params, message = BAD_RESULTS[kind]
    server = harness.start(INITIAL, ["site-bad", "site-good"], num_rounds=1, min_clients=1)
    bad, good = harness.session(server, "site-bad"), harness.session(server, "site-good")
    bad.connect(), good.connect()
    assert bad.receive(timeout=30) is not None and good.receive(timeout=30) is not None
    with pytest.raises(ResultRejectedError, match=message):
        bad.send(FLModel(params=bad_params))
    good.send(FLModel(params=GOOD, metrics={"accuracy": 1.0}))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    saved = load_params(server.persistor.global_model_path)
    for name, value in GOOD.items():  # only the good site's params made it in
        assert torch.equal(saved[name], value), name
    assert server.controller.history[0].failed["site-bad"].startswith("result rejected: site site-bad")


def test_rejection_fails_the_job_when_min_clients_cannot_be_met(harness):
    server = harness.start(INITIAL, ["site-bad"], num_rounds=2)
    bad = harness.session(server, "site-bad")
    bad.receive(timeout=30)
    with pytest.raises(ResultRejectedError, match="non-finite"):
        bad.send(FLModel(params={**GOOD, "fc.weight": torch.full((3, 2), float("inf"))}))
    outcome = server.wait(30)
    assert outcome.failed and "site-bad" in outcome.reason and "non-finite" in outcome.reason
    assert not server.persistor.global_model_path.exists()  # nothing was aggregated or saved


def test_receive_timeout_without_server_raises_in_about_the_timeout(tmp_path):
    settings = SiteSettings(server=f"127.0.0.1:{_free_port()}", site_name="site-1", job_id="j", token="t",
                            workspace=str(tmp_path))
    session = Session(settings)
    start = time.monotonic()
    with pytest.raises(CommunicationError, match="did not answer"):
        session.receive(timeout=1)
    elapsed = time.monotonic() - start
    session.close()
    assert elapsed < 3.0, f"receive(timeout=1) took {elapsed:.1f} s"


def test_receive_timeout_with_no_task_returns_none(harness):
    # Two sites expected, one joins: the round cannot start, so no task comes.
    server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1)
    session = harness.session(server, "site-1")
    start = time.monotonic()
    assert session.receive(timeout=1) is None
    assert time.monotonic() - start < 3.0
    assert not session.state.ended  # a timeout is not the end of the job


def test_unknown_site_and_bad_token_are_refused_by_name(harness):
    server = harness.start(INITIAL, ["site-1"], num_rounds=1)
    stranger = harness.session(server, "site-9")
    with pytest.raises(FLKitError, match="site 'site-9' is not part of job 'test-job'"):
        stranger.receive(timeout=5)
    settings = SiteSettings(server=server.address, site_name="site-1", job_id="test-job", token="wrong",
                            workspace=".")
    intruder = Session(settings)
    harness.sessions.append(intruder)
    with pytest.raises(ServiceError, match="bad job token") as refused:
        intruder.receive(timeout=5)
    assert refused.value.code == ErrorCode.BAD_TOKEN
    wrong_job = harness.session(server, "site-1")
    wrong_job.settings = SiteSettings(**{**wrong_job.settings.__dict__, "job_id": "other"})
    with pytest.raises(FLKitError, match="runs job 'test-job', not 'other'"):
        wrong_job.receive(timeout=5)


def test_malformed_payload_is_rejected(tmp_path):
    """Bytes that are not safetensors, sent straight to the gRPC servicer, are refused by name."""
    harness = ServerHarness(tmp_path, transport="grpc")
    try:
        server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=1)
        s1 = harness.session(server, "site-1")
        s2 = harness.session(server, "site-2")
        s1.connect(), s2.connect()
        task = s1.receive(timeout=30) and s1.state.task
        s2.receive(timeout=30)
        stub = s1.transport._stub

        def stream():
            yield pb.ResultChunk(header=pb.ResultHeader(session_id=s1._session_id, task_id=task.task_id,
                                                        params_type="FULL", payload_size=100))
            yield pb.ResultChunk(payload=b"\x07" * 100)

        reply = stub.SubmitResult(stream(), timeout=10)
        assert not reply.accepted
        assert "malformed params payload" in reply.error
        s2.send(FLModel(params=GOOD))
        assert not server.wait(30).failed
        assert torch.equal(load_params(server.persistor.global_model_path)["fc.weight"], GOOD["fc.weight"])
    finally:
        harness.close()


def test_dead_site_is_noticed_by_heartbeat(tmp_path):
    """A site in another process that stops talking is dropped; the round finishes with the one
    that answered."""
    harness = ServerHarness(tmp_path, transport="grpc")
    try:
        server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=1,
                               heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0)
        alive, dead = harness.session(server, "site-1"), harness.session(server, "site-2")
        alive.connect(), dead.connect()
        alive.receive(timeout=30)
        dead.receive(timeout=30)
        dead._heartbeat_stop.set()  # the process "froze": no more heartbeats, no result
        alive.send(FLModel(params=GOOD))
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed
        assert "no heartbeat" in server.controller.history[0].failed["site-2"]
    finally:
        harness.close()


def test_sites_in_the_servers_process_need_no_heartbeat_thread(harness):
    """In-process sites (the memory transport) cannot vanish without the server: the server asks no
    heartbeat of them (no thread per site) and never drops them for silence, even when a task takes
    longer than the heartbeat timeout."""
    server = harness.start(INITIAL, ["site-1"], num_rounds=1, heartbeat_interval_s=0.1, heartbeat_timeout_s=0.3)
    session = harness.session(server, "site-1")
    model = session.receive(timeout=30)
    assert model is not None and session._heartbeat_thread is None
    threading.Event().wait(1.0)  # "training" for more than three heartbeat timeouts
    session.send(FLModel(params=GOOD))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    assert not server.controller.history[0].failed


def test_send_without_receive_is_an_error(harness):
    server = harness.start(INITIAL, ["site-1"], num_rounds=1)
    session = harness.session(server, "site-1")
    with pytest.raises(FLKitError, match="call receive\\(\\) first"):
        session.send(FLModel(params=GOOD))


def test_site_crash_before_init_fails_job_fast(harness):
    server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1)
    session = harness.session(server, "site-1")
    done = threading.Event()

    def report():
        session.transport.report_failure("site-2", "test-job", server.token, "", "ImportError: no torch", 5)
        done.set()

    threading.Thread(target=report).start()
    outcome = server.wait(30)
    assert done.is_set()
    assert outcome.failed and "site-2: ImportError: no torch" in outcome.reason


def test_round_timeout_drops_a_silent_but_alive_site(harness):
    server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=1, round_timeout_s=1.0)
    fast, slow = harness.session(server, "site-1"), harness.session(server, "site-2")
    fast.connect(), slow.connect()
    fast.receive(timeout=30)
    slow.receive(timeout=30)  # keeps heart-beating, never answers
    fast.send(FLModel(params=GOOD))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed
    assert "round_timeout_s=1" in server.controller.history[0].failed["site-2"]


@pytest.mark.parametrize("min_clients", [1, 2])
def test_join_timeout(harness, min_clients):
    server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=min_clients,
                           join_timeout_s=1.0)
    only = harness.session(server, "site-1")
    model = only.receive(timeout=30)
    if min_clients == 2:  # site-2 never joins: the job fails, naming it
        assert model is None
        outcome = server.wait(30)
        assert outcome.failed and "only 1 of 2 sites joined within 1 s" in outcome.reason
        assert "missing: site-2" in outcome.reason
    else:  # enough sites: the job starts without site-2
        assert model.current_round == 0
        only.send(FLModel(params=GOOD))
        assert not server.wait(30).failed


def test_settings_from_environment():
    env = {"FLKIT_SERVER": "h:1", "FLKIT_SITE_NAME": "site-1", "FLKIT_JOB_ID": "j", "FLKIT_TOKEN": "t",
           "FLKIT_CONNECT_TIMEOUT_S": "2.5", "FLKIT_RECEIVE_TIMEOUT_S": "none"}
    settings = SiteSettings.from_env(env)
    assert settings.connect_timeout_s == 2.5 and settings.receive_timeout_s is None
    assert SiteSettings.from_env(settings.to_env()) == settings
    with pytest.raises(FLKitError, match="FLKIT_SERVER, FLKIT_TOKEN not set"):
        SiteSettings.from_env({"FLKIT_SITE_NAME": "s", "FLKIT_JOB_ID": "j"})
    with pytest.raises(FLKitError, match="FLKIT_CONNECT_TIMEOUT_S='soon' is not a number"):
        SiteSettings.from_env({**env, "FLKIT_CONNECT_TIMEOUT_S": "soon"})


def test_init_outside_a_job_says_how_to_run_it(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FLKIT_")}
    proc = subprocess.run([sys.executable, "-c", "import flkit as flare; flare.init()"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "this script is not running inside an FL job" in proc.stderr and "job.py" in proc.stderr
