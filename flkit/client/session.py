"""Session: one site's conversation with the server, behind the Client API functions.

It joins lazily (on the first receive), keeps a heartbeat thread, re-joins when the
server forgot it, and turns every wait into a bounded one with a clear error.

Under torch.distributed this is rank 0's session: every task state it fetches is also
shared with the other ranks (``flkit.client.ranks``), whose ``FollowerSession`` mirrors it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from flkit.client import ranks
from flkit.client.records import RecordQueue
from flkit.client.settings import SiteSettings
from flkit.client.task_state import Phase, TaskState
from flkit.errors import CommunicationError, FLKitError, ResultRejectedError, ValidationError
from flkit.messages import (
    SUBMIT_MODEL,
    TRAIN,
    ErrorCode,
    JobEnd,
    JoinReply,
    Result,
    ServiceError,
    SubmitReply,
    Task,
    TaskOrEnd,
)
from flkit.model import FLModel, ParamsType
from flkit.transport import Transport, make_transport
from flkit.wire import meta_tensors
from flkit.wire.codec import encode_params, plain_meta, plain_metrics, to_cpu_params

# A next-task call waits at most this long at the server; the site then asks again.
MAX_TASK_WAIT_S = 30.0

log = logging.getLogger("flkit.client")

T = TypeVar("T")


def task_model(task: Task, settings: SiteSettings) -> FLModel:
    """The FLModel a script receives for a task (on rank 0 and on every other rank alike)."""
    meta = dict(task.meta, job_id=settings.job_id, site_name=settings.site_name)
    params: Any
    params, groups = meta_tensors.unpack(task.params)
    if params is not None and settings.framework == "numpy":
        params = _as_numpy(params)
    for key, tensors in groups.items():  # e.g. SCAFFOLD's global control variate
        meta[key] = _as_numpy(tensors) if settings.framework == "numpy" else tensors
    return FLModel(params_type=task.params_type or None, params=params, current_round=task.round,
                   total_rounds=task.total_rounds, meta=meta)


def _as_numpy(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """framework=NUMPY: the script gets numpy arrays (views of the received tensors, no copy)."""
    out = {}
    for name, tensor in params.items():
        try:
            out[name] = tensor.numpy()
        except TypeError as exc:  # e.g. bfloat16 has no numpy dtype
            raise ValidationError(f"tensor '{name}' ({tensor.dtype}) cannot be given to a framework=NUMPY script: "
                                  f"{exc}") from None
    return out


class Session:
    """A site's connection to its job. Create through ``flkit.init()``."""

    def __init__(self, settings: SiteSettings, transport: Transport | None = None,
                 distributed: bool = False, handed: JoinReply | None = None, first_task: Task | None = None) -> None:
        """``distributed``: this is rank 0 of several; share every state with the other ranks.

        ``handed``: a session the simulator's worker pool opened for this site, with ``transport``
        (the worker's, shared by the site-tasks it runs). It is used as it is: no join, no
        heartbeat (the pool vouches for the site), and closing it neither leaves the job nor
        reports a failure (the pool reports the site-task's outcome) nor closes the transport.
        ``first_task``: the site's task, which the pool already took for it."""
        self.settings = settings
        self.transport = transport or make_transport(settings)
        self.handed = handed is not None
        self.distributed = distributed
        self._link: ranks.RankLink | None = None
        self._warned_no_group = False
        self.state = TaskState()  # the one record of this site's task (others observe it)
        self._end_shared = False  # the other ranks were told the job ended
        self.job_config: dict[str, Any] = {}
        self._session_id: str | None = None
        self._lock = threading.RLock()
        self._diff_base: dict[str, torch.Tensor] | None = None  # the received model, for a DIFF
        self._closed = False
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._heartbeat_interval = 5.0
        self.records = RecordQueue(settings.site_name, settings.workspace, settings.job_id)
        if handed is not None:
            self._session_id, self.job_config = handed.session_id, handed.job_config
            self._heartbeat_interval = 0.0
            self.records.configure(handed.job_config, self._send_records)
            if first_task is not None:
                self.state.fetched(first_task)

    # -- connection ---------------------------------------------------------

    def _retry(self, what: str, fn: Callable[[float], T], deadline: float | None) -> T:
        """Call fn(per_call_timeout) until it succeeds, the server stays unreachable for
        connect_timeout_s, or ``deadline`` passes."""
        give_up = time.monotonic() + self.settings.connect_timeout_s
        if deadline is not None:
            give_up = min(give_up, deadline)
        delay = 0.05
        while True:
            left = give_up - time.monotonic()
            try:
                return fn(max(left, 0.05))
            except ServiceError as exc:
                if exc.code != ErrorCode.UNAVAILABLE:
                    raise
                left = give_up - time.monotonic()
                if left <= 0:
                    waited = self.settings.connect_timeout_s if deadline is None else None
                    limit = f"{waited:g} s" if waited is not None else "the given timeout"
                    raise CommunicationError(
                        f"site {self.settings.site_name}: could not {what}: the flkit server at "
                        f"{self.settings.server} did not answer within {limit} ({exc})"
                    ) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    def connect(self, timeout: float | None = None) -> None:
        """Join the job now instead of at the first receive (the round starts once sites joined)."""
        self._join(None if timeout is None else time.monotonic() + timeout)

    def _join(self, deadline: float | None) -> str:
        with self._lock:
            if self._session_id is not None:
                return self._session_id
            if self.handed:  # the pool's session is gone (the site failed): this site-task ends here
                raise FLKitError(f"site {self.settings.site_name}: the server closed this site's session "
                                 "(it failed, e.g. a result was refused); the site takes no further part")
            s = self.settings
            reply = self._retry(
                "join the job", lambda t: self.transport.join(s.site_name, s.job_id, s.token, t), deadline
            )
            sid = reply.session_id
            self._session_id, self.job_config = sid, reply.job_config
            self._heartbeat_interval = reply.heartbeat_interval_s
            self.records.configure(reply.job_config, self._send_records)
            log.info("site %s joined job %s at %s", s.site_name, s.job_id, s.server)
            # 0: the server needs no heartbeat from this session (it runs in the server's process).
            if self._heartbeat_thread is None and self._heartbeat_interval > 0:
                self._heartbeat_thread = threading.Thread(
                    target=self._beat, name=f"flkit-heartbeat-{s.site_name}", daemon=True
                )
                self._heartbeat_thread.start()
            return sid

    def _beat(self) -> None:
        while not self._heartbeat_stop.wait(self._heartbeat_interval):
            sid = self._session_id
            if sid is None:
                continue
            try:
                running = self.transport.heartbeat(sid, timeout=max(self._heartbeat_interval, 1.0))
                if not running:
                    # The job ended while this site was busy: the next send()/is_running() returns at once.
                    self.state.end("the job ended while this site was working")
            except ServiceError as exc:
                if exc.code == ErrorCode.UNKNOWN_SESSION:  # the next call joins again
                    with self._lock:
                        if self._session_id == sid:
                            self._session_id = None
                else:
                    log.debug("heartbeat failed: %s", exc)

    # -- tracking records -----------------------------------------------------

    def queue_record(self, record: dict[str, Any]) -> None:
        """A checked tracking record for the job's receivers (sent in batches, see RecordQueue)."""
        self.records.add(record)

    def _send_records(self, records_json: str, timeout: float | None = None) -> None:
        sid = self._session_id
        if sid is None:
            raise CommunicationError("not joined (yet, or again)")
        try:
            self.transport.log_metrics(sid, records_json, timeout or self.settings.transfer_timeout_s)
        except ServiceError as exc:
            if exc.code == ErrorCode.UNKNOWN_SESSION:  # the server forgot this site: the records wait
                with self._lock:
                    if self._session_id == sid:
                        self._session_id = None
            if exc.code in (ErrorCode.UNKNOWN_SESSION, ErrorCode.UNAVAILABLE):
                raise CommunicationError(str(exc)) from None
            raise

    def flush_records(self, timeout: float | None = None) -> None:
        """Send the queued tracking records to the server now (best effort)."""
        self.records.send(lambda text: self._send_records(text, timeout))

    # -- the Client API -----------------------------------------------------

    def _fetch(self, timeout: float | None) -> Task | None:
        """The next task from the server (None: job ended or timeout), shared with the other ranks.

        With other ranks, the wait is cut into pieces shorter than their process group's timeout,
        each ended by a WAITING state, so a site may wait any number of rounds for a task."""
        link = self._rank_link()
        keepalive = None if link is None else self._keepalive_s(link)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            piece = left if keepalive is None else (keepalive if left is None else min(left, keepalive))
            try:
                msg = self._fetch_from_server(piece)
            except FLKitError as exc:
                self._share(ranks.ERROR, {"error": str(exc)})
                raise
            if msg is not None or self.state.ended or keepalive is None \
                    or (deadline is not None and time.monotonic() >= deadline):
                break
            self._share(ranks.WAITING, {})
        if msg is not None:
            if self._rank_link() is not None:
                self._share(ranks.TASK, {
                    "task_id": msg.task_id, "task_name": msg.name, "current_round": msg.round,
                    "total_rounds": msg.total_rounds, "params_type": msg.params_type, "meta": msg.meta,
                }, None if msg.params is None else encode_params(msg.params))
        elif self.state.ended:
            self._share_end()
        else:
            self._share(ranks.NO_TASK, {})
        return msg

    # -- sharing with the other ranks (torch.distributed) --------------------

    def _keepalive_s(self, link: ranks.RankLink) -> float:
        """How long rank 0 may wait before telling the other ranks it still waits."""
        every = self.settings.rank_keepalive_s
        group_timeout = link.timeout_s()
        if group_timeout is not None:
            every = min(every, group_timeout / 3)
        return max(0.05, every)

    def _rank_link(self) -> ranks.RankLink | None:
        if not self.distributed:
            return None
        if self._link is None:
            self._link = ranks.RankLink.current()
            if self._link is None and not self._warned_no_group:
                self._warned_no_group = True
                log.warning("site %s: WORLD_SIZE > 1 but no torch.distributed process group is initialised; "
                            "rank 0 runs alone and the other ranks get nothing", self.settings.site_name)
        return self._link

    def share_config(self) -> None:
        """Join and tell the other ranks the job settings (once; every rank does its half)."""
        link = self._rank_link()
        if link is None or link.shared_config:
            return
        try:
            self.connect()
        except FLKitError as exc:
            link.send(ranks.ERROR, {"error": str(exc)})
            link.shared_config = True
            raise
        link.send(ranks.CONFIG, {"job_config": self.job_config})
        link.shared_config = True

    def _share_end(self) -> None:
        """Tell the other ranks the job ended, once (each state is a collective every rank joins)."""
        if self._end_shared:
            return
        self._end_shared = True
        self._share(ranks.END, {"end_reason": self.state.end_reason, "job_failed": self.state.job_failed})

    def _share(self, kind: str, header: dict[str, Any], payload: bytes | None = None) -> None:
        link = self._rank_link()
        if link is None:
            return
        if not link.shared_config:
            if kind == ranks.ERROR:
                link.shared_config = True  # the followers waiting for the config get the error instead
            else:
                link.send(ranks.CONFIG, {"job_config": self.job_config})
                link.shared_config = True
        link.send(kind, header, payload)

    def peek_task(self, timeout: float | None = None) -> Task | None:
        """The header of the task waiting for this site (no params, nothing consumed); None when
        the job ended or on timeout. For a launcher that starts one process per task."""
        return self._fetch_from_server(timeout, header_only=True)

    def _fetch_from_server(self, timeout: float | None, header_only: bool = False) -> Task | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            try:
                sid = self._join(deadline)
            except ServiceError as exc:
                if exc.code != ErrorCode.JOB_ENDED:
                    raise
                self.state.end(str(exc))
                return None
            wait = MAX_TASK_WAIT_S if left is None else min(MAX_TASK_WAIT_S, left)

            def ask(_: float, sid: str = sid, wait: float = wait) -> TaskOrEnd:
                return self.transport.get_task(sid, wait, timeout=wait + self.settings.transfer_timeout_s,
                                               header_only=header_only)

            try:
                msg = self._retry("receive a task", ask, deadline)
            except ServiceError as exc:
                if exc.code != ErrorCode.UNKNOWN_SESSION:
                    raise
                with self._lock:  # the server restarted or forgot this site: join again
                    self._session_id = None
                continue
            if isinstance(msg, Task):
                return msg
            if isinstance(msg, JobEnd):
                self.state.end(msg.reason, msg.failed)
                log.info("site %s: job ended: %s", self.settings.site_name, msg.reason)
                return None

    def receive(self, timeout: float | None = None) -> FLModel | None:
        """The next task's model; None if the job ended or nothing came within ``timeout`` seconds.

        Until the task is answered with ``send``, receive() returns the same task again.
        """
        if timeout is None:
            timeout = self.settings.receive_timeout_s
        state = self.state
        if state.phase in (Phase.HELD, Phase.ANSWERED) and state.task is not None:
            return task_model(state.task, self.settings)
        if self._launch_done():
            return None
        if state.pending is None and not state.ended:
            fetched = self._fetch(timeout)
            if fetched is not None:
                state.fetched(fetched)
        task = state.take()
        if task is None:
            if state.ended:
                self._share_end()
            return None
        self._diff_base = None
        if task.name == TRAIN and task.params is not None and self._sends_diff():
            # The script may change the received tensors in place (numpy views, `p += ...`): a DIFF
            # must be taken against the model as it arrived, so keep one copy of it.
            received, _ = meta_tensors.unpack(task.params)  # the model alone, not tensors sent in meta
            self._diff_base = {k: v.clone() for k, v in (received or {}).items()}
        return task_model(task, self.settings)

    def _sends_diff(self) -> bool:
        transfer = self.settings.params_transfer_type or self.job_config.get("params_transfer_type", "FULL")
        return transfer == ParamsType.DIFF.value

    def is_running(self) -> bool:
        """True while the job has work for this site; waits for the next task to find out."""
        state = self.state
        if state.ended or self._launch_done():
            self._share_end()  # e.g. the heartbeat learned of the end: the other ranks wait for it
            return False
        state.move_on()  # a task kept by send(clear_cache=False) is done with; the loop moves on
        if state.phase == Phase.HELD and self.distributed:
            held = state.task
            raise FLKitError(
                f"site {self.settings.site_name}: is_running() was called on rank 0 before the result of task "
                f"'{held.name if held else '?'}' (round {held.round if held else '?'}) was sent; under "
                "torch.distributed rank 0 must call send() once per task, or the ranks fall out of step"
            )
        if state.phase == Phase.HELD or state.pending is not None:
            return True
        fetched = self._fetch(self.settings.receive_timeout_s)
        if fetched is not None:
            state.fetched(fetched)
        return not state.ended

    def _launch_done(self) -> bool:
        """With max_tasks (one launch per task), True once this process has done its share;
        like the end of the job, the other ranks are told, so their loops end too."""
        state = self.state
        if not self.settings.max_tasks or state.answered < self.settings.max_tasks:
            return False
        if not state.ended:
            state.end(f"this launch answered its {state.answered} task(s)")
            self._share_end()
        return True

    def send(self, model: FLModel, clear_cache: bool = True) -> None:
        """Answer the current task. Raises ResultRejectedError with the server's reason."""
        if not isinstance(model, FLModel):
            raise TypeError(f"send() takes an FLModel, got {type(model).__name__}")
        state = self.state
        if state.ended:
            log.warning("site %s: the job has ended (%s); result not sent", self.settings.site_name,
                        state.end_reason)
            return
        task = state.task if state.phase in (Phase.HELD, Phase.ANSWERED) else None
        if task is None:
            raise FLKitError("send() without a task: call receive() first")
        meta, groups = meta_tensors.split_meta(model.meta)  # tensors in meta travel beside the params
        result = Result(task.task_id, metrics=plain_metrics(model.metrics), meta=plain_meta(meta))
        if task.name == TRAIN:
            if model.params is None:
                raise ValidationError(f"task 'train' of round {task.round} must be answered with params")
            params = to_cpu_params(model.params)
            sent_type = model.params_type or ParamsType.FULL
            result.params_type = sent_type.value
            if self._sends_diff() and sent_type == ParamsType.FULL:
                params = self._diff(params, self._diff_base or {})
                result.params_type = ParamsType.DIFF.value
            result.params = meta_tensors.pack(params, groups) if groups else params
        elif task.name == SUBMIT_MODEL and model.params is not None:
            # Cross-site evaluation asks for the site's own model: always the whole model.
            if model.params_type == ParamsType.DIFF:
                raise ValidationError("task 'submit_model' must be answered with FULL params, not a DIFF")
            result.params_type, result.params = ParamsType.FULL.value, to_cpu_params(model.params)
        sid = self._join(None)
        self.flush_records()  # the round's records reach the server before the round can close
        try:
            reply = self._submit(sid, result)
        except ServiceError as exc:
            if exc.code != ErrorCode.UNKNOWN_SESSION or self.handed:
                raise
            again = self._send_again(task, result)
            if again is None:  # not needed any more: the loop moves on to the server's next task
                result.params = None
                state.answer(keep=False)
                return
            reply = again
        result.params = None
        accepted, error, job_ended = reply.accepted, reply.error, reply.job_ended
        if accepted:
            state.answer(keep=not clear_cache)
            self._note_answered(task.task_id)
            self._free_memory()
        else:
            state.drop()
        if job_ended:
            state.end(error)
            log.warning("site %s: result not used: %s", self.settings.site_name, error)
            return
        if not accepted:
            raise ResultRejectedError(error)

    def _note_answered(self, task_id: str) -> None:
        if self.settings.answered_file:
            try:
                Path(self.settings.answered_file).write_text(task_id)
            except OSError as exc:
                log.warning("site %s: cannot note the answered task in %s: %s", self.settings.site_name,
                            self.settings.answered_file, exc)

    def _submit(self, sid: str, result: Result) -> SubmitReply:
        return self._retry("send the result",
                           lambda t: self.transport.submit(sid, result, timeout=self.settings.transfer_timeout_s),
                           None)

    def _send_again(self, task: Task, result: Result) -> SubmitReply | None:
        """The server no longer knows this site's session (it restarted, e.g. ``flkit server
        --resume``, or it dropped the site meanwhile). Join again and look at the task the server
        hands out: the same task (task ids are the same in every run of a job) gets this result.
        Another task means the server no longer waits for this result: None (not used, and not the
        script's error; the new task waits for ``receive``). The wait is bounded by
        connect_timeout_s (and receive_timeout_s, if shorter)."""
        with self._lock:
            self._session_id = None
        s = self.settings
        log.info("site %s: the server no longer knows this session (restarted?); joining again to send the "
                 "result of task %s", s.site_name, task.task_id)
        wait = s.connect_timeout_s if s.receive_timeout_s is None else min(s.connect_timeout_s, s.receive_timeout_s)
        again = self._fetch_from_server(wait, header_only=True)
        if again is None:
            if self.state.ended:
                return SubmitReply(False, self.state.end_reason or "the job ended", job_ended=True)
            log.warning("site %s: the result of task %s (round %d) was not used: after joining again, the server "
                        "handed out no task within %g s", s.site_name, task.task_id, task.round, wait)
            return None
        if again.task_id == task.task_id:
            return self._submit(self._join(None), result)
        log.warning("site %s: the result of task %s (round %d) was not used: the server now waits for task %s "
                    "(round %d)", s.site_name, task.task_id, task.round, again.task_id, again.round)
        return None

    def _free_memory(self) -> None:
        """ScriptRunner's memory_gc_rounds and cuda_empty_cache, after an answered task."""
        n = self.settings.memory_gc_rounds
        if n > 0 and self.state.answered % n == 0:
            gc.collect()
        if self.settings.cuda_empty_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _diff(params: dict[str, torch.Tensor], received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = sorted(set(received) - set(params))
        if missing:
            raise ValidationError(f"cannot compute a DIFF: params lack {missing[:5]} of the received model")
        return {k: v - received[k] if k in received else v for k, v in params.items()}

    @property
    def task_name(self) -> str:
        return self.state.last_task_name

    # -- shutdown -----------------------------------------------------------

    @property
    def holds_unanswered_task(self) -> bool:
        return self.state.holds_unanswered_task

    def close(self, failure: str | None = None, silent: bool = False) -> None:
        """Stop the heartbeat and tell the server we are done (or failed, with the reason).

        ``silent``: tell the server nothing; the process that launched this script reports
        the outcome (its exit status and stderr say more than this process can at exit).
        """
        if self._closed:
            return
        self._closed = True
        self._heartbeat_stop.set()
        s = self.settings
        if self.handed:  # the pool's session: it stays open for the site's next task
            self.flush_records(timeout=5.0)
            self.records.close()
            return
        if silent:
            self.flush_records(timeout=5.0)  # what the script logged still counts
            self.records.close()
            self.transport.close()
            return
        if failure is None and self._session_id is None and not self.state.ended:
            failure = "its script ended before receiving any task (did it call flkit.receive()?)"
        self.flush_records()
        self.records.close()
        try:
            if failure is not None:
                self.transport.report_failure(s.site_name, s.job_id, s.token, self._session_id or "", failure,
                                              timeout=5.0)
            elif self._session_id is not None:
                self.transport.leave(self._session_id, "", timeout=5.0)
        except FLKitError as exc:
            log.debug("site %s: could not tell the server we are leaving: %s", s.site_name, exc)
        finally:
            self.transport.close()
