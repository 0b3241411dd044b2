"""The gRPC servicer: protobuf to and from the JobService, nothing else.

Params arrive as safetensors bytes in chunks, written into one buffer and parsed into tensors
that are views of it (no further copy); they leave as slices of the global model's own memory.
Payload messages are framed by hand (flkit.wire.frames: the same bytes as protobuf's, without
its three extra copies per message), so GetTask and SubmitResult are registered with their own
(de)serializers (``add_to_server``).
At most ``RESULT_BUFFERS`` results are received at once: further uploads wait (gRPC's flow
control holds their senders) so the server's memory stays at a few model sizes whatever the
number of sites. A result is checked whole before any of it is folded in, so a bad tensor at
the end of a result can still be refused without touching the aggregate.
Refusals carry their ``ErrorCode`` in the trailing metadata key ``flkit-error``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from flkit.errors import ValidationError
from flkit.messages import ErrorCode, JobEnd, Result, ServiceError
from flkit.server.job_service import JobService
from flkit.server.shm_exchange import ShmExchange
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.codec import Params, json_to_dict
from flkit.wire.frames import copy_into, is_payload, payload_of, payload_prefix
from flkit.wire.grpc_options import CHUNK_BYTES, ERROR_KEY, SERVICE_NAME
from flkit.wire.receive_buffers import ReceiveBuffers
from flkit.wire.tensor_stream import Encoded, parse

log = logging.getLogger("flkit.server")

# Results received at the same time (each needs a buffer of its size until it is folded in):
# enough for uploads from several hosts to overlap, few enough to bound the server's memory.
RESULT_BUFFERS = 4

STATUS = {
    ErrorCode.UNKNOWN_SESSION: grpc.StatusCode.NOT_FOUND,
    ErrorCode.JOB_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.WRONG_JOB: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNKNOWN_SITE: grpc.StatusCode.NOT_FOUND,
    ErrorCode.BAD_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PROTOCOL: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


# A refusal's text travels in gRPC's trailing metadata, which is limited to 16 KiB in all.
MAX_ERROR_CHARS = 2000


def _abort(context: grpc.ServicerContext, exc: ServiceError) -> NoReturn:
    context.set_trailing_metadata(((ERROR_KEY, exc.code.value),))
    text = str(exc)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"... ({len(text) - MAX_ERROR_CHARS} more characters)"
    context.abort(STATUS[exc.code], text)
    raise AssertionError("unreachable")  # context.abort raises


# The unary calls of proto/flkit.proto: (request, reply) message types.
_UNARY: dict[str, tuple[type[Any], type[Any]]] = {
    "Join": (pb.JoinRequest, pb.JoinReply),
    "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
    "ReportFailure": (pb.FailureReport, pb.Ack),
    "Leave": (pb.LeaveRequest, pb.Ack),
    "LogMetrics": (pb.MetricsBatch, pb.Ack),
}


def _task_chunk_bytes(chunk: pb.TaskChunk | bytes) -> bytes:
    """GetTask's messages: a header message, then payload messages already serialised."""
    return chunk if isinstance(chunk, bytes) else chunk.SerializeToString()


