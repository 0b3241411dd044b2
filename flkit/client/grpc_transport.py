"""The site's end of the gRPC protocol: one method per RPC, errors turned into flkit errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from flkit.errors import CommunicationError, FLKitError, ValidationError
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.codec import Params, decode_params, iter_chunks, json_to_dict
from flkit.wire.grpc_options import OPTIONS, PROTOCOL_VERSION


class ServerUnreachable(CommunicationError):
    """The server did not answer (not up yet, restarting, network): worth retrying."""


class JobAlreadyEnded(FLKitError):
    """The server refused a join because the job is over (a late or relaunched site)."""


class SessionExpired(FLKitError):
    """The server no longer knows this session (it restarted, or declared the site dead): join again."""


@dataclass
class TaskMessage:
    status: str  # "ready", "wait" or "finished"
    task_id: str = ""
    task_name: str = ""
    current_round: int = 0
    total_rounds: int = 0
    params_type: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    params: Params | None = None
    end_reason: str = ""
    job_failed: bool = False
    # The params' safetensors bytes as received, kept only when the transport is asked to
    # (rank 0 under DDP forwards them to the other ranks without encoding again).
    payload: bytes | None = None


def _translate(exc: grpc.RpcError, address: str, what: str) -> FLKitError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return ServerUnreachable(f"{what}: server at {address} did not answer ({code.name}: {details})")
    if code == grpc.StatusCode.NOT_FOUND and details and "unknown session" in details:
        return SessionExpired(details)
    if code == grpc.StatusCode.FAILED_PRECONDITION and details and "has ended" in details:
        return JobAlreadyEnded(details)
    name = code.name if code is not None else "ERROR"
    return FLKitError(f"{what}: server at {address} refused ({name}): {details}")


class GrpcTransport:
    """A channel to one server. Thread-safe (gRPC channels are)."""

    def __init__(self, address: str, keep_payload: bool = False) -> None:
        self.address = address
        self.keep_payload = keep_payload
        self._channel = grpc.insecure_channel(address, options=OPTIONS)
        self._stub = pb_grpc.FLKitStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def join(self, site: str, job_id: str, token: str, timeout: float) -> tuple[str, dict[str, Any], float]:
        req = pb.JoinRequest(site_name=site, job_id=job_id, token=token, protocol_version=PROTOCOL_VERSION)
        try:
            reply = self._stub.Join(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, f"site {site} joining job {job_id}") from None
        return reply.session_id, json_to_dict(reply.job_config_json, "job config"), reply.heartbeat_interval_s

    def get_task(self, session_id: str, wait_s: float, timeout: float, header_only: bool = False) -> TaskMessage:
        """The site's next task (params decoded); with ``header_only`` only its name, round and id."""
        request = pb.GetTaskRequest(session_id=session_id, wait_s=wait_s, header_only=header_only)
        try:
            stream = self._stub.GetTask(request, timeout=timeout)
            first = next(stream, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise ValidationError("task stream did not start with a header")
            h = first.header
            if h.status == pb.NO_TASK_YET:
                return TaskMessage("wait")
            if h.status == pb.JOB_FINISHED:
                return TaskMessage("finished", end_reason=h.end_reason, job_failed=h.job_failed)
            if header_only:
                stream.cancel()
                return TaskMessage("ready", task_id=h.task_id, task_name=h.task_name,
                                   current_round=h.current_round, total_rounds=h.total_rounds)
            chunks, received = [], 0
            for msg in stream:
                chunks.append(msg.payload)
                received += len(msg.payload)
                if received > h.payload_size:
                    raise ValidationError("task payload longer than its header says")
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, "receiving a task") from None
        if received != h.payload_size:
            raise ServerUnreachable(f"task payload truncated ({received} of {h.payload_size} bytes)")
        payload = b"".join(chunks)
        del chunks
        return TaskMessage(
            status="ready",
            task_id=h.task_id,
            task_name=h.task_name,
            current_round=h.current_round,
            total_rounds=h.total_rounds,
            params_type=h.params_type,
            meta=json_to_dict(h.meta_json, "task meta"),
            params=decode_params(payload) if h.payload_size else None,
            payload=payload if self.keep_payload else None,
        )

    def submit(self, session_id: str, task_id: str, params_type: str, payload: bytes | None,
               metrics_json: str, meta_json: str, timeout: float) -> tuple[bool, str, bool]:
        """Upload a result; returns (accepted, error, job_ended)."""
        def messages() -> Iterator[pb.ResultChunk]:
            yield pb.ResultChunk(
                header=pb.ResultHeader(
                    session_id=session_id,
                    task_id=task_id,
                    params_type=params_type,
                    metrics_json=metrics_json,
                    meta_json=meta_json,
                    payload_size=len(payload) if payload else 0,
                )
            )
            if payload:
                for chunk in iter_chunks(payload):
                    yield pb.ResultChunk(payload=chunk)

        try:
            reply = self._stub.SubmitResult(messages(), timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, "sending a result") from None
        return reply.accepted, reply.error, reply.job_ended

    def heartbeat(self, session_id: str, timeout: float) -> bool:
        try:
            return self._stub.Heartbeat(pb.HeartbeatRequest(session_id=session_id), timeout=timeout).job_running
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, "heartbeat") from None

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str,
                       timeout: float) -> None:
        req = pb.FailureReport(session_id=session_id, site_name=site, job_id=job_id, token=token, reason=reason)
        try:
            self._stub.ReportFailure(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, "reporting a failure") from None

    def log_metrics(self, session_id: str, records_json: str, timeout: float) -> None:
        """Send a batch of tracking records (a JSON array)."""
        try:
            self._stub.LogMetrics(pb.MetricsBatch(session_id=session_id, records_json=records_json), timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, "sending tracking records") from None

    def leave(self, session_id: str, reason: str, timeout: float) -> None:
        try:
            self._stub.Leave(pb.LeaveRequest(session_id=session_id, reason=reason), timeout=timeout)
        except grpc.RpcError as exc:
            raise _translate(exc, self.address, "leaving") from None
