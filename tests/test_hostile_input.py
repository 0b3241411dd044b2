"""Hostile input to a running server: every request ends in a clear refusal, nothing reaches the model.

One server for the module, on loopback, talked to through raw stubs on an insecure channel (no
flkit client in between, so malformed bytes really reach the servicer). Its job has three sites;
round 0 is answered by all three (the global model stays the initial one: the mean of three equal
models), and round 1 never closes: "holder" took its task and never answers (no round timeout).
"victim" is the site the tests attack with: ``Hostile.victim()`` gives a session that holds the
round's open task (joining again, and handing it the task again, after a refusal failed it), so a
payload is parsed and checked against the global model, not merely refused as a stale answer.

Each audit finding has its test; hypothesis then sends well over a thousand generated inputs:
random bytes as every RPC's messages, result streams built from a valid safetensors payload and
mutated, and headers with random, huge and path-like fields. Every call must end in a refusal with
a proper status and the ``flkit-error`` trailing metadata, or in ``SubmitReply(accepted=False)``,
within its timeout; afterwards the server answers a heartbeat, its global model equals the initial
one exactly, and its output folder is byte for byte what it was before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flkit.errors import ConfigError
from flkit.messages import ServiceError
from flkit.server.config import WorkflowConfig
from flkit.server.server import FLServer
from flkit.server.validation import MAX_REASON_CHARS
from flkit.strategy.fedavg import FedAvg
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.frames import payload_prefix
from flkit.wire.grpc_options import CHUNK_BYTES, ERROR_KEY, OPTIONS, PROTOCOL_VERSION, SERVICE_NAME
from flkit.wire.tensor_stream import DTYPES

JOB = "hostile"
TOKEN = "hostile-token"
SITES = ["holder", "victim", "bystander"]
# Multiples of 1/64: the mean of three equal models (float64 sums, one rounding) is exact.
INITIAL = {
    "layer.weight": (torch.arange(320, dtype=torch.float32) / 64 - 2.515625).reshape(16, 20),
    "layer.bias": torch.arange(200, dtype=torch.float32) / 64 + 0.5,
}
CALL_S = 10.0  # the timeout of every call: the server answers each one in milliseconds
# Statuses of a refusal (flkit.server.service.STATUS); never UNKNOWN, INTERNAL or a timeout.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
HOSTILE_TEXT = ["../../etc/passwd", "a" * 70_000, "\x00", "..", "/etc/passwd", "\u202e\n\r", "%s%n{0}",
                "victim\n", "NaN", "{}", "[]", "9" * 5000, "é" * 3000]
# Refusals the fuzz must have met (so its inputs reached the checks behind the framing, too): regexes.
CAUSES = ["malformed session id", "unknown session", "is malformed: 1-128", "neither FULL nor DIFF",
          "nested too deeply", "malformed metrics JSON", "malformed meta JSON", "must be a finite number",
          "NUM_STEPS_CURRENT_ROUND", "larger than any valid result", "truncated", "longer than its header says",
          "payload message says", "must start with a header", "malformed params payload", "unknown dtype",
          "non-finite value", "has shape", "has dtype", "unexpected", "missing",
          "result file .* is not this session's|no shared-memory folder",
          "malformed JoinRequest message", "malformed FailureReport message", "site name", "no longer open"]
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.large_base_example])


# -- the server and raw calls ------------------------------------------------------------------------


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _blob(params: dict[str, torch.Tensor], edit: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """Params as safetensors bytes; ``edit`` changes the parsed JSON header first (lengths kept right)."""
    blob = safetensors.torch.save(params)
    if edit is None:
        return blob
    (n,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def _pieces(blob: bytes, size: int) -> list[bytes]:
    return [blob[i:i + size] for i in range(0, len(blob), size)]


def _framed(pieces: list[bytes]) -> list[bytes]:
    """Serialised ``ResultChunk(payload=...)`` messages."""
    return [payload_prefix(len(p)) + p for p in pieces]


def _header(session_id: str, task_id: str, payload_size: int, /, **fields: Any) -> bytes:
    """A serialised ``ResultChunk(header=...)``; ``fields`` override any of its fields."""
    values = {"session_id": session_id, "task_id": task_id, "payload_size": payload_size, "params_type": "FULL",
              "metrics_json": '{"accuracy": 0.5}', **fields}
    return pb.ResultChunk(header=pb.ResultHeader(**values)).SerializeToString()


@dataclass
class Outcome:
    """How a call ended: a refusal (status), or a reply."""

    status: grpc.StatusCode | None = None
    details: str = ""
    trailing: dict[str, str] = field(default_factory=dict)
    reply: Any = None

    @property
    def text(self) -> str:
        return self.details if self.status is not None else getattr(self.reply, "error", "")


def _ended(call: Callable[[], Any]) -> Outcome:
    try:
        return Outcome(reply=call())
    except grpc.RpcError as exc:
        assert isinstance(exc, grpc.Call)
        return Outcome(exc.code(), exc.details() or "", {k: v for k, v in exc.trailing_metadata() or ()})


def assert_refused(outcome: Outcome, cause: str | None = None) -> Outcome:
    """A proper refusal: a status of STATUS with ``flkit-error`` and a short text, or accepted=False
    with an error; ``cause`` (a regex) must be in the text."""
    if outcome.status is not None:
        assert outcome.status in REFUSALS, (outcome.status, outcome.details[:300])
        assert ERROR_KEY in outcome.trailing, (outcome.status, outcome.details[:300])
        assert "Exception calling application" not in outcome.details
        assert len(outcome.details) < 1000 and sum(len(v) for v in outcome.trailing.values()) < 100
    else:
        assert isinstance(outcome.reply, pb.SubmitReply), f"not refused: {outcome.reply!r:.300}"
        assert not outcome.reply.accepted and outcome.reply.error, outcome.reply
        assert len(outcome.reply.error) < 1000, outcome.reply.error[:300]
    if cause is not None:
        assert re.search(cause, outcome.text), (cause, outcome.text[:300])
    return outcome


class Hostile:
    """The module's server, its channel, and the sessions of its sites."""

    def __init__(self, root: Path, streamed: bool | None = None) -> None:
        self.out = root / "server"
        self.server = FLServer(
            WorkflowConfig(num_rounds=2, min_clients=1, round_timeout_s=None, join_timeout_s=60,
                           heartbeat_interval_s=1.0, heartbeat_timeout_s=3600.0, key_metric="accuracy"),
            SITES, INITIAL, self.out, job_id=JOB, token=TOKEN, strategy=FedAvg(streamed=streamed))
        self.server.start()
        self.channel = grpc.insecure_channel(self.server.address, options=OPTIONS)
        self.stub = pb_grpc.FLKitStub(self.channel)
        self.submit_stream = self.channel.stream_unary(f"/{SERVICE_NAME}/SubmitResult", request_serializer=None,
                                                       response_deserializer=pb.SubmitReply.FromString)
        self.sessions = {site: self.join(site) for site in SITES}
        for site in SITES:  # round 0: everyone answers with the initial model
            task = self.task(self.sessions[site])
            assert task.current_round == 0
            reply = self.submit(self.sessions[site], task.task_id, safetensors.torch.save(INITIAL))
            assert reply.accepted, reply.error
        self.task_id = self.task(self.sessions["holder"]).task_id  # round 1: open for good
        self.server.persistor.flush(timeout=30)
        self.snapshot = _hashes(self.out)
        assert {"FL_global_model.safetensors", "best_FL_global_model.safetensors", "round_state.json"} <= \
            set(self.snapshot)
        self._victim: str | None = self.sessions["victim"]
        self.fuzzed = 0
        self.causes: Counter[str] = Counter()

    def join(self, site: str) -> str:
        return self.stub.Join(pb.JoinRequest(site_name=site, job_id=JOB, token=TOKEN,
                                             protocol_version=PROTOCOL_VERSION), timeout=CALL_S).session_id

    def task(self, session_id: str) -> pb.TaskHeader:
        for chunk in self.stub.GetTask(pb.GetTaskRequest(session_id=session_id, wait_s=CALL_S, header_only=True),
                                       timeout=CALL_S + 5):
            assert chunk.header.status == pb.TASK_READY, chunk
            return chunk.header
        raise AssertionError("no task header")

    def submit(self, session_id: str, task_id: str, blob: bytes) -> pb.SubmitReply:
        frames = [_header(session_id, task_id, len(blob)), *_framed(_pieces(blob, CHUNK_BYTES))]
        return self.submit_stream(iter(frames), timeout=CALL_S)

    def victim(self) -> str:
        """A session of "victim" that holds round 1's open task."""
        reg = self.server.registry
        try:
            fresh = self._victim is not None and reg.site_of(self._victim) == "victim"
        except ServiceError:
            fresh = False
        if not fresh:
            self._victim = self.join("victim")
        if not reg.task_open("victim", self.task_id):
            with reg.cond:  # the round hands its task to the site that joined again
                reg.assign_locked(reg.sites["holder"].task, ["victim"])
        assert reg.task_open("victim", self.task_id)
        assert self._victim is not None
        return self._victim

    def send(self, frames: list[bytes]) -> Outcome:
        return _ended(lambda: self.submit_stream(iter(frames), timeout=CALL_S))

    def note(self, outcome: Outcome) -> None:
        """Count a fuzz call's refusal by its cause (the final test checks the fuzz reached each check)."""
        self.fuzzed += 1
        for cause in CAUSES:
            if re.search(cause, outcome.text):
                self.causes[cause] += 1

    def assert_untouched(self) -> None:
        """The server answers, its model is the initial one, and its files are as before."""
        reply = self.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.sessions["holder"]), timeout=CALL_S)
        assert reply.job_running
        assert self.server.outcome is None
        model = self.server.controller.global_params
        assert sorted(model) == sorted(INITIAL)
        for name, value in INITIAL.items():
            assert torch.equal(model[name], value), name
        self.server.persistor.flush(timeout=30)
        assert _hashes(self.out) == self.snapshot

    def close(self) -> None:
        self.channel.close()
        self.server.stop(grace=0.5)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    h = Hostile(tmp_path_factory.mktemp("hostile"))
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def flkit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="flkit")
    return caplog


