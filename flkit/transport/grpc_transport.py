"""The gRPC transport: a site's end of the wire protocol (``proto/flkit.proto``).

Params leave as slices of the tensors' own memory (one copy, into the messages) and arrive
in one preallocated buffer that the received tensors are views of (one copy). Payload messages
are framed by hand (flkit.wire.frames), so the two params streams are called with their own
(de)serializers. A refusal's
``ErrorCode`` comes from the trailing metadata the server sets; a server that does not answer
is ``UNAVAILABLE``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from flkit.errors import ValidationError
from flkit.messages import ErrorCode, JobEnd, JoinReply, Result, ServiceError, SubmitReply, Task, TaskOrEnd
from flkit.transport.base import NoServerFiles
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.codec import json_to_dict, meta_to_json, metrics_to_json
from flkit.wire.frames import copy_into, is_payload, payload_of, payload_prefix
from flkit.wire.grpc_options import CHUNK_BYTES, ERROR_KEY, OPTIONS, PROTOCOL_VERSION, SERVICE_NAME
from flkit.wire.receive_buffers import ReceiveBuffers
from flkit.wire.tensor_stream import Encoded, parse

if TYPE_CHECKING:  # only a site with a startup kit loads the certificate machinery
    from flkit.deploy.kit import Kit

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


def _error(exc: grpc.RpcError, address: str, what: str, tls: bool = False) -> ServiceError:
    """The typed error behind a failed call (from the server's trailing metadata)."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    if code in _RETRYABLE:
        name = code.name if code is not None else "ERROR"
        why = ""
        if tls and code == grpc.StatusCode.UNAVAILABLE:
            from flkit.transport.tls import explain_handshake_failure

            explained = explain_handshake_failure(details or "")
            why = f"; {explained}" if explained else ""
        return ServiceError(ErrorCode.UNAVAILABLE,
                            f"{what}: server at {address} did not answer ({name}: {details}){why}")
    trailing: Sequence[tuple[str, str | bytes]] = (exc.trailing_metadata() if isinstance(exc, grpc.Call)
                                                   else None) or ()
    for key, value in trailing:
        if key == ERROR_KEY:
            try:
                return ServiceError(ErrorCode(value), f"{what}: {details}")
            except ValueError:
                break
    name = code.name if code is not None else "ERROR"
    return ServiceError(ErrorCode.INVALID, f"{what}: server at {address} refused ({name}): {details}")


class _Stub(Protocol):
    """The calls of the generated ``FLKitStub`` (``flkit_pb2_grpc`` is generated without types)."""

    Join: grpc.UnaryUnaryMultiCallable[pb.JoinRequest, pb.JoinReply]
    Heartbeat: grpc.UnaryUnaryMultiCallable[pb.HeartbeatRequest, pb.HeartbeatReply]
    ReportFailure: grpc.UnaryUnaryMultiCallable[pb.FailureReport, pb.Ack]
    Leave: grpc.UnaryUnaryMultiCallable[pb.LeaveRequest, pb.Ack]
    LogMetrics: grpc.UnaryUnaryMultiCallable[pb.MetricsBatch, pb.Ack]
    Status: grpc.UnaryUnaryMultiCallable[pb.StatusRequest, pb.StatusReply]
    Abort: grpc.UnaryUnaryMultiCallable[pb.AbortRequest, pb.Ack]


class GrpcTransport(NoServerFiles):
    """A channel to one server. Thread-safe (gRPC channels are)."""

    name = "grpc"

    def __init__(self, address: str, kit: Kit | None = None) -> None:
        """``kit``: this participant's startup kit: mutual TLS with the project's CA (else plain text)."""
        self.address = address
        self.kit = kit
        if kit is None:
            self._channel = grpc.insecure_channel(address, options=OPTIONS)
        else:
            from flkit.transport.tls import channel_credentials, channel_options

            self._channel = grpc.secure_channel(address, channel_credentials(kit),
                                                options=OPTIONS + channel_options(kit))
        self._stub: _Stub = pb_grpc.FLKitStub(self._channel)
        self._received = ReceiveBuffers(keep=1)
        # The params streams: serialised chunk messages in and out (payloads framed by hand).
        self._get_task_stream: grpc.UnaryStreamMultiCallable[pb.GetTaskRequest, bytes] = self._channel.unary_stream(
            f"/{SERVICE_NAME}/GetTask", request_serializer=pb.GetTaskRequest.SerializeToString,
            response_deserializer=None)
        self._submit_stream: grpc.StreamUnaryMultiCallable[bytes, pb.SubmitReply] = self._channel.stream_unary(
            f"/{SERVICE_NAME}/SubmitResult", request_serializer=None, response_deserializer=pb.SubmitReply.FromString)
        # A result without a payload (params in a shared-memory file, or metrics only) is one message:
        # sent as a unary call on the same method (the wire does not tell the two apart), which costs
        # gRPC no thread to consume a request stream.
        self._submit_one: grpc.UnaryUnaryMultiCallable[bytes, pb.SubmitReply] = self._channel.unary_unary(
            f"/{SERVICE_NAME}/SubmitResult", request_serializer=None, response_deserializer=pb.SubmitReply.FromString)

    def close(self) -> None:
        self._channel.close()

    def _error(self, exc: grpc.RpcError, what: str) -> ServiceError:
        return _error(exc, self.address, what, tls=self.kit is not None)

    def join(self, site: str, job_id: str, token: str, timeout: float) -> JoinReply:
        req = pb.JoinRequest(site_name=site, job_id=job_id, token=token, protocol_version=PROTOCOL_VERSION)
        try:
            reply = self._stub.Join(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, f"site {site} joining job {job_id}") from None
        return JoinReply(reply.session_id, json_to_dict(reply.job_config_json, "job config"),
                         reply.heartbeat_interval_s, dict(reply.offers))

    def get_task(self, session_id: str, wait_s: float, timeout: float, header_only: bool = False) -> TaskOrEnd:
        return self._get_task(session_id, wait_s, timeout, header_only, by_file=False)

    def _params_from_file(self, task: Task, name: str, size: int) -> None:
        """Params the server put in a shared-memory file (only the shm transport asks for that)."""
        raise ValidationError(f"the server sent params as file {name[:80]!r}, which this transport did not ask for")

    def _get_task(self, session_id: str, wait_s: float, timeout: float, header_only: bool,
                  by_file: bool, released: list[str] | None = None) -> TaskOrEnd:
        request = pb.GetTaskRequest(session_id=session_id, wait_s=wait_s, header_only=header_only,
                                    params_by_file=by_file, released_files=released or [])
        try:
            stream = self._get_task_stream(request, timeout=timeout)
            frame = next(stream, None)
            try:
                first = None if frame is None or is_payload(frame) else pb.TaskChunk.FromString(frame)
            except DecodeError:
                first = None
            if first is None or first.WhichOneof("kind") != "header":
                raise ValidationError("task stream did not start with a header")
            h = first.header
            if h.status == pb.NO_TASK_YET:
                return None
            if h.status == pb.JOB_FINISHED:
                return JobEnd(failed=h.job_failed, reason=h.end_reason)
            task = Task(h.task_id, h.task_name, h.current_round, h.total_rounds, h.params_type)
            if header_only:
                stream.cancel()
                return task
            if h.params_file:
                stream.cancel()
                task.meta = json_to_dict(h.meta_json, "task meta")
                self._params_from_file(task, h.params_file, h.payload_size)
                return task
            buffer = self._received.take(h.payload_size)
            view = np.frombuffer(buffer, dtype=np.uint8)
            received = 0
            for frame in stream:
                payload = payload_of(frame)
                size = len(payload)
                if received + size > h.payload_size:
                    raise ValidationError("task payload longer than its header says")
                copy_into(view, received, payload)
                received += size
            del view
        except grpc.RpcError as exc:
            raise self._error(exc, "receiving a task") from None
        if received != h.payload_size:
            raise ServiceError(ErrorCode.UNAVAILABLE, f"task payload truncated ({received} of {h.payload_size} bytes)")
        task.meta = json_to_dict(h.meta_json, "task meta")
        task.params = parse(buffer) if h.payload_size else None
        self._received.give_back(buffer)  # reused once the site holds none of these params
        return task

    def submit(self, session_id: str, result: Result, timeout: float) -> SubmitReply:
        encoded = None if result.params is None else Encoded(result.params)
        return self._submit_header(session_id, result, size=0 if encoded is None else encoded.size, timeout=timeout,
                                   encoded=encoded)

    def _submit_header(self, session_id: str, result: Result, size: int, timeout: float, params_file: str = "",
                       encoded: Encoded | None = None, released: list[str] | None = None) -> SubmitReply:
        """Send the result's header, then its params as chunks (``encoded``) or nothing (``params_file``)."""
        header = pb.ResultHeader(
            session_id=session_id,
            task_id=result.task_id,
            params_type=result.params_type,
            metrics_json=metrics_to_json(result.metrics),
            meta_json=meta_to_json(result.meta),
            payload_size=size,
            params_file=params_file,
            released_files=released or [],
        )

        def messages() -> Iterator[bytes]:
            yield pb.ResultChunk(header=header).SerializeToString()
            if encoded is not None:
                yield from encoded.chunks(CHUNK_BYTES, payload_prefix)  # serialised ResultChunk(payload=...)

        try:
            if encoded is None:
                reply = self._submit_one(pb.ResultChunk(header=header).SerializeToString(), timeout=timeout)
            else:
                reply = self._submit_stream(messages(), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, "sending a result") from None
        return SubmitReply(reply.accepted, reply.error, reply.job_ended)

    def heartbeat(self, session_id: str, timeout: float) -> bool:
        try:
            return bool(self._stub.Heartbeat(pb.HeartbeatRequest(session_id=session_id), timeout=timeout).job_running)
        except grpc.RpcError as exc:
            raise self._error(exc, "heartbeat") from None

    def report_failure(self, site: str, job_id: str, token: str, session_id: str, reason: str,
                       timeout: float) -> None:
        req = pb.FailureReport(session_id=session_id, site_name=site, job_id=job_id, token=token, reason=reason)
        try:
            self._stub.ReportFailure(req, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, "reporting a failure") from None

    def log_metrics(self, session_id: str, records_json: str, timeout: float) -> None:
        try:
            self._stub.LogMetrics(pb.MetricsBatch(session_id=session_id, records_json=records_json), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, "sending tracking records") from None

    def status(self, last_rounds: int, timeout: float) -> dict[str, Any]:
        """The job's state (an admin's call: the server refuses it from site certificates)."""
        try:
            reply = self._stub.Status(pb.StatusRequest(last_rounds=last_rounds), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, "asking for the job's status") from None
        return json_to_dict(reply.status_json, "status")

    def abort(self, reason: str, timeout: float) -> None:
        """End the running job (an admin's call)."""
        try:
            self._stub.Abort(pb.AbortRequest(reason=reason), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, "aborting the job") from None

    def leave(self, session_id: str, reason: str, timeout: float) -> None:
        try:
            self._stub.Leave(pb.LeaveRequest(session_id=session_id, reason=reason), timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, "leaving") from None


