"""The gRPC servicer: translates wire messages to registry/controller calls and back."""

from __future__ import annotations

import json
import logging

import grpc

from flkit.errors import ValidationError
from flkit.server.controller import Controller, JobEndedError
from flkit.server.sites import AccessError, JobEnd, SiteRegistry, Task
from flkit.server.tracking import TrackingHub
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.codec import iter_chunks, json_to_dict
from flkit.wire.grpc_options import MAX_TASK_WAIT_S, PROTOCOL_VERSION
from flkit.wire.tracking_records import check_records

log = logging.getLogger("flkit.server")


def _abort(context: grpc.ServicerContext, exc: AccessError) -> None:
    context.abort(getattr(grpc.StatusCode, exc.code), str(exc))


class FLKitService(pb_grpc.FLKitServicer):
    def __init__(self, registry: SiteRegistry, controller: Controller, tracking: TrackingHub | None = None) -> None:
        self.registry = registry
        self.controller = controller
        self.tracking = tracking

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if request.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} not supported (server speaks {PROTOCOL_VERSION})",
            )
        try:
            session_id = self.registry.join(request.site_name, request.job_id, request.token)
        except AccessError as exc:
            log.warning("refused join of site %r: %s", request.site_name, exc)
            _abort(context, exc)
        cfg = dict(self.registry.client_config, site_name=request.site_name,
                   client_tracking=self.controller.config.client_tracking_for(request.site_name))
        log.info("site %s joined", request.site_name)
        self.controller.emit({"type": "site_joined", "site": request.site_name})
        return pb.JoinReply(
            session_id=session_id,
            job_config_json=json.dumps(cfg),
            heartbeat_interval_s=self.controller.config.heartbeat_interval_s,
        )

    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext):
        wait = min(max(request.wait_s, 0.0), MAX_TASK_WAIT_S)
        try:
            outcome = self.registry.next_task(request.session_id, wait, header_only=request.header_only)
        except AccessError as exc:
            _abort(context, exc)
        if outcome is None:
            yield pb.TaskChunk(header=pb.TaskHeader(status=pb.NO_TASK_YET))
            return
        if isinstance(outcome, JobEnd):
            yield pb.TaskChunk(
                header=pb.TaskHeader(status=pb.JOB_FINISHED, end_reason=outcome.reason, job_failed=outcome.failed)
            )
            return
        task: Task = outcome
        yield pb.TaskChunk(
            header=pb.TaskHeader(
                status=pb.TASK_READY,
                task_id=task.task_id,
                task_name=task.name,
                current_round=task.round,
                total_rounds=task.total_rounds,
                params_type=task.params_type,
                meta_json=json.dumps(task.meta),
                payload_size=len(task.payload),
            )
        )
        if request.header_only:
            return
        for chunk in iter_chunks(task.payload):
            yield pb.TaskChunk(payload=chunk)

    def SubmitResult(self, request_iterator, context: grpc.ServicerContext) -> pb.SubmitReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "header":
            return pb.SubmitReply(accepted=False, error="result stream must start with a header")
        header = first.header
        limit = self.controller.max_result_bytes()
        if header.payload_size > limit:
            return pb.SubmitReply(
                accepted=False, error=f"payload of {header.payload_size} bytes is larger than any valid result"
            )
        chunks, received = [], 0
        for msg in request_iterator:
            if msg.WhichOneof("kind") != "payload":
                return pb.SubmitReply(accepted=False, error="unexpected second header in result stream")
            chunks.append(msg.payload)
            received += len(msg.payload)
            if received > header.payload_size:
                return pb.SubmitReply(accepted=False, error="result payload longer than its header says")
        if received != header.payload_size:
            return pb.SubmitReply(
                accepted=False, error=f"result payload truncated: got {received} of {header.payload_size} bytes"
            )
        payload = b"".join(chunks)
        del chunks
        try:
            metrics = json_to_dict(header.metrics_json, "metrics")
            meta = json_to_dict(header.meta_json, "meta")
            self.controller.submit(
                header.session_id,
                header.task_id,
                header.params_type,
                payload if header.payload_size else None,
                metrics,
                meta,
            )
        except AccessError as exc:
            _abort(context, exc)
        except JobEndedError as exc:
            return pb.SubmitReply(accepted=False, error=str(exc), job_ended=True)
        except ValidationError as exc:
            return pb.SubmitReply(accepted=False, error=str(exc))
        return pb.SubmitReply(accepted=True)

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        try:
            return pb.HeartbeatReply(job_running=self.registry.heartbeat(request.session_id))
        except AccessError as exc:
            _abort(context, exc)

    def ReportFailure(self, request: pb.FailureReport, context: grpc.ServicerContext) -> pb.Ack:
        try:
            self.registry.report_failure(
                request.site_name, request.job_id, request.token, request.session_id, request.reason
            )
        except AccessError as exc:
            _abort(context, exc)
        log.error("site %s failed: %s", request.site_name, (request.reason or "?").splitlines()[0])
        log.debug("site %s failure details: %s", request.site_name, request.reason)
        return pb.Ack()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.Ack:
        try:
            self.registry.leave(request.session_id, request.reason)
        except AccessError as exc:
            _abort(context, exc)
        return pb.Ack()

    def LogMetrics(self, request: pb.MetricsBatch, context: grpc.ServicerContext) -> pb.Ack:
        try:
            site = self.registry.site_of(request.session_id)
        except AccessError as exc:
            _abort(context, exc)
        try:
            records = check_records(request.records_json)
        except ValidationError as exc:
            log.warning("site %s: tracking records refused: %s", site, exc)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.tracking is not None and self.tracking.enabled:
            self.tracking.write(site, records)
        return pb.Ack()
