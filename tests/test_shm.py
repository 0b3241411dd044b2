"""The shared-memory transport with real processes: used when it can be, files never left behind,
a clear fallback when it cannot be used."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flkit.job import FedAvgJob, ScriptRunner
from flkit.messages import ErrorCode, ServiceError
from flkit.model import FLModel
from flkit.server import shm_exchange
from flkit.server.persistor import load_params
from flkit.shared_model import shared_model_of
from flkit.wire import flkit_pb2 as pb
from flkit.wire import shm_files

from conftest import SCRIPTS, ServerHarness

INITIAL = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}


def _our_folders() -> list[Path]:
    return sorted(shm_files.SHM_ROOT.glob(f"{shm_files.FOLDER_PREFIX}{os.getpid()}-*"))


@pytest.mark.skipif(not shm_files.SHM_ROOT.is_dir(), reason="no /dev/shm on this machine")
def test_external_sites_use_shared_memory_and_a_killed_site_leaves_no_file(tmp_path):
    job = FedAvgJob(name="shm", initial_model=torch.nn.Linear(8, 64), n_clients=2, num_rounds=3, min_clients=1)
    job.to(ScriptRunner(str(SCRIPTS / "shm_site.py"), "--kill_site site-2 --kill_round 1",
                        launch_external_process=True), "site-1")
    job.to(ScriptRunner(str(SCRIPTS / "shm_site.py"), "--kill_site site-2 --kill_round 1",
                        launch_external_process=True), "site-2")
    result = job.simulate(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    assert "site-2" in result.rounds[1].failed  # SIGKILL mid-round: the round went on with site-1
    for site in ("site-1", "site-2"):
        used = json.loads((tmp_path / "ws" / site / "transport.json").read_text())
        assert used["name"] == "shm" and used["folder"], used  # the files, not the socket
    assert _our_folders() == []  # the job's folder, the killed site's half file with it, is gone
    # Round 0: both sites sent +1; rounds 1 and 2: site-1 alone, +1 each.
    final = load_params(result.global_model_path)
    assert torch.allclose(final["bias"] - job.initial_params["bias"], torch.full((64,), 3.0))


def test_a_folder_left_by_a_killed_server_is_removed_by_the_next_one(tmp_path):
    root = tmp_path / "shm"
    root.mkdir()
    dead = root / f"{shm_files.FOLDER_PREFIX}999999999-abc"
    dead.mkdir()
    (dead / "task-00.safetensors").write_bytes(b"x" * 100)
    alive = root / f"{shm_files.FOLDER_PREFIX}{os.getpid()}-def"
    alive.mkdir()
    exchange = shm_exchange.ShmExchange.create(1000, 2, root=root)
    assert exchange is not None
    assert not dead.exists() and alive.exists()
    assert exchange.folder.stat().st_mode & 0o777 == 0o700
    assert (exchange.folder / shm_files.PROBE_FILE).stat().st_mode & 0o777 == 0o600
    # A live server's folder is kept even when its name's pid says otherwise (pid namespaces).
    assert shm_exchange.remove_stale_folders(root) == []
    renamed = root / f"{shm_files.FOLDER_PREFIX}999999998-live"
    exchange.folder.rename(renamed)
    assert shm_exchange.remove_stale_folders(root) == [] and renamed.exists()
    renamed.rename(exchange.folder)
    exchange.close()
    assert not exchange.folder.exists()


def test_too_little_shared_memory_falls_back_to_grpc_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(shm_files, "free_bytes", lambda folder: 1024 * 1024)  # less than the job needs
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=2)
        assert server.shm is None and "shm" not in server.service.offers
        session = harness.session(server, "site-1")
        with caplog.at_level(logging.WARNING, logger="flkit.client"):
            for _ in range(2):
                model = session.receive(timeout=30)
                session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}))
        assert not server.wait(30).failed
        assert not session.transport.active
        warnings = [r for r in caplog.records if "shared-memory transport not used" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 2)
    finally:
        harness.close()


def test_a_site_that_cannot_write_its_result_sends_it_over_grpc(tmp_path, monkeypatch, caplog):
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=1)
        session = harness.session(server, "site-1")
        model = session.receive(timeout=30)
        assert session.transport.active
        monkeypatch.setattr(shm_files, "free_bytes", lambda folder: 0)  # /dev/shm filled up meanwhile
        with caplog.at_level(logging.WARNING, logger="flkit.client"):
            session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}))
        assert not server.wait(30).failed
        assert any("cannot write the result" in r.getMessage() for r in caplog.records)
        assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 1)
        assert not [p for p in server.shm.folder.iterdir() if p.name.startswith(("result-", ".result-"))]
    finally:
        harness.close()


def test_a_probe_that_does_not_match_means_no_files(tmp_path, caplog):
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=1)
        server.service.offers["shm_probe"] = "not-what-the-file-says"
        session = harness.session(server, "site-1")
        with caplog.at_level(logging.WARNING, logger="flkit.client"):
            session.connect(timeout=10)
        assert not session.transport.active
        assert any("belongs to another server" in r.getMessage() for r in caplog.records)
    finally:
        harness.close()


@pytest.mark.parametrize("name", ["../../etc/passwd", "result-zz-00.safetensors", "task-abc.safetensors",
                                  "result-abc-def.safetensors"])
def test_a_result_file_name_that_is_not_the_sessions_own_is_refused(tmp_path, name):
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1", "site-2"], num_rounds=1, min_clients=1)
        s1, s2 = harness.session(server, "site-1"), harness.session(server, "site-2")
        s1.connect(timeout=10), s2.connect(timeout=10)
        s1.receive(timeout=30), s2.receive(timeout=30)
        header = pb.ResultHeader(session_id=s1._session_id, task_id=s1.state.task.task_id, params_type="FULL",
                                 payload_size=100, params_file=name)
        reply = s1.transport._stub.SubmitResult(iter([pb.ResultChunk(header=header)]), timeout=10)
        assert not reply.accepted and ("not this session's file" in reply.error or "not one flkit writes"
                                       in reply.error), reply.error
        s2.send(FLModel(params=INITIAL))
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed
        assert "result rejected" in server.controller.history[0].failed["site-1"]
    finally:
        harness.close()


def test_typed_error_for_a_session_the_server_does_not_know(tmp_path):
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=1)
        session = harness.session(server, "site-1")
        with pytest.raises(ServiceError) as refused:
            session.transport.get_task("feedbeef", 0.1, timeout=5)
        assert refused.value.code == ErrorCode.UNKNOWN_SESSION
    finally:
        harness.close()


def test_a_real_write_error_in_shared_memory_is_an_os_error(tmp_path):
    """A full /dev/shm (here: a file-size limit) surfaces as OSError, which the transports fall back on."""
    code = f"""