def _logged(caplog: pytest.LogCaptureFixture) -> int:
    """Characters the server logged (messages and tracebacks) since the test started."""
    return sum(len(r.getMessage()) + len(r.exc_text or "") for r in caplog.records)


# -- result payloads, valid and mutated ----------------------------------------------------------------


@dataclass
class Stream:
    """A result stream's payload: the messages after the header, the size its header declares,
    and what the refusal must name."""

    payload: list[bytes]
    size: int
    cause: str


def _from_params(params: dict[str, torch.Tensor], cause: str) -> Stream:
    blob = _blob(params)
    return Stream(_framed(_pieces(blob, 256)), len(blob), cause)


def _edited(edit: Callable[[dict[str, Any]], None], cause: str) -> Stream:
    blob = _blob(INITIAL, edit)
    return Stream(_framed(_pieces(blob, 256)), len(blob), cause)


def _set_dtype(dtype: str) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header["layer.bias"]["dtype"] = dtype
    return edit


def _changed(name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**INITIAL, name: value}


def _with_value(name: str, index: int, value: float) -> dict[str, torch.Tensor]:
    tensor = INITIAL[name].clone()
    tensor.view(-1)[index % tensor.numel()] = value
    return _changed(name, tensor)


VALID = _blob(INITIAL)
PIECES = _pieces(VALID, 256)  # the header (under 256 bytes) and the tensors' bytes, in 256-byte pieces
TOO_LONG = "longer than its header says"
TRUNCATED = "truncated"
MALFORMED = "malformed params payload"
NON_FINITE = r"non-finite value\(s\) \(NaN or Inf\)"


