"""Results folded in while their bytes arrive (``FedAvg(streamed=True)``): the mean over every
transport, and each way a result can fail half-way (a NaN in its last window, an upload that
breaks off, a round that closes first), after which the aggregate is as if it never came.

Values are small integers, so every float32 sum is exact and "as if it never came" is checked
bit for bit."""

from __future__ import annotations

import json
import threading

import grpc
import pytest
import torch

from flkit.errors import FLKitError
from flkit.model import FLModel, ParamsType
from flkit.server import streamed_upload
from flkit.server.persistor import load_params
from flkit.server.streamed_upload import DiskJournal, StreamedUpload, Windows
from flkit.strategy.fedavg import FedAvg, StreamedMean
from flkit.wire import flkit_pb2 as pb
from flkit.wire.frames import payload_prefix
from flkit.wire.grpc_options import SERVICE_NAME
from flkit.wire.tensor_stream import Encoded

from conftest import ServerHarness, in_threads

WINDOW = 8192  # bytes: the 200 KB model below crosses about 25 windows


def _initial() -> dict[str, torch.Tensor]:
    return {"a": torch.zeros(50_000), "b": torch.zeros(3, 7), "h": torch.zeros(10, dtype=torch.float16),
            "n": torch.tensor(0)}


def _params(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.randint(-50, 50, (50_000,), generator=gen).float(),
            "b": torch.randint(-50, 50, (3, 7), generator=gen).float(),
            "h": torch.randint(-8, 8, (10,), generator=gen).half(), "n": torch.tensor(seed)}