import resource, signal, torch
from pathlib import Path
from flkit.wire import shm_files
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    shm_files.write_params_file(Path({str(tmp_path)!r}), "result-ab-cd.safetensors", {{"w": torch.zeros(100_000)}})
except OSError as exc:
    print("OSError", exc)
print(sorted(p.name for p in Path({str(tmp_path)!r}).iterdir()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OSError") and "cannot write" in out.stdout and "result-ab-cd" in out.stdout
    assert out.stdout.strip().endswith("[]")  # no half-written file left


@pytest.mark.skipif(not shm_files.SHM_ROOT.is_dir(), reason="no /dev/shm on this machine")
def test_a_site_writes_each_result_over_the_memory_of_its_last_one(tmp_path):
    """A fresh tmpfs file costs the kernel's zeroing of every page: after the server has answered,
    the site's next result goes into the same file (same inode), and the results stay exact."""
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=3)
        session = harness.session(server, "site-1")
        inodes = []
        for round_num in range(3):
            model = session.receive(timeout=30)
            assert model is not None and session.transport.active
            session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}))
            spare = session.transport._spare
            assert spare is not None and spare.exists()
            inodes.append(spare.stat().st_ino)
            assert torch.equal(model.params["w"], INITIAL["w"] + round_num)
        assert len(set(inodes)) == 1
        assert not server.wait(30).failed
        assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 3)
        session.close()
        assert not [p for p in server.shm.folder.iterdir() if p.name.startswith(("result-", ".result-"))]
    finally:
        harness.close()


@pytest.mark.skipif(not shm_files.SHM_ROOT.is_dir(), reason="no /dev/shm on this machine")
def test_result_files_of_sites_that_are_gone_are_removed(tmp_path):
    """Sites keep their last result file; one left by a site that died goes two tasks later."""
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=3)
        session = harness.session(server, "site-1")
        model = session.receive(timeout=30)
        assert model is not None and session.transport.active
        orphan = server.shm.folder / shm_files.result_file_name("deadbeef", "0123456789abcdef")
        orphan.write_bytes(b"left by a site that was killed")
        for _ in range(3):
            session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}))
            model = session.receive(timeout=30)
        assert not server.wait(30).failed
        assert not orphan.exists()
    finally:
        harness.close()


@pytest.mark.skipif(not shm_files.SHM_ROOT.is_dir(), reason="no /dev/shm on this machine")
def test_the_global_model_is_given_out_as_its_own_file_and_reused_once_let_go(tmp_path):
    """The aggregate is written into a file of the job's folder, and that file is what the site
    maps: the server writes no copy for it. A script that holds each round's model until the next
    one arrives (the usual loop) lets go of the previous one when it receives the next, says so with
    its result, and two files take turns; results stay exact."""
    harness = ServerHarness(tmp_path, transport="shm")
    try:
        server = harness.start(INITIAL, ["site-1"], num_rounds=5)
        session = harness.session(server, "site-1")
        names = []
        for round_num in range(5):
            model = session.receive(timeout=30)
            assert model is not None and session.transport.active
            owner = shared_model_of(server.controller.global_params)
            assert owner is not None and owner.path is not None and owner.path.parent == server.shm.folder
            assert list(session.transport._mapped)[-1][1] == owner.path.name  # what the site mapped
            names.append(owner.path.name)
            assert torch.equal(model.params["w"], INITIAL["w"] + round_num)
            server.persistor.flush(30)  # the writer lets go of last round's model once it is saved
            session.send(FLModel(params={k: v + 1 for k, v in model.params.items()}))
        assert not server.wait(30).failed
        assert not server.shm._task_files  # no params file was written for any task
        assert names[0::2] == [names[0]] * 3 and names[1::2] == [names[1]] * 2 and names[0] != names[1]
        assert torch.equal(load_params(server.persistor.global_model_path)["w"], INITIAL["w"] + 5)
    finally:
        harness.close()