def _reordered(order: list[int]) -> Stream:
    return Stream(_framed([PIECES[i] for i in order]), len(VALID), MALFORMED)


def _lying_frame(index: int, delta: int) -> Stream:
    frames = _framed(PIECES)
    piece = PIECES[index]
    frames[index] = payload_prefix(len(piece) + delta) + piece
    return Stream(frames, len(VALID), f"payload message says {len(piece) + delta} bytes but carries {len(piece)}")


# What each finding of chunk framing and content must be refused for (explicit cases).
BAD_STREAMS: dict[str, Callable[[], Stream]] = {
    "chunks out of order": lambda: _reordered([1, 0, *range(2, len(PIECES))]),
    "chunks reversed": lambda: _reordered(list(reversed(range(len(PIECES))))),
    "chunk missing": lambda: Stream(_framed(PIECES[:3] + PIECES[4:]), len(VALID), TRUNCATED),
    "last chunk missing": lambda: Stream(_framed(PIECES[:-1]), len(VALID), TRUNCATED),
    "chunk duplicated": lambda: Stream(_framed(PIECES[:3] + PIECES[2:]), len(VALID), TOO_LONG),
    "chunk length lies": lambda: _lying_frame(2, 1),
    "declared size one short": lambda: Stream(_framed(PIECES), len(VALID) - 1, TOO_LONG),
    "declared size one long": lambda: Stream(_framed(PIECES), len(VALID) + 1, TRUNCATED),
    "declared size huge": lambda: Stream(_framed(PIECES), 2**62, "larger than any valid result"),
    "declared size largest": lambda: Stream(_framed(PIECES), 2**64 - 1, "larger than any valid result"),
    "a second header": lambda: Stream([*_framed(PIECES[:2]), _header("x", "y", 1), *_framed(PIECES[2:])],
                                      len(VALID), "not a payload message"),
    "unknown dtype": lambda: _edited(_set_dtype("PICKLE"), "unknown dtype 'PICKLE'"),
    "dtype path": lambda: _edited(_set_dtype("../../etc/passwd"), "unknown dtype"),
    "dtype huge": lambda: _edited(_set_dtype("F" * 70_000), r"unknown dtype 'FFFFFFFFFFFFFFFFFFFF'\.\.\. \(70000"),
    "shape disagrees with bytes": lambda: _edited(lambda h: h["layer.bias"].update(shape=[201]), "does not fill"),
    "NaN": lambda: _from_params(_with_value("layer.bias", 7, float("nan")), NON_FINITE),
    "Inf": lambda: _from_params(_with_value("layer.weight", 300, float("inf")), NON_FINITE),
    "-Inf": lambda: _from_params(_with_value("layer.weight", 0, float("-inf")), NON_FINITE),
    "wrong shape": lambda: _from_params(_changed("layer.weight", INITIAL["layer.weight"].reshape(20, 16)),
                                        r"'layer.weight' has shape \(20, 16\), expected \(16, 20\)"),
    "wrong size": lambda: _from_params(_changed("layer.bias", torch.zeros(201)), r"has shape \(201,\)"),
    "wrong dtype": lambda: _from_params(_changed("layer.bias", INITIAL["layer.bias"].double()), "has dtype"),
    "extra key": lambda: _from_params({**INITIAL, "evil": torch.zeros(2)}, r"unexpected \['evil'\]"),
    "missing key": lambda: _from_params({"layer.weight": INITIAL["layer.weight"]}, r"missing \['layer.bias'\]"),
    "huge key": lambda: _from_params({**INITIAL, "k" * 70_000: torch.zeros(1)}, r"unexpected \['kkkk.*70000"),
}


# -- 1. names and ids are bounded before anything is logged ----------------------------------------------


