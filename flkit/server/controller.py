"""The round loop: hand out tasks, fold results in as they arrive, select, persist.

One Controller runs one job. Its ``run`` method is the whole workflow; the gRPC
service calls ``submit`` from its own threads. Both meet in the SiteRegistry's
condition variable.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flkit.errors import ValidationError
from flkit.model import ParamsType
from flkit.server.config import WorkflowConfig
from flkit.server.persistor import Persistor
from flkit.server.selector import BestModelSelector
from flkit.server.sites import JobEnd, SiteRegistry, SiteStatus, Task
from flkit.server.strategy import SiteResult, Strategy
from flkit.server.validation import check_metrics, check_params, weight_of
from flkit.wire.codec import Params, decode_params, encode_params

log = logging.getLogger("flkit.server")

TRAIN = "train"
VALIDATE = "validate"

Event = dict[str, Any]


class JobEndedError(Exception):
    """A result came after the job ended; the site is told to stop, not blamed."""


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else "unknown reason"


@dataclass
class RoundRecord:
    round: int
    task: str
    sites: list[str]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    score: float | None = None
    best: bool = False
    seconds: float = 0.0


class Controller:
    """Runs FedAvg-style rounds over the sites in ``registry`` with a pluggable Strategy."""

    def __init__(
        self,
        config: WorkflowConfig,
        registry: SiteRegistry,
        strategy: Strategy,
        persistor: Persistor,
        initial_params: Params,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.strategy = strategy
        self.persistor = persistor
        self.selector = BestModelSelector(config.key_metric, config.negate_key_metric)
        self.global_params = initial_params
        self.history: list[RoundRecord] = []
        self._on_event = on_event
        self._task: Task | None = None
        self._record: RoundRecord | None = None
        # The global model encoded once per round: saved to disk and sent to every site.
        self._global_blob: bytes | None = None

    # -- events -------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken progress printer must not break the job
                log.exception("event listener failed")

    def site_failed(self, site: str, reason: str) -> None:
        log.warning("site %s failed: %s", site, reason)
        self.emit({"type": "site_failed", "site": site, "reason": reason})

    # -- the workflow -------------------------------------------------------

    def run(self) -> JobEnd:
        """Run the whole job; never raises, the outcome is returned and published."""
        try:
            outcome = self._run()
        except Exception as exc:
            log.exception("controller crashed")
            outcome = JobEnd(failed=True, reason=f"server error: {type(exc).__name__}: {exc}")
        self.registry.finish(outcome.failed, outcome.reason)
        self._save_state(outcome)
        self.emit({"type": "job_finished", "failed": outcome.failed, "reason": outcome.reason})
        return outcome

    def _run(self) -> JobEnd:
        end = self._wait_for_sites()
        if end is not None:
            return end
        for round_num in range(self.config.num_rounds):
            end = self._run_round(round_num, TRAIN)
            if end is not None:
                return end
        if self.config.final_validation:
            end = self._run_round(self.config.num_rounds, VALIDATE)
            if end is not None:
                return end
        best = self.selector.best
        best_txt = f"; best {self.config.key_metric}={best.value:.4g} in round {best.round}" if best else ""
        return JobEnd(failed=False, reason=f"completed {self.config.num_rounds} round(s){best_txt}")

    def _failures_locked(self) -> str:
        failed = {s.name: s.failure for s in self.registry.sites.values() if s.status == SiteStatus.FAILED}
        return "; ".join(f"{name}: {_first_line(why)}" for name, why in failed.items())

    def _wait_for_sites(self) -> JobEnd | None:
        cfg, reg = self.config, self.registry
        deadline = time.monotonic() + cfg.join_timeout_s
        with reg.cond:
            while True:
                if reg.end is not None:
                    return reg.end
                reg.reap_dead_locked()
                joined = reg.active_sites_locked()
                waiting = [s.name for s in reg.sites.values() if s.status == SiteStatus.EXPECTED]
                if not waiting or (time.monotonic() >= deadline and len(joined) >= cfg.min_clients):
                    break
                if len(joined) + len(waiting) < cfg.min_clients:
                    return JobEnd(True, f"fewer than min_clients={cfg.min_clients} sites can take part: "
                                        f"{self._failures_locked()}")
                if time.monotonic() >= deadline:
                    return JobEnd(True, f"only {len(joined)} of {len(reg.sites)} sites joined within "
                                        f"{cfg.join_timeout_s:g} s (min_clients={cfg.min_clients}; "
                                        f"missing: {', '.join(waiting)})")
                reg.cond.wait(min(1.0, max(0.01, deadline - time.monotonic())))
        return None

    def _run_round(self, round_num: int, task_name: str) -> JobEnd | None:
        cfg, reg = self.config, self.registry
        started = time.monotonic()
        payload = self._global_blob or encode_params(self.global_params, {"round": "initial"})
        with reg.cond:
            reg.reap_dead_locked()
            sites = reg.active_sites_locked()
            if len(sites) < cfg.min_clients:
                return JobEnd(True, f"round {round_num}: only {len(sites)} site(s) available, "
                                    f"min_clients={cfg.min_clients} ({self._failures_locked() or 'sites left'})")
            task = Task(
                task_id=secrets.token_hex(8),
                name=task_name,
                round=round_num,
                total_rounds=cfg.num_rounds,
                params_type=ParamsType.FULL.value,
                payload=payload,
            )
            if task_name == TRAIN:
                self.strategy.start_round(round_num, self.global_params)
            self._task = task
            self._record = RoundRecord(round=round_num, task=task_name, sites=list(sites))
            reg.assign_locked(task, sites)
        del payload
        self.emit({"type": "round_started", "round": round_num, "task": task_name, "sites": sites,
                   "total_rounds": cfg.num_rounds})

        end = self._collect(task, sites, started)
        record = self._record
        with reg.cond:
            self._task = None
            self._record = None
        if end is not None:
            return end

        new_global = self.strategy.finish_round() if task_name == TRAIN else None
        score = self.selector.round_score(round_num, record.metrics)
        record.score = None if score is None else score.value
        record.best = self.selector.offer(score)
        if record.best:
            self.persistor.save_best(self.global_params, round_num, cfg.key_metric, score.value)
        if new_global is not None:
            self.global_params = new_global
            self._global_blob = encode_params(new_global, {"round": round_num})
            self.persistor.save_global(self._global_blob)
        record.seconds = time.monotonic() - started
        self.history.append(record)
        self._save_state(None)
        self.emit({"type": "round_finished", "round": round_num, "task": task_name, "record": record,
                   "key_metric": cfg.key_metric})
        return None

    def _collect(self, task: Task, sites: list[str], started: float) -> JobEnd | None:
        """Wait until every site answered or failed; fail fast when min_clients is out of reach."""
        cfg, reg = self.config, self.registry
        with reg.cond:
            while True:
                if reg.end is not None:
                    return reg.end
                reg.reap_dead_locked()
                states = [reg.sites[s] for s in sites]
                pending = [s for s in states if s.task is task and s.task_outcome is None]
                done = [s for s in states if s.task is task and s.task_outcome == "done"]
                for s in states:
                    if s.task is task and s.task_outcome not in (None, "done"):
                        self._record.failed[s.name] = s.task_outcome
                if len(done) + len(pending) < cfg.min_clients:
                    why = "; ".join(f"{k}: {_first_line(v)}" for k, v in self._record.failed.items())
                    return JobEnd(True, f"round {task.round}: fewer than min_clients={cfg.min_clients} sites "
                                        f"can answer ({why})")
                if not pending:
                    return None
                wait = 1.0
                if cfg.round_timeout_s is not None:
                    left = started + cfg.round_timeout_s - time.monotonic()
                    if left <= 0:
                        for s in pending:
                            s.task_outcome = f"no answer within round_timeout_s={cfg.round_timeout_s:g}"
                        continue
                    wait = min(wait, left)
                reg.cond.wait(wait)

    # -- results from the gRPC service --------------------------------------

    def max_result_bytes(self) -> int:
        """Upper bound for a valid result payload: about the size of the global model."""
        task = self._task
        return (0 if task is None else 2 * len(task.payload)) + (1 << 20)

    def submit(self, session_id: str, task_id: str, params_type: str, payload: bytes | None,
               metrics: dict[str, Any], meta: dict[str, Any]) -> None:
        """Validate and fold in one result. Raises ValidationError naming the site and the tensor."""
        reg = self.registry
        with reg.cond:
            if reg.end is not None:
                raise JobEndedError(f"job {reg.job_id} has ended: {reg.end.reason}")
            state = reg.touch_locked(session_id)
            site = state.name
            task = self._task
            if task is None or state.task is not task or task.task_id != task_id or state.task_outcome is not None:
                raise ValidationError(f"site {site}: result for a task that is no longer open (task {task_id})")
            expected = self.global_params
        try:
            metrics = check_metrics(site, metrics)
            result = None
            if task.name == TRAIN:
                if payload is None:
                    raise ValidationError(f"site {site}: a train task must be answered with params")
                kind = ParamsType(params_type) if params_type else ParamsType.FULL
                params = decode_params(payload)
                check_params(site, params, expected)
                result = SiteResult(site, params, kind, weight_of(site, meta), metrics)
        except ValidationError as exc:
            log.error("rejected result: %s", exc)
            reg.fail_site(site, f"result rejected: {exc}")
            raise
        with reg.cond:
            if reg.end is not None:
                raise JobEndedError(f"job {reg.job_id} has ended: {reg.end.reason}")
            if self._task is not task or state.task_outcome is not None:
                raise ValidationError(f"site {site}: result arrived after its task was closed")
            if result is not None:
                self.strategy.add_result(result)
            self._record.metrics[site] = metrics
            state.task_outcome = "done"
            reg.cond.notify_all()
        self.emit({"type": "result", "round": task.round, "site": site, "metrics": metrics})

    # -- state --------------------------------------------------------------

    def _save_state(self, outcome: JobEnd | None) -> None:
        best = self.selector.best
        state = {
            "job_id": self.registry.job_id,
            "completed_rounds": sum(1 for r in self.history if r.task == TRAIN),
            "num_rounds": self.config.num_rounds,
            "key_metric": self.config.key_metric,
            "best": None if best is None else {"round": best.round, "score": best.value},
            "history": [r.__dict__ for r in self.history],
            "status": "running" if outcome is None else ("failed" if outcome.failed else "completed"),
            "reason": None if outcome is None else outcome.reason,
        }
        self.persistor.save_state(state)