def add_to_server(servicer: FLKitService, server: grpc.Server) -> None:
    """Register ``servicer`` as the generated ``add_FLKitServicer_to_server`` does, except that
    GetTask's responses and SubmitResult's requests are passed as serialised bytes."""
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString)
        for name, (request, reply) in _UNARY.items()
    }
    handlers["GetTask"] = grpc.unary_stream_rpc_method_handler(
        servicer.GetTask, request_deserializer=pb.GetTaskRequest.FromString, response_serializer=_task_chunk_bytes)
    handlers["SubmitResult"] = grpc.stream_unary_rpc_method_handler(
        servicer.SubmitResult, request_deserializer=None, response_serializer=pb.SubmitReply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class FLKitService(pb_grpc.FLKitServicer):
    def __init__(self, service: JobService, shm: ShmExchange | None = None) -> None:
        self.service = service
        self.shm = shm  # params by file for sites on this host (they ask with params_by_file)
        self._buffers = threading.BoundedSemaphore(RESULT_BUFFERS)
        self._received = ReceiveBuffers(keep=RESULT_BUFFERS)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            reply = self.service.join(request.site_name, request.job_id, request.token, request.protocol_version)
        except ServiceError as exc:
            _abort(context, exc)
        return pb.JoinReply(session_id=reply.session_id, job_config_json=json.dumps(reply.job_config),
                            heartbeat_interval_s=reply.heartbeat_interval_s, offers=reply.offers)

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskChunk | bytes]:
        try:
            if request.released_files and self.shm is not None:
                self.service.site_of(request.session_id)  # only a session of the job lets go of files
                self.shm.release(request.session_id, request.released_files)
            outcome = self.service.next_task(request.session_id, request.wait_s, header_only=request.header_only)
        except ServiceError as exc:
            _abort(context, exc)
        if outcome is None:
            yield pb.TaskChunk(header=pb.TaskHeader(status=pb.NO_TASK_YET))
            return
        if isinstance(outcome, JobEnd):
            yield pb.TaskChunk(
                header=pb.TaskHeader(status=pb.JOB_FINISHED, end_reason=outcome.reason, job_failed=outcome.failed)
            )
            return
        task = outcome
        header = pb.TaskHeader(status=pb.TASK_READY, task_id=task.task_id, task_name=task.name,
                               current_round=task.round, total_rounds=task.total_rounds,
                               params_type=task.params_type, meta_json=json.dumps(task.meta))
        encoded = None
        if task.params is not None and not request.header_only:
            if request.params_by_file and self.shm is not None:
                try:
                    header.params_file, header.payload_size = self.shm.task_file(task, request.session_id)
                except OSError as exc:  # e.g. /dev/shm filled up meanwhile: the bytes go by the socket
                    log.warning("task %s: params not written to shared memory (%s); sending them over gRPC",
                                task.task_id, exc)
            if not header.params_file:
                encoded = Encoded(task.params)
                header.payload_size = encoded.size
        yield pb.TaskChunk(header=header)
        if encoded is not None:
            yield from encoded.chunks(CHUNK_BYTES, payload_prefix)  # serialised TaskChunk(payload=...)

    def SubmitResult(self, request_iterator: Iterator[bytes],
                     context: grpc.ServicerContext) -> pb.SubmitReply:
        """``request_iterator`` yields serialised ResultChunk messages: a header, then payloads."""
        first = next(request_iterator, None)
        try:
            chunk = None if first is None or is_payload(first) else pb.ResultChunk.FromString(first)
        except DecodeError:  # not a message of this protocol
            chunk = None
        if chunk is None or chunk.WhichOneof("kind") != "header":
            return pb.SubmitReply(accepted=False, error="result stream must start with a header")
        header = chunk.header
        try:
            self.service.site_of(header.session_id)  # nothing is read for an unknown session
        except ServiceError as exc:
            _abort(context, exc)
        if header.released_files and self.shm is not None:
            self.shm.release(header.session_id, header.released_files)
        limit = self.service.max_result_bytes()
        if header.payload_size > limit:
            return pb.SubmitReply(
                accepted=False, error=f"payload of {header.payload_size} bytes is larger than any valid result"
            )
        if header.params_file:
            return self._submit_file(header, context)
        if not header.payload_size:
            return self._submit(header, request_iterator, None, context)
        with self._buffers:  # a bounded number of model-sized buffers, whatever the number of sites
            buffer = self._received.take(header.payload_size)
            try:
                return self._submit(header, request_iterator, buffer, context)
            finally:  # the result was folded in (or refused): the buffer serves the next one
                self._received.give_back(buffer)

    def _submit(self, header: pb.ResultHeader, request_iterator: Iterator[bytes], buffer: bytearray | None,
                context: grpc.ServicerContext) -> pb.SubmitReply:
        if buffer is None:
            buffer = bytearray()
        view = np.frombuffer(buffer, dtype=np.uint8)
        received = 0
        for frame in request_iterator:
            if not is_payload(frame):
                return pb.SubmitReply(accepted=False, error="unexpected second header in result stream")
            try:
                payload = payload_of(frame)
            except ValidationError as exc:
                return pb.SubmitReply(accepted=False, error=str(exc))
            size = len(payload)
            if received + size > header.payload_size:
                return pb.SubmitReply(accepted=False, error="result payload longer than its header says")
            copy_into(view, received, payload)
            received += size
        if received != header.payload_size:
            return pb.SubmitReply(
                accepted=False, error=f"result payload truncated: got {received} of {header.payload_size} bytes"
            )
        del view
        return self._hand_over(header, lambda: parse(buffer) if header.payload_size else None, context)

    def _submit_file(self, header: pb.ResultHeader, context: grpc.ServicerContext) -> pb.SubmitReply:
        """A result whose params a site on this host wrote to the shared-memory folder."""

        def read() -> Params:
            if self.shm is None:
                raise ValidationError("this server offers no shared-memory folder")
            return self.shm.take_result(header.session_id, header.task_id, header.params_file, header.payload_size)

        return self._hand_over(header, read, context)

    def _hand_over(self, header: pb.ResultHeader, read_params: Callable[[], Params | None],
                   context: grpc.ServicerContext) -> pb.SubmitReply:
        """The result's JSON parts and params (``read_params``) to the JobService. Params that cannot
        be read are the site's failure, as a bad result is; bad JSON is only refused."""
        try:
            metrics = json_to_dict(header.metrics_json, "metrics")
            meta = json_to_dict(header.meta_json, "meta")
        except ValidationError as exc:
            return pb.SubmitReply(accepted=False, error=str(exc))
        try:
            params = read_params()
        except ValidationError as exc:
            try:
                self.service.refuse_result(header.session_id, str(exc))
            except ServiceError as gone:
                _abort(context, gone)
            return pb.SubmitReply(accepted=False, error=str(exc))
        result = Result(task_id=header.task_id, params_type=header.params_type, params=params, metrics=metrics,
                        meta=meta)
        try:
            reply = self.service.submit(header.session_id, result)
        except ServiceError as exc:
            _abort(context, exc)
        return pb.SubmitReply(accepted=reply.accepted, error=reply.error, job_ended=reply.job_ended)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        try:
            return pb.HeartbeatReply(job_running=self.service.heartbeat(request.session_id))
        except ServiceError as exc:
            _abort(context, exc)

    def ReportFailure(self, request: pb.FailureReport, context: grpc.ServicerContext) -> pb.Ack:
        try:
            self.service.report_failure(request.site_name, request.job_id, request.token, request.session_id,
                                        request.reason)
        except ServiceError as exc:
            _abort(context, exc)
        return pb.Ack()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        try:
            self.service.leave(request.session_id, request.reason)
        except ServiceError as exc:
            _abort(context, exc)
        return pb.Ack()

    def LogMetrics(self, request: pb.MetricsBatch, context: grpc.ServicerContext) -> pb.Ack:
        try:
            self.service.log_metrics(request.session_id, request.records_json)
        except ServiceError as exc:
            _abort(context, exc)
        return pb.Ack()