def test_long_names_ids_and_reasons_are_refused_short_and_unlogged(hostile, flkit_log):
    huge = "a" * 65_536
    join = hostile.stub.Join
    cases = {
        "site name": (lambda: join(pb.JoinRequest(site_name=huge, job_id=JOB, token=TOKEN,
                                                  protocol_version=PROTOCOL_VERSION), timeout=CALL_S),
                      r"site name 'a{40}'\.\.\. \(65536 characters\) is not allowed"),
        "site name, wrong token": (lambda: join(pb.JoinRequest(site_name=huge, job_id=JOB, token="x",
                                                               protocol_version=PROTOCOL_VERSION), timeout=CALL_S),
                                   "site name"),
        "path as site name": (lambda: join(pb.JoinRequest(site_name="../../escaped-site", job_id=JOB, token=TOKEN,
                                                          protocol_version=PROTOCOL_VERSION), timeout=CALL_S),
                              r"site name '\.\./\.\./escaped-site' is not allowed"),
        "site name with a newline": (lambda: join(pb.JoinRequest(site_name="victim\n", job_id=JOB, token=TOKEN,
                                                                 protocol_version=PROTOCOL_VERSION),
                                                  timeout=CALL_S), r"site name 'victim\\n'"),
        "job id": (lambda: join(pb.JoinRequest(site_name="victim", job_id=huge, token=TOKEN,
                                               protocol_version=PROTOCOL_VERSION), timeout=CALL_S),
                   r"job id 'a{40}'\.\.\. \(65536 characters\) is malformed"),
        "token": (lambda: join(pb.JoinRequest(site_name="victim", job_id=JOB, token=huge,
                                              protocol_version=PROTOCOL_VERSION), timeout=CALL_S), "bad job token"),
        "failure report's site": (lambda: hostile.stub.ReportFailure(
            pb.FailureReport(site_name=huge, job_id=JOB, token=TOKEN, reason=huge), timeout=CALL_S), "site name"),
        "heartbeat's session": (lambda: hostile.stub.Heartbeat(pb.HeartbeatRequest(session_id=huge), timeout=CALL_S),
                                "malformed session id"),
        "leave's session": (lambda: hostile.stub.Leave(pb.LeaveRequest(session_id=huge, reason=huge), timeout=CALL_S),
                            "malformed session id"),
        "tracking's session": (lambda: hostile.stub.LogMetrics(pb.MetricsBatch(session_id=huge, records_json=huge),
                                                               timeout=CALL_S), "malformed session id"),
        "task's session": (lambda: list(hostile.stub.GetTask(pb.GetTaskRequest(session_id=huge), timeout=CALL_S)),
                           "malformed session id"),
    }
    for what, (call, cause) in cases.items():
        outcome = assert_refused(_ended(call), cause)
        assert "a" * 100 not in outcome.details, what
    sid = hostile.victim()
    for field_name in ("task_id", "params_type"):
        outcome = assert_refused(hostile.send([_header(sid, hostile.task_id, len(VALID), **{field_name: huge}),
                                               *_framed(PIECES)]))
        assert "(65536 characters)" in outcome.text, field_name
    records = json.dumps([{"key": "k", "value": 1.0, "type": huge}])
    assert_refused(_ended(lambda: hostile.stub.LogMetrics(pb.MetricsBatch(session_id=hostile.victim(),
                                                                          records_json=records), timeout=CALL_S)),
                   "tracking record type must be one of")
    assert _logged(flkit_log) < 4000, [r.getMessage()[:200] for r in flkit_log.records]
    # A site's failure report and a reason to leave are kept (and logged) to MAX_REASON_CHARS.
    hostile.stub.ReportFailure(pb.FailureReport(site_name="bystander", job_id=JOB, token=TOKEN,
                                                reason="boom\n" + "r" * 1_000_000), timeout=CALL_S)
    failure = hostile.server.registry.sites["bystander"].failure or ""
    assert failure.startswith("boom") and len(failure) < MAX_REASON_CHARS + 100
    hostile.stub.Leave(pb.LeaveRequest(session_id=hostile.victim(), reason="l" * 1_000_000), timeout=CALL_S)
    assert len(hostile.server.registry.sites["victim"].failure or "") < MAX_REASON_CHARS + 300
    assert _logged(flkit_log) < 4000 + 3 * (MAX_REASON_CHARS + 300)
    hostile.assert_untouched()


# -- 2. nothing in the servicer raises: deep JSON, a bogus params type, and the last-resort guard -------------


def test_deep_json_and_a_bogus_params_type_are_refused(hostile, flkit_log):
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "metrics_json": (deep, "malformed metrics JSON: nested too deeply"),
        "meta_json": ('{"a": ' * 100_000 + "1" + "}" * 100_000, "malformed meta JSON: nested too deeply"),
        "params_type": ("BOGUS", "params_type 'BOGUS' is neither FULL nor DIFF"),
    }
    for name, (value, cause) in cases.items():
        for payload in ([], _framed(PIECES)):  # with params, and without
            size = len(VALID) if payload else 0
            assert_refused(hostile.send([_header(hostile.victim(), hostile.task_id, size, **{name: value}),
                                         *payload]), cause)
    sid = hostile.victim()
    assert_refused(hostile.send([_header(sid, hostile.task_id, len(VALID), metrics_json='{"accuracy": NaN}'),
                                 *_framed(PIECES)]), "NaN is not JSON")
    assert_refused(hostile.send([_header(sid, hostile.task_id, len(VALID), metrics_json="x" * (2 << 20)),
                                 *_framed(PIECES)]), "more than the 1048576 allowed")
    assert_refused(hostile.send([_header(hostile.victim(), hostile.task_id, len(VALID), metrics_json='{"a": "b"}'),
                                 *_framed(PIECES)]), "metric 'a' must be a finite number, got 'b'")
    assert "Exception calling application" not in flkit_log.text
    hostile.assert_untouched()