def _mean(results: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The exact weighted mean, rounded once to each tensor's dtype (integers: to the nearest)."""
    total = sum(w for _, w in results)
    out = {}
    for name, like in _initial().items():
        value = sum(p[name].double() * w for p, w in results) / total
        out[name] = value.round().to(like.dtype) if not like.is_floating_point() else value.to(like.dtype)
    return out


@pytest.fixture
def small_windows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Windows of WINDOW bytes; returns a list that grows by one per window folded."""
    monkeypatch.setattr(streamed_upload, "WINDOW_BYTES", WINDOW)
    flushed: list[int] = []
    real = StreamedUpload._flush

    def counting(self: StreamedUpload) -> None:
        flushed.append(self._filled)
        real(self)

    monkeypatch.setattr(StreamedUpload, "_flush", counting)
    return flushed


def _run_sites(harness: ServerHarness, server, sends: dict[str, tuple[dict[str, torch.Tensor], int]],
               sessions: dict | None = None) -> dict:
    """Each site receives its task and sends its params with its weight, in its own thread
    (``sessions``: sessions already open, by site); what each raised, by site."""
    sessions = sessions or {}

    def site(name: str) -> None:
        session = sessions.get(name) or harness.session(server, name)
        session.receive(timeout=30)
        params, weight = sends[name]
        session.send(FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": weight}))

    return in_threads(site, sends)


def _two_sites_with_their_tasks(harness: ServerHarness):
    """A streamed FedAvg server of site-1 and site-2, each of which holds its round-0 task."""
    server = harness.start(_initial(), ["site-1", "site-2"], num_rounds=1, strategy=FedAvg(streamed=True))
    s1, s2 = harness.session(server, "site-1"), harness.session(server, "site-2")
    s1.connect(), s2.connect()
    s1.receive(timeout=30)
    s2.receive(timeout=30)
    return server, s1, s2


def _send_and_check(server, sessions: dict) -> None:
    """site-1 and site-2 answer with weights 1 and 3; the job completes with exactly their mean."""
    sends = {"site-1": (_params(1), 1), "site-2": (_params(2), 3)}
    for name, (params, weight) in sends.items():
        sessions[name].send(FLModel(params=params, meta={"NUM_STEPS_CURRENT_ROUND": weight}))
    outcome = server.wait(30)
    assert outcome is not None and not outcome.failed, outcome
    _assert_global(server, _mean(list(sends.values())))


def _assert_global(server, expected: dict[str, torch.Tensor]) -> None:
    saved = load_params(server.persistor.global_model_path)
    for name, want in expected.items():
        assert saved[name].dtype == want.dtype, name
        assert torch.equal(saved[name], want), name


@pytest.mark.parametrize("transport", ["memory", "grpc", "shm"])
def test_streamed_mean_over_each_transport(tmp_path, small_windows, transport):
    """grpc and shm results are folded window by window (no whole-result buffer); memory results whole."""
    harness = ServerHarness(tmp_path, transport=transport)
    try:
        server = harness.start(_initial(), ["site-1", "site-2"], num_rounds=1, strategy=FedAvg(streamed=True))
        sends = {"site-1": (_params(1), 1), "site-2": (_params(2), 3)}
        assert _run_sites(harness, server, sends) == {}
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed, outcome
        _assert_global(server, _mean(list(sends.values())))
        if transport == "memory":
            assert not small_windows
        else:
            assert len(small_windows) >= 2 * 25  # about 25 windows per result
    finally:
        harness.close()


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_a_nan_in_the_last_window_is_taken_back_out_and_the_site_fails(tmp_path, small_windows, transport):
    harness = ServerHarness(tmp_path, transport=transport)
    try:
        server = harness.start(_initial(), ["site-1", "site-2", "site-3"], num_rounds=1, min_clients=2,
                               strategy=FedAvg(streamed=True))
        bad = _params(3)
        bad["a"][-1] = float("nan")  # its last window: every earlier window was folded in already
        sends = {"site-1": (_params(1), 1), "site-2": (_params(2), 2), "site-3": (bad, 5)}
        errors = _run_sites(harness, server, sends)
        assert set(errors) == {"site-3"}
        assert "non-finite" in str(errors["site-3"])
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed, outcome
        assert "non-finite" in server.controller.history[0].failed["site-3"]
        _assert_global(server, _mean([sends["site-1"], sends["site-2"]]))
    finally:
        harness.close()


def _raw_submit(session):
    """SubmitResult taking serialised messages (as a site's transport sends them), on the session's channel."""
    return session.transport._channel.stream_unary(f"/{SERVICE_NAME}/SubmitResult", request_serializer=None,
                                                   response_deserializer=pb.SubmitReply.FromString)


def _frames(session, task_id: str, params: dict[str, torch.Tensor], weight: int) -> tuple[bytes, list[bytes]]:
    """A result's header message and its payload messages (as a site's transport sends them)."""
    encoded = Encoded(params)
    header = pb.ResultChunk(header=pb.ResultHeader(
        session_id=session._session_id, task_id=task_id, params_type=ParamsType.FULL.value,
        payload_size=encoded.size, meta_json=f'{{"NUM_STEPS_CURRENT_ROUND": {weight}}}')).SerializeToString()
    return header, list(encoded.chunks(4096, payload_prefix))


def test_an_upload_that_breaks_off_is_taken_back_out_and_may_be_sent_again(tmp_path, small_windows):
    harness = ServerHarness(tmp_path, transport="grpc")
    try:
        server, s1, s2 = _two_sites_with_their_tasks(harness)
        header, payload = _frames(s1, s1.state.task.task_id, _params(7), 4)  # this first send dies half-way
        reply = _raw_submit(s1)(iter([header, *payload[:len(payload) // 2]]), timeout=30)
        assert not reply.accepted and "truncated" in reply.error, reply
        assert len(small_windows) >= 10  # half of it had been folded in before it broke off
        _send_and_check(server, {"site-1": s1, "site-2": s2})
    finally:
        harness.close()


def _stall_half_way(harness: ServerHarness, server, stalling: str, others: list[str],
                    release: threading.Event) -> tuple[dict, threading.Thread, list[BaseException]]:
    """Open every site's session; ``stalling`` receives its task and uploads half of a result, then
    sends nothing more until ``release``. Returns the sessions, the uploading thread and the gRPC
    errors its call ended with."""
    sessions = {name: harness.session(server, name) for name in [*others, stalling]}
    for session in sessions.values():
        session.connect()
    stuck = sessions[stalling]
    stuck.receive(timeout=30)
    header, payload = _frames(stuck, stuck.state.task.task_id, _params(9), 6)

    def stalled():
        yield header
        yield from payload[:len(payload) // 2]
        release.wait(60)  # the rest never comes while the round is open

    failures: list[BaseException] = []

    def upload() -> None:
        try:
            _raw_submit(stuck)(stalled(), timeout=60)
        except grpc.RpcError as exc:
            failures.append(exc)

    uploader = threading.Thread(target=upload)
    uploader.start()
    return sessions, uploader, failures


def test_a_round_that_closes_mid_upload_cancels_it_and_takes_it_back_out(tmp_path, small_windows):
    """Site-3's upload stops half-way; the round times out with the two others (min_clients=2),
    cancels the upload and takes its folded half back out before making the global model."""
    harness = ServerHarness(tmp_path, transport="grpc")
    release = threading.Event()
    try:
        server = harness.start(_initial(), ["site-1", "site-2", "site-3"], num_rounds=1, min_clients=2,
                               round_timeout_s=3, strategy=FedAvg(streamed=True))
        sessions, uploader, failures = _stall_half_way(harness, server, "site-3", ["site-1", "site-2"], release)
        sends = {"site-1": (_params(1), 1), "site-2": (_params(2), 2)}
        assert _run_sites(harness, server, sends, sessions) == {}
        outcome = server.wait(60)
        release.set()
        uploader.join(30)
        assert outcome is not None and not outcome.failed, outcome
        assert "round_timeout_s" in server.controller.history[0].failed["site-3"]
        assert failures and failures[0].code() == grpc.StatusCode.CANCELLED
        _assert_global(server, _mean(list(sends.values())))
    finally:
        release.set()
        harness.close()


def test_the_journal_reads_back_what_was_written(tmp_path):
    """Full windows go to disk with O_DIRECT where the file system takes it; the last is padded."""
    windows = Windows(keep=1)
    window = windows.take()
    journal = DiskJournal(tmp_path)
    try:
        written = []
        for size in (streamed_upload.WINDOW_BYTES, streamed_upload.WINDOW_BYTES, 12345):
            data = torch.randint(0, 256, (size,), dtype=torch.uint8).numpy().tobytes()
            window[:size] = data
            journal.append(window, size)
            written.append(data)
        assert list(tmp_path.iterdir()) == []  # unlinked: nothing outlives the upload
        at = 0
        for data in written:
            journal.read_into(window, at, len(data))
            assert window[:len(data)] == data
            at += len(data)
    finally:
        journal.close()


def test_a_piece_of_an_unknown_tensor_or_outside_the_model_is_refused():
    mean = StreamedMean()
    out = {name: torch.empty_like(t) for name, t in _initial().items()}
    mean.start(0, _initial(), lambda: out)
    piece = mean.contribution(0, "s", 1.0, ParamsType.FULL)
    with pytest.raises(FLKitError, match="outside the model"):
        piece.fold("a", 49_999, torch.ones(2))
    with pytest.raises(FLKitError, match="outside the model"):
        piece.fold("nope", 0, torch.ones(1))
    piece.discard()


def test_a_result_that_cannot_be_taken_back_out_fails_the_round_and_keeps_the_model(tmp_path, small_windows,
                                                                                       monkeypatch):
    """If the journal cannot be read back, the round's sums hold part of a refused result: the round
    fails with the reason, and the global model stays the one before it."""

    def unreadable(self, window, offset, size):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(DiskJournal, "read_into", unreadable)
    harness = ServerHarness(tmp_path, transport="grpc")
    try:
        server = harness.start(_initial(), ["site-1", "site-2"], num_rounds=1, min_clients=1,
                               strategy=FedAvg(streamed=True))
        bad = _params(3)
        bad["a"][-1] = float("nan")
        errors = _run_sites(harness, server, {"site-1": (_params(1), 1), "site-2": (bad, 2)})
        assert "site-2" in errors
        outcome = server.wait(30)
        assert outcome is not None and outcome.failed
        assert "part of the refused result of site site-2 could not be taken back out" in outcome.reason
        assert "the global model of round -1 is kept" in outcome.reason
        assert all(torch.equal(server.controller.global_params[k], v) for k, v in _initial().items())
    finally:
        harness.close()


def test_a_round_closing_on_a_result_that_cannot_be_taken_back_out_keeps_the_model(tmp_path, small_windows,
                                                                                  monkeypatch):
    """The same when the round's close cancels the upload (``finish`` waits for it to go): the
    round fails instead of making a global model that holds part of it."""

    def unreadable(self, window, offset, size):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(DiskJournal, "read_into", unreadable)
    harness = ServerHarness(tmp_path, transport="grpc")
    release = threading.Event()
    try:
        server = harness.start(_initial(), ["site-1", "site-2"], num_rounds=1, min_clients=1, round_timeout_s=3,
                               strategy=FedAvg(streamed=True))
        sessions, uploader, _ = _stall_half_way(harness, server, "site-2", ["site-1"], release)
        assert _run_sites(harness, server, {"site-1": (_params(1), 1)}, sessions) == {}
        outcome = server.wait(60)
        release.set()
        uploader.join(30)
        assert outcome is not None and outcome.failed
        assert "part of the refused result of site site-2 could not be taken back out" in outcome.reason
        assert all(torch.equal(server.controller.global_params[k], v) for k, v in _initial().items())
    finally:
        release.set()
        harness.close()


def test_a_journal_that_cannot_be_made_refuses_the_result_and_the_site_sends_again(tmp_path, small_windows,
                                                                                  monkeypatch):
    """A server-side failure before any byte is folded (here: no journal file) refuses the result
    at once and leaves nothing open: the site sends again and the round completes exactly."""
    real = DiskJournal.__init__
    failures = [OSError(28, "No space left on device")]

    def once_full(self, folder):
        if failures:
            raise failures.pop()
        real(self, folder)

    monkeypatch.setattr(DiskJournal, "__init__", once_full)
    harness = ServerHarness(tmp_path, transport="grpc")
    try:
        server, s1, s2 = _two_sites_with_their_tasks(harness)
        header, payload = _frames(s1, s1.state.task.task_id, _params(1), 1)
        reply = _raw_submit(s1)(iter([header, *payload]), timeout=30)
        assert not reply.accepted and "No space left on device" in reply.error, reply
        _send_and_check(server, {"site-1": s1, "site-2": s2})
    finally:
        harness.close()


@pytest.mark.parametrize("streamed", [False, True], ids=["exact", "streamed"])
def test_a_site_without_data_answers_with_zero_steps_and_is_skipped_with_a_note(tmp_path, small_windows, streamed):
    """NUM_STEPS_CURRENT_ROUND=0 (an empty part of a skewed split): the answer is taken, not
    aggregated, and the round's record says why; the global model is the other sites' mean."""
    harness = ServerHarness(tmp_path, transport="grpc")
    try:
        server = harness.start(_initial(), ["site-1", "site-2", "site-3"], num_rounds=1,
                               strategy=FedAvg(streamed=streamed))
        sends = {"site-1": (_params(1), 1), "site-2": (_params(2), 3), "site-3": (_params(3), 0)}
        assert _run_sites(harness, server, sends) == {}
        outcome = server.wait(30)
        assert outcome is not None and not outcome.failed, outcome
        record = server.controller.history[0]
        assert set(record.notes) == {"site-3"} and "no data this round" in record.notes["site-3"]
        assert not record.failed
        _assert_global(server, _mean([sends["site-1"], sends["site-2"]]))
        server.persistor.flush(30)
        history = json.loads((server.persistor.directory / "metrics.json").read_text())["rounds"][0]
        assert history["weights"] == {"site-1": 1.0, "site-2": 3.0, "site-3": 0.0}
        assert list(history["skipped"]) == ["site-3"]
    finally:
        harness.close()
