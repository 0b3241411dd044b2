"""The gRPC servicer: protobuf to and from the JobService, nothing else.

Params arrive as safetensors bytes in chunks, written into one buffer and parsed into tensors
that are views of it (no further copy); they leave as slices of the global model's own memory.
Payload messages are framed by hand (flkit.wire.frames: the same bytes as protobuf's, without
its three extra copies per message), so GetTask and SubmitResult are registered with their own
(de)serializers (``add_to_server``).
At most ``result_buffers(model size)`` results (4, fewer for models over 256 MB) are received at
once: further uploads wait (gRPC's flow control holds their senders) so the server's memory stays
at a few model sizes whatever the number of sites. A result is checked whole before any of it is
folded in, so a bad tensor at the end of a result can still be refused without touching the
aggregate.
Refusals carry their ``ErrorCode`` in the trailing metadata key ``flkit-error``.

Hostile input: requests arrive as bytes and are parsed here, so a malformed message is an
INVALID_ARGUMENT refusal like any other; the JobService bounds every field before anything of it
is logged or quoted; a result stream must start with its header, and nothing more of it is read
before its session, its ids, its JSON and its declared size are checked (the receive buffer comes
last). Every handler has a last-resort guard: an unexpected exception is logged (its traceback
once per handler and kind) and answered INTERNAL with a short text, never gRPC's generic UNKNOWN.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from flkit.errors import ValidationError
from flkit.messages import ErrorCode, JobEnd, Result, ServiceError, SubmitReply
from flkit.server.job_service import JobService, StreamedResult
from flkit.server.peer import ADMIN, current_peer
from flkit.server.shm_exchange import ShmExchange
from flkit.server.stall_watch import StallWatch
from flkit.server.streamed_upload import (
    DiskJournal,
    FileSource,
    Journal,
    StreamedUpload,
    UploadRefused,
    Windows,
)
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
# ... but no more of them than fit in this many bytes (at least one): with a model of 2 GB the
# uploads take turns, and the server holds one receive buffer, not four.
RECEIVE_BUDGET_BYTES = 1 << 30


def result_buffers(model_bytes: int) -> int:
    """How many results are received at once for a model of ``model_bytes``."""
    return max(1, min(RESULT_BUFFERS, RECEIVE_BUDGET_BYTES // max(model_bytes, 1)))
# While a result streams in, every this many chunks (64 MiB) mark its site as seen: a large upload
# on a slow link is a sign of life, not a silence to be mistaken for a dead site.
ALIVE_EVERY_CHUNKS = 16

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.UNKNOWN_SESSION: grpc.StatusCode.NOT_FOUND,
    ErrorCode.JOB_ENDED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.WRONG_JOB: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNKNOWN_SITE: grpc.StatusCode.NOT_FOUND,
    ErrorCode.BAD_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.PROTOCOL: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


# A refusal's text travels in gRPC's trailing metadata, which is limited to 16 KiB in all.
MAX_ERROR_CHARS = 2000


def _short(text: str) -> str:
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[:MAX_ERROR_CHARS] + f"... ({len(text) - MAX_ERROR_CHARS} more characters)"


def _no_shm() -> Params:
    raise ValidationError("this server offers no shared-memory folder")


class _Aborted(Exception):
    """The call was answered with a refusal (``context.abort``): not for the last-resort guard."""


def _abort(context: grpc.ServicerContext, exc: ServiceError) -> NoReturn:
    context.set_trailing_metadata(((ERROR_KEY, exc.code.value),))
    try:
        context.abort(STATUS.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION), _short(str(exc)))
    except Exception:  # context.abort raises (a bare Exception) once the status is set
        raise _Aborted(exc) from None
    raise _Aborted(exc)


def _refused(error: str, job_ended: bool = False) -> pb.SubmitReply:
    return pb.SubmitReply(accepted=False, error=_short(error), job_ended=job_ended)


class _Guard:
    """The last resort around every handler: an exception nobody expected (a bug) is answered
    INTERNAL with a short text instead of gRPC's ``Exception calling application`` (UNKNOWN, with
    the exception's text), and logged at ERROR: with its traceback the first time per handler and
    kind, in one line after that (a peer that found a bug cannot flood the log with it)."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def failed(self, method: str, exc: Exception, context: grpc.ServicerContext) -> NoReturn:
        kind = type(exc).__name__
        with self._lock:
            first = (method, kind) not in self._seen
            self._seen.add((method, kind))
        if first:
            log.error("%s: internal error (%s); the call is answered INTERNAL", method, kind, exc_info=exc)
        else:
            log.error("%s: internal error again (%s: %s)", method, kind, str(exc)[:200])
        try:
            context.abort(grpc.StatusCode.INTERNAL, f"internal server error in {method} ({kind}); see the server's log")
        except Exception:
            raise _Aborted() from None
        raise _Aborted()

    def unary(self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Any]
              ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behaviour(request, context)
            except _Aborted:
                raise
            except Exception as exc:
                self.failed(method, exc, context)

        return guarded

    def stream(self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
               ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behaviour(request, context)
            except _Aborted:
                raise
            except Exception as exc:
                self.failed(method, exc, context)

        return guarded


def _parsed(message: type[Any], behaviour: Callable[[Any, grpc.ServicerContext], Any]
            ) -> Callable[[bytes, grpc.ServicerContext], Any]:
    """``behaviour`` called with the request parsed from its bytes: a message that does not parse is
    an INVALID_ARGUMENT refusal (gRPC's own deserializer would answer INTERNAL and log a traceback)."""

    def parse_then(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = message.FromString(raw)
        except Exception:  # DecodeError, or anything else the runtime finds wrong with hostile bytes
            _abort(context, ServiceError(ErrorCode.INVALID, f"malformed {message.__name__} message "
                                                            f"({len(raw)} bytes)"))
        return behaviour(request, context)

    return parse_then


# The unary calls of proto/flkit.proto: (request, reply) message types.
_UNARY: dict[str, tuple[type[Any], type[Any]]] = {
    "Join": (pb.JoinRequest, pb.JoinReply),
    "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
    "ReportFailure": (pb.FailureReport, pb.Ack),
    "Leave": (pb.LeaveRequest, pb.Ack),
    "LogMetrics": (pb.MetricsBatch, pb.Ack),
    "Status": (pb.StatusRequest, pb.StatusReply),
    "Abort": (pb.AbortRequest, pb.Ack),
}


def _require_admin(context: grpc.ServicerContext) -> None:
    """The admin calls exist only on a server with a kit, where the caller's certificate says who it
    is; a plain-text server (a shared token, held by every site) offers them to no one."""
    peer = current_peer()
    if peer is None or peer.role != ADMIN:
        _abort(context, ServiceError(ErrorCode.BAD_TOKEN, "this call needs an admin certificate: a server "
                                                          "started with --kit, and an admin's kit"))


def _task_chunk_bytes(chunk: pb.TaskChunk | bytes) -> bytes:
    """GetTask's messages: a header message, then payload messages already serialised."""
    return chunk if isinstance(chunk, bytes) else chunk.SerializeToString()


def add_to_server(servicer: FLKitService, server: grpc.Server) -> None:
    """Register ``servicer`` as the generated ``add_FLKitServicer_to_server`` does, except that
    requests are parsed by the handlers (``_parsed``), GetTask's responses and SubmitResult's
    requests are passed as serialised bytes, and every handler is guarded (``_Guard``)."""
    guard = servicer.guard
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            guard.unary(name, _parsed(request, getattr(servicer, name))), request_deserializer=None,
            response_serializer=reply.SerializeToString)
        for name, (request, reply) in _UNARY.items()
    }
    handlers["GetTask"] = grpc.unary_stream_rpc_method_handler(
        guard.stream("GetTask", _parsed(pb.GetTaskRequest, servicer.GetTask)), request_deserializer=None,
        response_serializer=_task_chunk_bytes)
    handlers["SubmitResult"] = grpc.stream_unary_rpc_method_handler(
        guard.unary("SubmitResult", servicer.SubmitResult), request_deserializer=None,
        response_serializer=pb.SubmitReply.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class FLKitService(pb_grpc.FLKitServicer):
    def __init__(self, service: JobService, shm: ShmExchange | None = None, stall_s: float = 300.0,
                 journal_dir: Path | None = None) -> None:
        self.service = service
        # Where streamed uploads journal what they fold (unlinked files): the server's workspace.
        self.journal_dir = journal_dir or Path(tempfile.gettempdir())
        self.shm = shm  # params by file for sites on this host (they ask with params_by_file)
        self.result_buffers = result_buffers(service.controller.model_bytes)
        self._buffers = threading.BoundedSemaphore(self.result_buffers)
        self._received = ReceiveBuffers(keep=self.result_buffers)
        # Results folded in while they arrive need a window buffer each, whatever the model's size.
        self._streams = threading.BoundedSemaphore(RESULT_BUFFERS)
        self._windows = Windows(keep=RESULT_BUFFERS)
        self.guard = _Guard()
        # Uploads that stop sending bytes give their receive buffer back after this long.
        self.stalls = StallWatch(stall_s)
        self._lock = threading.Lock()
        self._uploading: dict[str, int] = {}  # session -> the call uploading a result for it

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
        """``request_iterator`` yields serialised ResultChunk messages: a header, then payloads.

        Nothing after the header is read until the header has passed every check: the session
        (an unknown one is refused at once), the task id and params type, the metrics and meta
        JSON, and the declared payload size (at most about the global model's). Only then is the
        receive buffer taken, of the declared size."""
        first = next(request_iterator, None)
        try:
            chunk = None if first is None or is_payload(first) else pb.ResultChunk.FromString(first)
        except DecodeError:  # not a message of this protocol
            chunk = None
        if chunk is None or chunk.WhichOneof("kind") != "header":
            return _refused("result stream must start with a header message")
        header = chunk.header
        try:
            site = self.service.site_of(header.session_id)  # nothing more is read for an unknown session
        except ServiceError as exc:
            _abort(context, exc)
        try:
            self.service.check_result_header(header.task_id, header.params_type)
            metrics = json_to_dict(header.metrics_json, "metrics")
            meta = json_to_dict(header.meta_json, "meta")
        except ValidationError as exc:
            return _refused(str(exc))
        if header.released_files and self.shm is not None:
            self.shm.release(header.session_id, header.released_files)
        limit = self.service.max_result_bytes()
        if header.payload_size > limit:
            return _refused(f"payload of {header.payload_size} bytes is larger than any valid result "
                            f"({limit} bytes)")
        if header.params_file:
            return self._submit_file(header, metrics, meta, context)
        if not header.payload_size:
            return self._submit(header, metrics, meta, request_iterator, None, context)
        with self._lock:  # one upload per session at a time: a site cannot hold every buffer
            if header.session_id in self._uploading:
                return _refused(f"site {site} is already sending a result; one at a time")
            self._uploading[header.session_id] = id(context)
        try:
            streamed = self.service.begin_streamed(header.session_id, self._result(header, metrics, meta),
                                                   context.cancel)
            if isinstance(streamed, SubmitReply):
                return self._reply(streamed)
            if streamed is not None:
                with self._streams:  # a window buffer each
                    return self._submit_streamed(header, streamed, request_iterator, context)
            with self._buffers:  # a bounded number of model-sized buffers, whatever the number of sites
                buffer = self._received.take(header.payload_size)
                key = id(context)
                self.stalls.begin(key, f"result upload of site {site}", context.cancel)
                try:
                    return self._submit(header, metrics, meta, request_iterator, buffer, context)
                finally:  # the result was folded in (or refused): the buffer serves the next one
                    self.stalls.end(key)
                    self._received.give_back(buffer)
        finally:
            self._end_upload(header.session_id, context)

    @staticmethod
    def _result(header: pb.ResultHeader, metrics: dict[str, Any], meta: dict[str, Any]) -> Result:
        """The result the header describes, without its params (for ``begin_streamed``)."""
        return Result(task_id=header.task_id, params_type=header.params_type, params=None, metrics=metrics,
                      meta=meta)

    @staticmethod
    def _reply(reply: SubmitReply) -> pb.SubmitReply:
        if reply.accepted:
            return pb.SubmitReply(accepted=True, job_ended=reply.job_ended)
        return _refused(reply.error, reply.job_ended)

    def _payloads(self, header: pb.ResultHeader, request_iterator: Iterator[bytes],
                  context: grpc.ServicerContext) -> Iterator[memoryview]:
        """The payload bytes of a result stream, message by message. Raises UploadRefused when the
        stream breaks off (cancelled: it stalled, or the site went away) or is not made of payload
        messages; every ALIVE_EVERY_CHUNKS messages the site counts as seen."""
        frames = iter(request_iterator)
        chunks = 0
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except grpc.RpcError:  # cancelled: it stalled (StallWatch), or the site went away
                raise UploadRefused("result upload ended before all its bytes came") from None
            chunks += 1
            self.stalls.progress(id(context))
            if chunks % ALIVE_EVERY_CHUNKS == 0:  # bytes arriving: the site is alive, whatever its heartbeat
                try:
                    self.service.site_of(header.session_id)
                except ServiceError as exc:  # the site failed or re-joined meanwhile
                    _abort(context, exc)
            if not is_payload(frame):
                raise UploadRefused("result stream: a message after the header is not a payload message")
            try:
                yield payload_of(frame)
            except ValidationError as exc:
                raise UploadRefused(str(exc)) from None

    def _submit(self, header: pb.ResultHeader, metrics: dict[str, Any], meta: dict[str, Any],
                request_iterator: Iterator[bytes], buffer: bytearray | None,
                context: grpc.ServicerContext) -> pb.SubmitReply:
        if buffer is None:
            buffer = bytearray()
        view = np.frombuffer(buffer, dtype=np.uint8)
        received = 0
        try:
            for payload in self._payloads(header, request_iterator, context):
                size = len(payload)
                if received + size > header.payload_size:
                    return _refused(f"result payload longer than its header says ({header.payload_size} bytes)")
                copy_into(view, received, payload)
                received += size
        except UploadRefused as exc:
            if str(exc).startswith("result upload ended"):
                return _refused(f"result upload ended after {received} of {header.payload_size} bytes")
            return _refused(str(exc))
        self._received_all(header.session_id, context)
        if received != header.payload_size:
            return _refused(f"result payload truncated: got {received} of {header.payload_size} bytes")
        del view
        return self._hand_over(header, metrics, meta, lambda: parse(buffer) if header.payload_size else None,
                               context)

    def _submit_streamed(self, header: pb.ResultHeader, streamed: StreamedResult, request_iterator: Iterator[bytes],
                         context: grpc.ServicerContext) -> pb.SubmitReply:
        """Fold the result in while its bytes arrive (flkit.server.streamed_upload), journaled to disk."""
        key = id(context)
        self.stalls.begin(key, f"result upload of site {streamed.site}", context.cancel)

        def feed(upload: StreamedUpload) -> None:
            try:
                for payload in self._payloads(header, request_iterator, context):
                    upload.feed(payload)
            except UploadRefused as exc:
                self._received_all(header.session_id, context)  # the site may send it again at once
                raise UploadRefused(f"{exc} (got {upload.received} of {header.payload_size} bytes)") from None
            # Every byte is in: folding the last window is the server's time, and the site may send
            # again (after its call timed out) while this one ends.
            self._received_all(header.session_id, context)
            upload.end()

        try:
            return self._fold_streamed(header, streamed, lambda: DiskJournal(self.journal_dir), feed)
        finally:
            self.stalls.end(key)

    def _fold_streamed(self, header: pb.ResultHeader, streamed: StreamedResult, journal: Callable[[], Journal],
                       feed: Callable[[StreamedUpload], None]) -> pb.SubmitReply:
        """Feed the result into its contribution (``feed``) through a window and ``journal()``, then
        count it. Whatever stops it after ``begin_streamed`` (the site's bad bytes, a broken upload,
        the round closing, a server error), what was folded is taken back out, the contribution is
        discarded and the JobService says what the site is told (``drop_streamed``)."""
        window = opened = upload = None
        try:
            window = self._windows.take()
            opened = journal()
            upload = StreamedUpload(streamed.site, streamed.expected, streamed.contribution, header.payload_size,
                                    window, opened)
            feed(upload)
            self.service.end_streamed(streamed)
            return pb.SubmitReply(accepted=True)
        except BaseException as exc:  # noqa: BLE001 - whatever stopped it, the folded pieces come back out
            taken_back = True
            if upload is not None:
                try:
                    upload.take_back()
                except BaseException as undo:  # noqa: BLE001
                    log.error("site %s: taking its partial result back out failed (%s: %s); the round's "
                              "aggregate is not whole", streamed.site, type(undo).__name__, undo)
                    taken_back = False
            streamed.contribution.discard(taken_back)
            # (a refusal already answered: the ServiceError it answered with is the problem)
            problem = exc.args[0] if isinstance(exc, _Aborted) and exc.args else exc
            reply = self.service.drop_streamed(streamed, problem)
            if isinstance(exc, _Aborted) or not isinstance(exc, Exception):
                raise
            return self._reply(reply)
        finally:
            if opened is not None:
                opened.close()
            if window is not None:
                self._windows.give_back(window)

    def _received_all(self, session_id: str, context: grpc.ServicerContext) -> None:
        """Every byte of an upload is in: parsing and folding it are the server's time, not a stall,
        and the site may start another upload (e.g. the same result again, after its call timed out)."""
        self.stalls.end(id(context))
        self._end_upload(session_id, context)

    def _end_upload(self, session_id: str, context: grpc.ServicerContext) -> None:
        with self._lock:
            if self._uploading.get(session_id) == id(context):
                del self._uploading[session_id]

    def _submit_file(self, header: pb.ResultHeader, metrics: dict[str, Any], meta: dict[str, Any],
                     context: grpc.ServicerContext) -> pb.SubmitReply:
        """A result whose params a site on this host wrote to the shared-memory folder: folded in
        window by window if the round's aggregator takes pieces (the file is read, never mapped, and
        is its own journal), else mapped and handed over whole."""
        shm = self.shm
        if shm is None:
            return self._hand_over(header, metrics, meta, _no_shm, context)
        streamed = self.service.begin_streamed(header.session_id, self._result(header, metrics, meta))
        if isinstance(streamed, SubmitReply):
            return self._reply(streamed)
        if streamed is None:
            return self._hand_over(header, metrics, meta, lambda: shm.take_result(
                header.session_id, header.task_id, header.params_file, header.payload_size), context)

        def source() -> FileSource:
            return FileSource(shm.result_path(header.session_id, header.task_id, header.params_file),
                              header.payload_size)

        def feed(upload: StreamedUpload) -> None:
            upload.read_file()
            upload.end()

        with self._streams:
            return self._fold_streamed(header, streamed, source, feed)

    def _hand_over(self, header: pb.ResultHeader, metrics: dict[str, Any], meta: dict[str, Any],
                   read_params: Callable[[], Params | None], context: grpc.ServicerContext) -> pb.SubmitReply:
        """The result's params (``read_params``) to the JobService. Params that cannot be read are
        the site's failure, as a bad result is."""
        try:
            params = read_params()
        except ValidationError as exc:
            try:
                self.service.refuse_result(header.session_id, str(exc))
            except ServiceError as gone:
                _abort(context, gone)
            return _refused(str(exc))
        result = Result(task_id=header.task_id, params_type=header.params_type, params=params, metrics=metrics,
                        meta=meta)
        try:
            reply = self.service.submit(header.session_id, result)
        except ServiceError as exc:
            _abort(context, exc)
        if reply.accepted:
            return pb.SubmitReply(accepted=True, job_ended=reply.job_ended)
        return _refused(reply.error, reply.job_ended)

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

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        """An admin's view of the job (the interceptor lets only admin certificates call it)."""
        _require_admin(context)
        return pb.StatusReply(status_json=json.dumps(self.service.status(min(request.last_rounds, 1000))))

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.Ack:
        """An admin ends the job (the interceptor lets only admin certificates call it)."""
        _require_admin(context)
        self.service.abort(request.reason[:500] or "aborted by an admin")
        return pb.Ack()