def test_a_bug_in_any_handler_is_answered_internal_and_logged_once(hostile, flkit_log, monkeypatch):
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug")

    service = hostile.server.service
    calls = {
        "Join": ("join", lambda: hostile.stub.Join(pb.JoinRequest(site_name="victim", job_id=JOB, token=TOKEN,
                                                                  protocol_version=PROTOCOL_VERSION), timeout=CALL_S)),
        "GetTask": ("next_task", lambda: list(hostile.stub.GetTask(
            pb.GetTaskRequest(session_id=hostile.sessions["holder"]), timeout=CALL_S))),
        "SubmitResult": ("max_result_bytes", lambda: hostile.submit_stream(
            iter([_header(hostile.victim(), hostile.task_id, len(VALID)), *_framed(PIECES)]), timeout=CALL_S)),
        "Heartbeat": ("heartbeat", lambda: hostile.stub.Heartbeat(
            pb.HeartbeatRequest(session_id=hostile.sessions["holder"]), timeout=CALL_S)),
        "ReportFailure": ("report_failure", lambda: hostile.stub.ReportFailure(
            pb.FailureReport(site_name="holder", job_id=JOB, token=TOKEN), timeout=CALL_S)),
        "Leave": ("leave", lambda: hostile.stub.Leave(pb.LeaveRequest(session_id=hostile.sessions["holder"]),
                                                      timeout=CALL_S)),
        "LogMetrics": ("log_metrics", lambda: hostile.stub.LogMetrics(
            pb.MetricsBatch(session_id=hostile.sessions["holder"], records_json="[]"), timeout=CALL_S)),
    }
    for method, (attribute, call) in calls.items():
        hostile.victim()  # before the bug is in place
        with monkeypatch.context() as patch:
            patch.setattr(service, attribute, bug)
            for _ in range(3):
                outcome = _ended(call)
                assert outcome.status == grpc.StatusCode.INTERNAL, (method, outcome)
                assert outcome.details == f"internal server error in {method} (ZeroDivisionError); see the server's log"
        tracebacks = [r for r in flkit_log.records if r.exc_info and method in r.getMessage()]
        assert len(tracebacks) == 1, (method, [r.getMessage() for r in tracebacks])
    assert "Exception calling application" not in flkit_log.text
    hostile.assert_untouched()


# -- 3. a result stream's payload is read only once its header passed every check -----------------------


def test_a_result_stream_is_refused_before_its_payload_is_read(hostile):
    def held(first: list[bytes], release: threading.Event) -> Iterator[bytes]:
        yield from first
        release.wait(3 * CALL_S)  # the site holds the stream open (past the call's deadline): the server
        # must answer without more
        yield from _framed(PIECES)

    header_cases = {
        "unknown session": (_header("0" * 32, hostile.task_id, 50 << 20), "unknown session"),
        "malformed session": (_header("../../etc/passwd", hostile.task_id, 50 << 20), "malformed session id"),
        "declared size too large": (_header(hostile.victim(), hostile.task_id, 50 << 20),
                                    "payload of 52428800 bytes is larger than any valid result"),
        "no header first": (_framed(PIECES[:1])[0], "result stream must start with a header"),
    }
    for what, (first, cause) in header_cases.items():
        release = threading.Event()
        try:
            outcome = _ended(lambda first=first, release=release:
                             hostile.submit_stream(held([first], release), timeout=CALL_S))
        finally:
            release.set()
        assert_refused(outcome, cause)
        assert outcome.status != grpc.StatusCode.DEADLINE_EXCEEDED, what

    # 50 MB behind an unknown session: refused at the header, long before the stream is drained.
    pulled = []

    def fifty_megabytes() -> Iterator[bytes]:
        yield _header("f" * 32, hostile.task_id, 50 << 20)
        for _ in range(12):
            pulled.append(1)
            yield payload_prefix(CHUNK_BYTES) + bytes(CHUNK_BYTES)

    assert_refused(_ended(lambda: hostile.submit_stream(fifty_megabytes(), timeout=CALL_S)), "unknown session")
    assert len(pulled) < 12, len(pulled)
    hostile.assert_untouched()


# -- 4. chunk framing and content: each mistake refused by name, the model untouched -----------------------


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_a_bad_result_stream_is_refused_by_name(hostile, case):
    stream = BAD_STREAMS[case]()
    assert_refused(hostile.send([_header(hostile.victim(), hostile.task_id, stream.size), *stream.payload]),
                   stream.cause)
    hostile.assert_untouched()


def test_the_victim_helper_gives_a_session_whose_result_would_count(hostile):
    """The fuzz's refusals mean something only if a well-formed result of the victim's session is
    taken: checked here without sending one (it would be folded into the round's aggregate)."""
    sid = hostile.victim()
    assert hostile.server.registry.site_of(sid) == "victim"
    assert hostile.server.registry.task_open("victim", hostile.task_id)
    assert hostile.server.service.max_result_bytes() >= len(VALID)


# -- 5. job folders: every path stays inside, site names are checked ------------------------------------------


def _job_folder(root: Path, **changes: Any) -> Path:
    folder = root / "job"
    (folder / "custom").mkdir(parents=True, exist_ok=True)
    (folder / "custom" / "train.py").write_text("import flkit\n")
    safetensors.torch.save_file(INITIAL, str(folder / "initial_model.safetensors"))
    runner = {"script": "custom/train.py"}
    data = {"format": 1, "name": "paths", "workflow": {"num_rounds": 1, "key_metric": None}, "n_clients": 2,
            "clients": runner, "sites": {}, "initial_model": "initial_model.safetensors", **changes}
    (folder / "job.json").write_text(json.dumps(data))
    return folder


def test_job_folder_paths_resolve_inside_the_folder(tmp_path):
    from flkit.job.config import load_job

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text("raise SystemExit('evil ran')\n")
    safetensors.torch.save_file(INITIAL, str(outside / "model.safetensors"))
    assert sorted(load_job(_job_folder(tmp_path)).resolve_sites()) == ["site-1", "site-2"]

    refused = {
        "clients script": ({"clients": {"script": "../../outside/evil.py"}}, None,
                           r"clients.script '\.\./\.\./outside/evil.py' is outside the job folder"),
        "site script": ({"sites": {"site-1": {"script": str(outside / "evil.py")}}}, None,
                        "sites.site-1.script .* is outside the job folder"),
        "script through a link": ({"clients": {"script": "custom/link.py"}},
                                  ("custom/link.py", outside / "evil.py"),
                                  r"clients.script 'custom/link.py' is outside the job folder"),
        "initial model": ({"initial_model": "../outside/model.safetensors"}, None,
                          "initial_model .* is outside the job folder"),
        "initial model through a link": ({}, ("initial_model.safetensors", outside / "model.safetensors"),
                                         "initial_model 'initial_model.safetensors' is outside the job folder"),
        "custom file through a link": ({}, ("custom/helper.py", outside / "evil.py"),
                                       "custom/ entry 'custom/helper.py' is outside the job folder"),
        "custom folder through a link": ({}, ("custom/lib", outside), "custom/ entry 'custom/lib' is outside"),
        "strategy file": ({"strategy": {"name": "evil", "args": {}, "file": "../outside/evil.py"}}, None,
                          "outside the job folder"),
        "site name": ({"sites": {"../../escaped-site": {"script": "custom/train.py"}}}, None,
                      r"site name '\.\./\.\./escaped-site' is not allowed"),
        "job name": ({"name": "../x"}, None, "job name"),
    }
    for what, (changes, link, cause) in refused.items():
        case = tmp_path / what.replace(" ", "_")
        folder = _job_folder(case, **changes)
        if link is not None:
            path = folder / link[0]
            path.unlink(missing_ok=True)
            path.symlink_to(link[1])
        with pytest.raises(ConfigError, match=cause):
            load_job(folder)

    job = load_job(_job_folder(tmp_path / "names"))
    with pytest.raises(ConfigError, match=r"site name '\.\./\.\./escaped-site' is not allowed"):
        job.resolve_sites(clients=["../../escaped-site"])
    from flkit.sim.simulator import simulate

    with pytest.raises(ConfigError, match="site name"):
        simulate(_job_folder(tmp_path / "sim"), tmp_path / "sim" / "ws", clients=["../../escaped-site"], quiet=True)
    assert not list(tmp_path.rglob("escaped-site"))


# -- the fuzz: over a thousand generated inputs ---------------------------------------------------------


RPCS = ["Join", "GetTask", "SubmitResult", "SubmitResult-stream", "Heartbeat", "ReportFailure", "Leave",
        "LogMetrics"]


@settings(FUZZ, max_examples=400)
@given(rpc=st.sampled_from(RPCS), data=st.binary(max_size=300), more=st.lists(st.binary(max_size=100), max_size=3))
def test_fuzz_random_bytes_as_every_rpcs_messages(hostile, rpc, data, more):
    """Random bytes as the serialised request (identity serializers: no client-side checks)."""
    path = f"/{SERVICE_NAME}/{rpc.split('-')[0]}"
    if rpc == "GetTask":
        call = hostile.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        outcome = _ended(lambda: list(call(data, timeout=CALL_S)))
    elif rpc == "SubmitResult-stream":
        call = hostile.channel.stream_unary(path, request_serializer=None, response_deserializer=pb.SubmitReply.FromString)
        outcome = _ended(lambda: call(iter([data, *more]), timeout=CALL_S))
    else:
        reply_type = pb.SubmitReply.FromString if rpc == "SubmitResult" else None
        call = hostile.channel.unary_unary(path, request_serializer=None, response_deserializer=reply_type)
        outcome = _ended(lambda: call(data, timeout=CALL_S))
    hostile.note(assert_refused(outcome))


def _mutated_stream() -> st.SearchStrategy[Stream]:
    n = len(PIECES)
    reorder = st.permutations(range(n)).filter(lambda p: p[0] != 0).map(lambda p: _reordered(list(p)))
    drop = st.integers(0, n - 1).map(lambda i: Stream(_framed(PIECES[:i] + PIECES[i + 1:]), len(VALID), TRUNCATED))
    duplicate = st.tuples(st.integers(0, n - 1), st.integers(0, n)).map(
        lambda ij: Stream(_framed(PIECES[:ij[1]] + [PIECES[ij[0]]] + PIECES[ij[1]:]), len(VALID), TOO_LONG))
    size = st.one_of(st.integers(-300, 300).filter(bool), st.sampled_from([2**62, 2**63, 2**64 - 1, 1 << 40])).map(
        lambda k: Stream(_framed(PIECES), len(VALID) + k if abs(k) <= 300 else k,
                         TOO_LONG if k < 0 else TRUNCATED if k <= 300 else "larger than any valid result"))
    frame_lie = st.tuples(st.integers(0, n - 1), st.integers(-5, 5).filter(bool)).filter(
        lambda t: len(PIECES[t[0]]) + t[1] >= 0).map(lambda t: _lying_frame(*t))
    dtype = st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE_TEXT)).filter(
        lambda d: d not in DTYPES).map(lambda d: _edited(_set_dtype(d), "unknown dtype"))
    name = st.sampled_from(sorted(INITIAL))
    non_finite = st.tuples(name, st.integers(0, 400), st.sampled_from([float("nan"), float("inf"), float("-inf")])
                           ).map(lambda t: _from_params(_with_value(*t), NON_FINITE))
    shapes = st.sampled_from([(20, 16), (320,), (4, 80), (16, 20, 1), (1, 320), (16, 21), (0,), ()])
    shape = shapes.map(lambda s: _from_params(
        _changed("layer.weight", torch.zeros(s) if torch.Size(s).numel() != 320 else INITIAL["layer.weight"].reshape(s)),
        "has shape"))
    dtypes = st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.uint8, torch.bool])
    wrong_dtype = st.tuples(name, dtypes).map(lambda t: _from_params(_changed(t[0], INITIAL[t[0]].to(t[1])),
                                                                     "has dtype"))
    keys = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(HOSTILE_TEXT)).filter(
        lambda k: k not in INITIAL and k != "__metadata__")
    extra = keys.map(lambda k: _from_params({**INITIAL, k: torch.zeros(3)}, "unexpected"))
    missing = name.map(lambda k: _from_params({n: t for n, t in INITIAL.items() if n != k}, "missing"))
    renamed = st.tuples(name, keys).map(lambda t: _from_params(
        {(t[1] if n == t[0] else n): v for n, v in INITIAL.items()}, "missing"))
    offsets = st.tuples(st.integers(-10, 3000), st.integers(-10, 3000)).filter(lambda o: o != (0, 800)).map(
        lambda o: _edited(lambda h: h["layer.bias"].update(data_offsets=list(o)), MALFORMED))
    return st.one_of(reorder, drop, duplicate, size, frame_lie, dtype, non_finite, shape, wrong_dtype, extra,
                     missing, renamed, offsets)


@settings(FUZZ, max_examples=450)
@given(stream=_mutated_stream())
def test_fuzz_mutated_result_streams(hostile, stream):
    """A valid payload, mutated: chunks reordered (the header's moved), dropped or duplicated,
    declared sizes off by a little or a lot, unknown dtypes, NaN/Inf, wrong shapes and dtypes,
    extra, missing or renamed keys, offsets that do not tile the data."""
    outcome = hostile.send([_header(hostile.victim(), hostile.task_id, stream.size), *stream.payload])
    hostile.note(assert_refused(outcome, stream.cause))


@pytest.fixture(scope="module")
def hostile_streamed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """The same server with FedAvg folding results while they arrive (the large-model path)."""
    h = Hostile(tmp_path_factory.mktemp("hostile-streamed"), streamed=True)
    try:
        yield h
    finally:
        h.close()


@settings(FUZZ, max_examples=250)
@given(stream=_mutated_stream())
def test_fuzz_mutated_result_streams_folded_while_they_arrive(hostile_streamed, stream):
    """The same mutations against the streamed fold (the header checked as its bytes come, the
    values window by window): each refused with a cause, and nothing of any of them stays in the
    round's sums (weight 1: taking a piece back out is exact, so the sums stay exactly zero)."""
    h = hostile_streamed
    outcome = h.send([_header(h.victim(), h.task_id, stream.size), *stream.payload])
    # Bytes are read as they come: a dropped or moved first piece shows as a malformed header, a
    # size that disagrees with the data as missing or extra bytes, before the mutation's own cause.
    assert_refused(outcome, "|".join((stream.cause, MALFORMED, TRUNCATED, TOO_LONG)))
    sums = h.server.controller._aggregator._sums
    assert all(int(torch.count_nonzero(t)) == 0 for t in sums.values())


def _bad_json(what: str) -> st.SearchStrategy[str]:
    deep = st.integers(33, 200_000).map(lambda d: "[" * d + "]" * d)
    def invalid(text: str) -> bool:
        if not text:  # no metrics, no meta
            return False
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return True
        if not isinstance(value, dict):
            return True
        if what == "metrics_json":
            return any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value.values())
        return value.get("NUM_STEPS_CURRENT_ROUND") is not None
    steps = st.one_of(st.text(max_size=10), st.integers(max_value=-1), st.just(float("inf"))).map(
        lambda v: json.dumps({"NUM_STEPS_CURRENT_ROUND": v}))
    values = st.one_of(st.text(max_size=10), st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                       st.floats(allow_nan=False), st.integers())
    objects = st.dictionaries(st.text(max_size=8), values, min_size=1, max_size=5).map(json.dumps)
    texts = st.one_of(st.text(max_size=50), st.sampled_from(HOSTILE_TEXT), deep, objects,
                      st.sampled_from(['{"a": NaN}', '{"a": Infinity}', '{"a": ' + "1" * 5000 + "}"]))
    if what == "meta_json":
        texts = st.one_of(texts, steps)
    return texts.filter(invalid)


def _bad_field(task_id: str) -> st.SearchStrategy[tuple[str, Any]]:
    """A header field that makes the result refused (a random session id is nobody's)."""
    text = st.one_of(st.text(max_size=60), st.sampled_from(HOSTILE_TEXT))
    return st.one_of(
        st.tuples(st.just("session_id"), text),
        st.tuples(st.just("task_id"), st.one_of(text, st.from_regex(r"[0-9a-f]{1,20}", fullmatch=True)).filter(
            lambda s: s != task_id)),
        st.tuples(st.just("params_type"), text.filter(lambda s: s not in ("", "FULL", "DIFF"))),
        st.tuples(st.just("metrics_json"), _bad_json("metrics_json")),
        st.tuples(st.just("meta_json"), _bad_json("meta_json")),
        st.tuples(st.just("params_file"), text.filter(bool)),
        st.tuples(st.just("payload_size"), st.sampled_from([2**62, 2**64 - 1, 1 << 40, (2 << 20) + 1])),
    )


@settings(FUZZ, max_examples=300)
@given(data=st.data(), released=st.lists(st.one_of(st.text(max_size=30), st.sampled_from(HOSTILE_TEXT)),
                                         max_size=80), with_payload=st.booleans())
def test_fuzz_result_headers_with_hostile_fields(hostile, data, released, with_payload):
    """One header field random, huge or path-like (the rest valid), with junk released_files."""
    name, value = data.draw(_bad_field(hostile.task_id), label="field")
    fields = {"released_files": released, name: value}
    size = fields.pop("payload_size", len(VALID) if with_payload else 0)
    frames = [_header(hostile.victim(), hostile.task_id, size, **fields)]
    if with_payload or name == "payload_size":
        frames += _framed(PIECES)
    hostile.note(assert_refused(hostile.send(frames)))


def test_after_the_fuzz_the_server_is_untouched(hostile):
    """Last in the module: the server still answers, the model and its files are as they were; and
    the fuzz (when it ran: ``-k`` may leave it out) sent over a thousand inputs that met every check."""
    hostile.assert_untouched()
    if hostile.fuzzed:
        assert hostile.fuzzed >= 1000
        assert [cause for cause in CAUSES if not hostile.causes[cause]] == [], hostile.causes


def test_an_upload_that_stops_sending_bytes_is_cut_off_and_frees_its_buffer(tmp_path):
    """A valid session that declares a payload and then holds the stream open does not keep a
    receive buffer: after upload_stall_s without bytes the call is cancelled. Meanwhile the same
    session cannot open a second upload."""
    from flkit.server.service import RESULT_BUFFERS

    cfg = WorkflowConfig.from_dict({"num_rounds": 1, "min_clients": 1, "heartbeat_interval_s": 0.2,
                                    "heartbeat_timeout_s": 1.0})
    srv = FLServer(cfg, ["s1"], INITIAL, tmp_path / "server", job_id=JOB, token=TOKEN, address="127.0.0.1:0",
                   shared_memory=False, upload_stall_s=1.0)
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=OPTIONS)
    stub = pb_grpc.FLKitStub(channel)
    release = threading.Event()
    try:
        sid = stub.Join(pb.JoinRequest(site_name="s1", job_id=JOB, token=TOKEN, protocol_version=PROTOCOL_VERSION),
                        timeout=CALL_S).session_id
        first = next(iter(stub.GetTask(pb.GetTaskRequest(session_id=sid, wait_s=5), timeout=CALL_S)))
        blob = _blob(INITIAL)
        submit = channel.stream_unary(f"/{SERVICE_NAME}/SubmitResult", request_serializer=None,
                                      response_deserializer=pb.SubmitReply.FromString)

        def stalled() -> Iterator[bytes]:
            yield _header(sid, first.header.task_id, len(blob))
            yield _framed([blob[:100]])[0]
            release.wait(30)  # the "site" keeps the stream open and sends nothing more

        outcome: dict[str, Any] = {}

        def upload() -> None:
            try:
                submit(stalled(), timeout=20)
            except grpc.RpcError as exc:
                outcome["error"] = exc

        first_upload = threading.Thread(target=upload)
        first_upload.start()
        while not srv._servicer._uploading and first_upload.is_alive():  # the server took the upload
            first_upload.join(0.01)
        # the same session cannot open a second upload meanwhile (it would hold a second buffer)
        reply = submit(iter([_header(sid, first.header.task_id, len(blob)), *_framed([blob])]), timeout=CALL_S)
        assert not reply.accepted and "already sending a result" in reply.error
        first_upload.join(20)
        assert outcome["error"].code() == grpc.StatusCode.CANCELLED
        # the buffer is given back as the server's handler unwinds (the client may learn of the
        # cancellation first)
        deadline = time.monotonic() + 10
        while srv._servicer._buffers._value != RESULT_BUFFERS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert srv._servicer._buffers._value == RESULT_BUFFERS
    finally:
        release.set()
        channel.close()
        srv.stop()
