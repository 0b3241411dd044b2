"""The round loop: hand out tasks, fold results in as they arrive, select, persist.

One Controller runs one job. Its ``run`` method is the whole workflow; the gRPC
service calls ``submit`` from its own threads. Both meet in the SiteRegistry's
condition variable.

Every task goes through one path (``_dispatch``): assign it to some sites, collect their
answers with a deadline, and hand each accepted answer to the task's own handler. Training
rounds, the optional final validation, cross-site evaluation and an evaluate-only job's one
evaluation (workflow mode "evaluate") differ only in the task, the sites, the handler and how
many answers they need.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flkit import shared_model
from flkit.errors import ValidationError
from flkit.messages import SUBMIT_MODEL, TRAIN, VALIDATE, JobEnd, Result, Task
from flkit.model import MetaKey, ParamsType
from flkit.server.config import EVALUATE, WorkflowConfig, parse_stop_cond
from flkit.server.cross_site import CrossSiteEvaluation
from flkit.server.evaluation import absent_reason, evaluation_report, write_evaluation
from flkit.server.listing import failure_list, first_line, site_list
from flkit.server.persistor import Persistor, SavedRun, load_params
from flkit.server.preflight import ResultCheck, examine
from flkit.server.selector import BestModelSelector, Score
from flkit.server.sites import ACCEPTING, SiteRegistry, SiteStatus
from flkit.server.validation import (
    check_meta_tensors,
    check_metrics,
    check_params,
    first_non_finite,
    params_type_of,
    short_reason,
    weight_of,
)
from flkit.strategy.base import (
    Aggregator,
    Contribution,
    RoundClosed,
    SiteConfig,
    SiteResult,
    Strategy,
    mean_metrics,
)
from flkit.strategy.registry import name_of
from flkit.tensor_reuse import BufferPool, copy_into_pool
from flkit.wire import meta_tensors
from flkit.wire.codec import Params
from flkit.wire.meta_tensors import Groups

log = logging.getLogger("flkit.server")

__all__ = ["SUBMIT_MODEL", "TRAIN", "VALIDATE", "Answer", "Controller", "JobEndedError", "RoundRecord"]


Event = dict[str, Any]


class JobEndedError(Exception):
    """A result came after the job ended; the site is told to stop, not blamed."""


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
    # An evaluation round's metrics as the strategy aggregates them (aggregate_evaluate).
    aggregated: dict[str, float] | None = None
    # Sites whose answer was taken but not aggregated, and why (e.g. no data this round).
    notes: dict[str, str] = field(default_factory=dict)
    # Each answering site's aggregation weight (train rounds) and seconds from the round's start
    # to its answer being taken.
    weights: dict[str, float] = field(default_factory=dict)
    answered_after_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Answer:
    """One accepted answer to a task (params decoded and checked, when the task wants them)."""

    site: str
    metrics: dict[str, float]
    meta: dict[str, Any]
    params: Params | None = None
    params_type: ParamsType = ParamsType.FULL
    saved_to: Path | None = None  # where the task's prepare step stored the params
    weight: float | None = None  # its aggregation weight (train answers)
    problem: str | None = None  # why the prepare step could not use the answer (not the site's fault)
    meta_tensors: Groups = field(default_factory=dict)  # tensors the site sent in its meta (checked)


@dataclass
class StreamedResult:
    """A result being folded in while its params arrive (``Controller.begin_result``)."""

    site: str
    state: SiteStatus
    open_task: _OpenTask
    task: Task
    answer: Answer
    contribution: Contribution
    expected: Params  # the global model the result must match (keys, shapes, dtypes)


@dataclass
class _OpenTask:
    task: Task
    record: RoundRecord
    # What the answer must carry: "required" (train), "optional" (submit_model), "ignored".
    params: str
    on_answer: Callable[[Answer], None]  # under the registry lock: keep it cheap
    # Slow work on a checked answer (folding it into the aggregate, writing a model to disk),
    # outside the registry lock; the answer's params are only valid during this call.
    prepare: Callable[[Answer], None] | None = None
    started: float = field(default_factory=time.monotonic)  # when the task went out


class Controller:
    """Runs the job's rounds over the sites in ``registry``; the Strategy plans each round and its
    Aggregator makes the next global model."""

    def __init__(
        self,
        config: WorkflowConfig,
        registry: SiteRegistry,
        strategy: Strategy,
        persistor: Persistor,
        initial_params: Params,
        on_event: Callable[[Event], None] | None = None,
        model_source: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.strategy = strategy
        self.persistor = persistor
        self.selector = BestModelSelector(config.key_metric, config.negate_key_metric)
        # Where global models live: two sets (the current model, read by the sites, and the next,
        # written by the strategy), reused once nobody reads them, in shared memory that sites map
        # copy-on-write (flkit.tensor_reuse). The initial model moves in when the job starts (``run``),
        # once ``keep_models_in`` may have named the folder sites on this host read from.
        self._models = BufferPool(depth=2, shared=True)
        self.global_params = initial_params
        self.history: list[RoundRecord] = []
        self.cross_site: CrossSiteEvaluation | None = None
        # An evaluate-only job: where the model came from ({"path", "sha256"}), the record of its
        # evaluation task, and the report written as evaluation.json (``evaluation_path``).
        self.model_source = model_source
        self._evaluated: RoundRecord | None = None
        self.evaluation: dict[str, Any] | None = None
        self.evaluation_path: Path | None = None
        self._on_event = on_event
        self._open: _OpenTask | None = None
        # Set (under the registry lock) as soon as the job's end is decided, before the sites are
        # told: a result arriving in between is answered "job ended", not blamed on the site.
        self._ending: JobEnd | None = None
        # Why this round's aggregate cannot be trusted (a fold failed half-way), if it cannot.
        self._poisoned: str | None = None
        self._aggregator: Aggregator | None = None  # the round's, while a train round runs
        # Sites whose result is being folded in while it arrives (site -> task id): begin_result.
        self._streaming: dict[str, str] = {}
        # The first training round to run: start_round, or the one after the last round a resumed
        # job completed (``resume``).
        self.first_round = config.start_round
        # Tasks handed out per (round, task name): the third part of a task's id (see ``_task_id``).
        self._dispatched: dict[tuple[int, str, str], int] = {}
        self.model_bytes = sum(t.numel() * t.element_size() for t in initial_params.values())
        # A dry run's findings: what ``examine`` saw in each site's train result.
        self.checks: dict[str, ResultCheck] = {}

    # -- events -------------------------------------------------------------

    def emit(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a broken progress printer must not break the job
                log.exception("event listener failed")

    def site_failed(self, site: str, reason: str) -> None:
        # A site's own text (e.g. its script's stderr): each further line marked as part of this
        # record, so no line of it can pass for a log record of its own.
        log.warning("site %s failed: %s", site, short_reason(reason).replace("\n", "\n    | "))
        self.emit({"type": "site_failed", "site": site, "reason": reason})

    # -- the workflow -------------------------------------------------------

    def resume(self, saved: SavedRun) -> None:
        """Go on from a saved run (before ``run``): its last completed round's global model, the
        best score so far, the strategy's state and the rounds' records. Records of rounds after
        the saved model's (written before a crash, or by tasks other than training) are dropped:
        those rounds run again, with the same task ids, and their records are written anew."""
        state = saved.state
        cfg = self.config
        if state.get("job_id") not in (None, self.registry.job_id):
            raise ValidationError(f"cannot resume: the saved run is of job {state.get('job_id')!r}, this server "
                                  f"runs {self.registry.job_id!r} (use the same --job-id)")
        strategy = state.get("strategy") or {}
        if strategy.get("name") not in (None, self._strategy_name):
            raise ValidationError(f"cannot resume: the saved run used strategy {strategy.get('name')!r}, this job "
                                  f"uses {self._strategy_name!r}")
        if not cfg.start_round <= saved.round <= cfg.last_round:
            raise ValidationError(f"cannot resume: the saved round {saved.round} is outside this job's rounds "
                                  f"{cfg.start_round}..{cfg.last_round}")
        try:
            check_params("the saved run", saved.global_params, self.global_params)
        except ValidationError as exc:
            raise ValidationError(f"cannot resume: the saved global model does not fit this job's model ({exc})") \
                from None
        try:
            self.strategy.load_state_dict(strategy.get("state") or {})
            self.strategy.load_state_tensors(saved.strategy_tensors)
        except Exception as exc:
            raise ValidationError(f"cannot resume: {self._strategy_name}.load_state_dict failed: "
                                  f"{type(exc).__name__}: {exc}") from None
        self.history = [RoundRecord(**record) for record in state.get("history", [])
                        if record.get("task") == TRAIN and record.get("round", saved.round + 1) <= saved.round]
        best = state.get("best")
        if best is not None:
            self.selector.best = Score(round=int(best["round"]), value=float(best["score"]),
                                       sites=int(best.get("sites", 0)))
        self.global_params = saved.global_params
        self.first_round = saved.round + 1
        log.info("resuming job %s after round %d (%d round(s) completed)", self.registry.job_id, saved.round,
                 len(self.history))

    def keep_models_in(self, folder: Path | None) -> None:
        """Make the global models files in ``folder`` (the job's shared-memory folder), so sites on
        this host read them there without the server writing a copy for them. Before ``run``."""
        self._models.keep_in(folder)

    def run(self) -> JobEnd:
        """Run the whole job; never raises, the outcome is returned and published."""
        try:
            if shared_model.supported():  # a copy in plain memory would gain nothing
                self.global_params = copy_into_pool(self._models, self.global_params)
            outcome = self._run()
        except Exception as exc:
            log.exception("controller crashed")
            outcome = JobEnd(failed=True, reason=f"server error: {type(exc).__name__}: {exc}")
        with self.registry.cond:
            self._ending = outcome
        try:  # the final and best models are on disk before anyone hears the job ended
            self._save_state(outcome)
            self.persistor.flush()
            if self.config.mode == EVALUATE:
                self._write_evaluation(outcome)
        except OSError as exc:
            log.error("%s", exc)
            if not outcome.failed:
                outcome = JobEnd(failed=True, reason=str(exc))
        self.registry.finish(outcome.failed, outcome.reason)
        self.emit({"type": "job_finished", "failed": outcome.failed, "reason": outcome.reason})
        return outcome

    def _run(self) -> JobEnd:
        cfg = self.config
        end = self._wait_for_sites()
        if end is not None:
            return end
        if cfg.mode == EVALUATE:
            return self._run_evaluation()
        last, stopped = cfg.last_round, self._early_stop()
        for round_num in range(self.first_round, cfg.last_round + 1):
            if stopped is not None:  # (a resumed job that had already met its condition)
                last = round_num - 1
                break
            end = self._run_round(round_num, TRAIN)
            if end is not None:
                return end
            stopped = self._early_stop()
            if stopped is not None:
                last = round_num
                log.info("stopping early after round %d: %s", round_num, stopped)
                self.emit({"type": "early_stop", "round": round_num, "reason": stopped})
                break
        if cfg.final_validation:
            end = self._run_round(last + 1, VALIDATE)
            if end is not None:
                return end
        if cfg.cross_site_eval is not None:
            end = self._run_cross_site_eval()
            if end is not None:
                return end
        best = self.selector.best
        best_txt = f"; best {cfg.key_metric}={best.value:.4g} in round {best.round}" if best else ""
        early = f" (stopped early: {stopped})" if stopped is not None else ""
        return JobEnd(failed=False, reason=f"completed {last - cfg.start_round + 1} round(s){early}{best_txt}")

    def _run_evaluation(self) -> JobEnd:
        """The evaluate-only job: the model goes to every site once as a validate task (the path of
        every other round); nothing is trained or saved as a model. Failed sites are reported."""
        end = self._run_round(self.config.start_round, VALIDATE)
        if end is not None:
            return end
        report = self._evaluation_report(None)
        answered, failed = report["answered"], report["failed"]
        text = f"evaluated the model at {len(answered)} of {len(report['sites'])} site(s)"
        if failed:
            text += f"; {len(failed)} failed ({failure_list(failed)})"
        key = self.config.key_metric
        if key is not None and key in report["mean"]:
            text += f"; mean {key}={report['mean'][key]:.4g}"
        return JobEnd(failed=False, reason=text)

    def _evaluation_report(self, outcome: JobEnd | None) -> dict[str, Any]:
        record = self._evaluated
        metrics = {} if record is None else record.metrics
        failed: dict[str, str] = {}
        with self.registry.cond:
            sites = list(self.registry.sites)
            for site in sites:
                if site in metrics:
                    continue
                state = self.registry.sites[site]
                if record is not None and site in record.failed:
                    failed[site] = record.failed[site]
                elif record is not None and site in record.sites and state.status == SiteStatus.JOINED:
                    failed[site] = "had not answered when the job ended"
                else:
                    failed[site] = absent_reason(state)
        status = "running" if outcome is None else ("failed" if outcome.failed else "completed")
        return evaluation_report(job_id=self.registry.job_id, model=self.model_source,
                                 round_num=self.config.start_round, sites=sites, metrics=metrics, failed=failed,
                                 key_metric=self.config.key_metric, status=status,
                                 reason=None if outcome is None else outcome.reason)

    def _write_evaluation(self, outcome: JobEnd) -> None:
        self.evaluation = self._evaluation_report(outcome)
        self.evaluation_path = write_evaluation(self.persistor.directory, self.evaluation)
        self.emit({"type": "evaluation_finished", "report": self.evaluation, "path": self.evaluation_path})

    def _early_stop(self) -> str | None:
        """Why the job stops after its last training round (``stop_cond`` met, or ``patience``
        rounds without a new best key metric), or None. Read from the history alone, so a resumed
        job decides as the first run would have."""
        cfg = self.config
        trained = [r for r in self.history if r.task == TRAIN]
        if not trained:
            return None
        cond = parse_stop_cond(cfg.stop_cond)
        if cond is not None:
            value = mean_metrics(trained[-1].metrics).get(cond.metric)
            if value is not None and cond.holds(value):
                return f"{cfg.stop_cond} held in round {trained[-1].round} ({cond.metric}={value:.4g}, the sites' mean)"
        if cfg.patience is not None:
            if cfg.key_metric is not None:
                metric, lower = cfg.key_metric, cfg.negate_key_metric
            else:
                assert cond is not None  # (WorkflowConfig: patience needs a key_metric or a stop_cond)
                metric, lower = cond.metric, cond.op in ("<", "<=")
            best: tuple[float, int] | None = None
            without = 0
            for record in trained:  # a round nobody scored neither improves nor counts
                score = mean_metrics(record.metrics).get(metric)
                if score is None:
                    continue
                if best is None or (score < best[0] if lower else score > best[0]):
                    best, without = (score, record.round), 0
                else:
                    without += 1
            if best is not None and without >= cfg.patience:
                return (f"no improvement of {metric} in {without} round(s), patience={cfg.patience} "
                        f"(best {best[0]:.4g} in round {best[1]})")
        return None

    def _failures_locked(self) -> str:
        failed = {s.name: s.failure or "" for s in self.registry.sites.values() if s.status == SiteStatus.FAILED}
        return failure_list(failed)

    def _mandatory_failed_locked(self, started: bool = True) -> str | None:
        """Why the job cannot go on without a mandatory site (failed, or left once rounds started)."""
        for name in self.config.mandatory_clients:
            state = self.registry.sites.get(name)
            if state is None:
                continue
            if state.status == SiteStatus.FAILED:
                return f"mandatory site {name} failed: {first_line(state.failure)}"
            if started and state.status == SiteStatus.LEFT:
                return f"mandatory site {name} left the job before it ended"
        return None

    def _wait_for_sites(self) -> JobEnd | None:
        cfg, reg = self.config, self.registry
        deadline = time.monotonic() + cfg.join_timeout_s
        with reg.cond:
            while True:
                if reg.end is not None:
                    return reg.end
                reg.reap_dead_locked()
                why = self._mandatory_failed_locked(started=False)
                if why:
                    return JobEnd(True, why)
                joined = reg.active_sites_locked()
                waiting = [s.name for s in reg.sites.values() if s.status == SiteStatus.EXPECTED]
                mandatory_missing = [s for s in cfg.mandatory_clients if s in waiting]
                if not waiting or (time.monotonic() >= deadline and len(joined) >= cfg.min_clients
                                   and not mandatory_missing):
                    break
                if len(joined) + len(waiting) < cfg.min_clients:
                    return JobEnd(True, f"fewer than min_clients={cfg.min_clients} sites can take part: "
                                        f"{self._failures_locked()}")
                if time.monotonic() >= deadline:
                    return JobEnd(True, f"only {len(joined)} of {len(reg.sites)} sites joined within "
                                        f"{cfg.join_timeout_s:g} s (min_clients={cfg.min_clients}; "
                                        f"missing: {site_list(waiting)})")
                reg.cond.wait(min(1.0, max(0.01, deadline - time.monotonic())))
        return None

    def _sample(self, round_num: int, active: list[str]) -> list[str]:
        """The round's offer: all sites, or a seeded sample of ``clients_per_round`` (or ``fraction`` of
        them, at least ``min_clients``); mandatory sites are always in."""
        cfg = self.config
        k = cfg.clients_per_round
        if k is None and cfg.fraction is not None:
            k = max(cfg.min_clients, math.ceil(cfg.fraction * len(active)))
        if k is None or k >= len(active):
            return active
        mandatory = [s for s in self.config.mandatory_clients if s in active]
        others = sorted(s for s in active if s not in mandatory)
        rng = random.Random(f"{self.config.seed}:{round_num}")
        picked = set(mandatory) | set(rng.sample(others, max(0, k - len(mandatory))))
        return [s for s in active if s in picked]

    @property
    def _strategy_name(self) -> str:
        return name_of(self.strategy) or type(self.strategy).__name__

    def _plan(self, round_num: int, task_name: str, offered: list[str]) -> dict[str, SiteConfig] | JobEnd:
        """The strategy's plan for the round (site -> config), checked: a subset of ``offered``, with
        every mandatory site offered, enough sites for ``min_clients``, JSON-able configs."""
        cfg = self.config
        rng = random.Random(f"{cfg.seed}:{round_num}:plan")
        method = self.strategy.configure_train if task_name == TRAIN else self.strategy.configure_evaluate
        where = f"round {round_num}: {self._strategy_name}.{method.__name__}"
        try:
            plan = method(round_num, list(offered), rng)
        except Exception as exc:
            return JobEnd(True, f"{where} failed: {type(exc).__name__}: {exc}")
        if not isinstance(plan, dict):
            return JobEnd(True, f"{where} returned {type(plan).__name__}, not a dict of site -> config")
        strangers = [site for site in plan if site not in offered]
        if strangers:
            return JobEnd(True, f"{where} chose site(s) not offered this round: {site_list(strangers)} "
                                f"(offered: {site_list(offered)})")
        left_out = [site for site in cfg.mandatory_clients if site in offered and site not in plan]
        if left_out:
            return JobEnd(True, f"{where} left out mandatory site(s) {site_list(left_out)}")
        need = min(cfg.min_clients, len(offered)) if task_name == TRAIN else 1
        if len(plan) < need:
            return JobEnd(True, f"{where} chose {len(plan)} site(s); the round needs at least {need} "
                                f"(min_clients={cfg.min_clients})")
        for site, config in plan.items():
            try:
                if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
                    raise TypeError("not a dict with string keys")
                json.dumps(config, allow_nan=False)
            except (TypeError, ValueError) as exc:
                return JobEnd(True, f"{where}: the config of site {site} is not JSON-able ({exc})")
        return {site: plan[site] for site in offered if site in plan}  # in the offer's order

    def _run_round(self, round_num: int, task_name: str) -> JobEnd | None:
        cfg, reg = self.config, self.registry
        # An evaluate-only job's one task: every site, failures reported rather than fatal (one
        # answer is enough), and no best model (the model is not changed, so there is nothing to pick).
        evaluate_only = cfg.mode == EVALUATE
        started = time.monotonic()
        with reg.cond:
            reg.reap_dead_locked()
            active = reg.active_sites_locked()
            why = self._mandatory_failed_locked()
            if why:
                return JobEnd(True, f"round {round_num}: {why}")
            if len(active) < cfg.min_clients:
                return JobEnd(True, f"round {round_num}: only {len(active)} site(s) available, "
                                    f"min_clients={cfg.min_clients} ({self._failures_locked() or 'sites left'})")
        if task_name == TRAIN:
            try:
                self.strategy.population(list(active))
            except Exception as exc:
                return JobEnd(True, f"round {round_num}: {self._strategy_name}.population failed: "
                                    f"{type(exc).__name__}: {exc}")
        offered = self._sample(round_num, active) if task_name == TRAIN else active
        plan = self._plan(round_num, task_name, offered)
        if isinstance(plan, JobEnd):
            return plan
        sites = list(plan)
        record = RoundRecord(round=round_num, task=task_name, sites=list(sites))
        if evaluate_only:
            self._evaluated = record
        prepare = None
        self._poisoned = None
        new_global: Params | None = None
        task_params = self.global_params
        if task_name == TRAIN:
            try:
                extra = self.strategy.train_tensors(round_num, self.global_params)
                if extra:  # e.g. SCAFFOLD's control variate: beside the model, as tensors
                    task_params = meta_tensors.pack(self.global_params, {k: dict(v) for k, v in extra.items()})
                if not cfg.dry_run:  # (a dry run examines each result in ``submit`` and aggregates none)
                    # The next global model's buffers, taken when the aggregator first asks (it may sum in them).
                    new_global = {}
                    self._aggregator = self.strategy.aggregator(round_num)
                    self._aggregator.start(round_num, self.global_params, self._output_buffers(new_global))
            except Exception as exc:
                return JobEnd(True, f"round {round_num}: {self._strategy_name}.aggregator failed: "
                                    f"{type(exc).__name__}: {exc}")
            params, prepare = "required", None if cfg.dry_run else self._fold_in
        else:
            params = "ignored"
        self.emit({"type": "round_started", "round": round_num, "task": task_name, "sites": sites,
                   "total_rounds": cfg.num_rounds, "first_round": cfg.start_round, "mode": cfg.mode})
        # A dry run waits for every site, whatever fails: each one is checked; an evaluation needs one answer.
        min_answers = 0 if cfg.dry_run else 1 if evaluate_only else min(cfg.min_clients, len(sites))
        end = self._dispatch(task_name, round_num, sites, task_params, {}, record, params,
                             lambda answer: None, min_answers=min_answers,
                             timeout_s=cfg.round_timeout_s, timeout_label="round_timeout_s", started=started,
                             prepare=prepare, site_meta=plan)
        if end is not None:
            return end
        if self._poisoned:
            return JobEnd(True, f"round {round_num}: {self._poisoned}; the global model of round "
                                f"{round_num - 1} is kept")

        if new_global is not None:
            assert self._aggregator is not None
            # The strategy's JSON state as the last saved round left it: a round that fails from here on
            # is written with it (its tensors on disk are that round's too), so a resume is consistent.
            saved_state = self.strategy.state_dict()
            try:
                if self.strategy.state_tensors():  # the last round's are being written: finish changes them
                    self.persistor.flush()
                self._aggregator.finish()
            except Exception as exc:
                self.strategy.load_state_dict(saved_state)
                return JobEnd(True, f"round {round_num}: {self._strategy_name}.aggregator failed: "
                                    f"{type(exc).__name__}: {exc}; the global model of round {round_num - 1} is kept")
            names = list(new_global)
            bad_index = first_non_finite([new_global[name] for name in names])
            state = dict(self.strategy.state_tensors())
            bad_state = first_non_finite(list(state.values())) if bad_index is None else None
            if bad_index is not None or bad_state is not None:
                self.strategy.load_state_dict(saved_state)
                what = (f"the aggregate of tensor '{names[bad_index]}'" if bad_index is not None
                        else f"the strategy's state '{list(state)[bad_state or 0]}'")
                return JobEnd(True, f"round {round_num}: {what} is not finite (an overflow); the global model "
                                    f"and strategy state of round {round_num - 1} are kept")
        if task_name == VALIDATE:
            try:
                record.aggregated = self.strategy.aggregate_evaluate(round_num, record.metrics)
            except Exception as exc:
                return JobEnd(True, f"round {round_num}: {self._strategy_name}.aggregate_evaluate failed: "
                                    f"{type(exc).__name__}: {exc}")
        score = self.selector.round_score(round_num, record.metrics)
        record.score = None if score is None else score.value
        record.best = not (cfg.dry_run or evaluate_only) and self.selector.offer(score)  # neither promotes a model
        if record.best:
            self.persistor.save_best(self.global_params, round_num, cfg.key_metric, score.value)
        if new_global is not None:
            self.global_params = new_global
        record.seconds = time.monotonic() - started
        self.history.append(record)
        if new_global is not None:  # the model and the state that describes it, as one round
            self.persistor.save_global(new_global, round_num, self._state(None), self._metrics(None),
                                       dict(self.strategy.state_tensors()))
        else:
            self._save_state(None)
        n = cfg.server_memory_gc_rounds
        if n > 0 and task_name == TRAIN and (round_num - cfg.start_round + 1) % n == 0:
            gc.collect()
        self.emit({"type": "round_finished", "round": round_num, "task": task_name, "record": record,
                   "key_metric": cfg.key_metric})
        return None

    def _skip(self, site: str) -> None:
        """A result of weight 0 (NUM_STEPS_CURRENT_ROUND=0: no data this round) is taken, not folded in."""
        note = f"{MetaKey.NUM_STEPS_CURRENT_ROUND}=0 (no data this round): answer taken, not aggregated"
        log.info("site %s: %s", site, note)
        with self.registry.cond:
            if self._open is not None:
                self._open.record.notes[site] = note

    def _output_buffers(self, taken: Params) -> Callable[[], Params]:
        """``out`` for Aggregator.start: the pool's next set, taken at the first call into ``taken``."""
        lock = threading.Lock()
        like = self.global_params

        def out() -> Params:
            with lock:
                if not taken:
                    taken.update(self._models.take(like))
                return taken

        return out

    def _fold_in(self, answer: Answer) -> None:
        assert answer.params is not None  # a train answer without params was refused
        weight = weight_of(answer.site, answer.meta) * self.config.aggregation_weights.get(answer.site, 1.0)
        answer.weight = weight
        assert self._aggregator is not None  # a train round is open
        if weight == 0:
            self._skip(answer.site)
            return
        try:
            self._aggregator.add(SiteResult(answer.site, answer.params, answer.params_type, weight, answer.metrics,
                                            answer.meta_tensors))
        except ValidationError:  # refused before any of it was folded in (Aggregator.add's contract): the site's fault
            raise
        except BaseException as exc:  # part of the result may be in the sums: the round cannot finish
            self._poisoned = (f"folding the result of site {answer.site} failed half-way "
                              f"({type(exc).__name__}: {exc})")
            raise

    def _run_cross_site_eval(self) -> JobEnd | None:
        """Every participating site scores the final and best global models and each site's own model."""
        cse = self.config.cross_site_eval
        with self.registry.cond:
            self.registry.reap_dead_locked()
            active = self.registry.active_sites_locked()
        sites = [s for s in active if cse.participating_clients is None or s in cse.participating_clients]
        evaluation = CrossSiteEvaluation(self.persistor.directory, sites)
        self.cross_site = evaluation
        if not sites:
            log.warning("cross-site evaluation: no participating site is still in the job")
            evaluation.save()
            return None
        round_num = self.config.last_round
        self.emit({"type": "cross_site_started", "sites": sites})
        if cse.submit_model:
            record = RoundRecord(round=round_num, task=SUBMIT_MODEL, sites=list(sites))
            end = self._dispatch(SUBMIT_MODEL, round_num, sites, None, {}, record, "optional",
                                 evaluation.add_site_model, min_answers=0, timeout_s=cse.submit_model_timeout_s,
                                 timeout_label="submit_model_timeout_s", prepare=evaluation.store_site_model)
            if end is not None:
                return end
            evaluation.note_failures(record.failed)
        self.persistor.flush()  # the server's models are read back from disk
        models = list(self.persistor.server_models(self.selector.best is not None))
        models += evaluation.site_models()
        for model_name, path in models:
            record = RoundRecord(round=round_num, task=VALIDATE, sites=list(sites))
            end = self._dispatch(VALIDATE, round_num, sites, load_params(path), {"model_name": model_name}, record,
                                 "ignored",
                                 evaluation.scorer(model_name), min_answers=0,
                                 timeout_s=cse.validation_timeout_s, timeout_label="validation_timeout_s")
            if end is not None:
                return end
            evaluation.note_failures(record.failed, model_name)
        evaluation.save()
        self.emit({"type": "cross_site_finished", "results": evaluation.results, "path": evaluation.path})
        return None

    # -- one task, assigned and collected ------------------------------------

    def _dispatch(self, task_name: str, round_num: int, sites: list[str], params: Params | None,
                  meta: dict[str, Any],
                  record: RoundRecord, wants: str, on_answer: Callable[[Answer], None], min_answers: int,
                  timeout_s: float | None, timeout_label: str, started: float | None = None,
                  prepare: Callable[[Answer], None] | None = None,
                  site_meta: dict[str, SiteConfig] | None = None) -> JobEnd | None:
        """Give ``sites`` the task (each with its ``site_meta`` on top of ``meta``) and wait until each
        answered or failed (or ``timeout_s`` passed)."""
        reg = self.registry
        task = Task(
            task_id=self._task_id(round_num, task_name, str(meta.get("model_name", ""))),
            name=task_name,
            round=round_num,
            total_rounds=self.config.last_round + 1,
            params_type=ParamsType.FULL.value if params is not None else "",
            meta=meta,
            params=params,
            site_meta={site: config for site, config in (site_meta or {}).items() if config},
        )
        with reg.cond:
            # Only sites still in the job get the task: one that failed or left since the caller
            # chose them (e.g. between two models of cross-site evaluation) would never answer.
            sites = [s for s in sites if reg.sites[s].status == SiteStatus.JOINED]
            record.sites = list(sites)
            self._open = _OpenTask(task, record, wants, on_answer, prepare)
            reg.assign_locked(task, sites)
        end = None
        try:
            end = self._collect(task, sites, record, min_answers, timeout_s, timeout_label,
                                time.monotonic() if started is None else started)
            return end
        finally:
            with reg.cond:
                self._open = None
                if end is not None:
                    self._ending = end
                for name in sites:  # settled: the task need not keep its model alive (a site left out of
                    state = reg.sites[name]  # the next rounds would hold it, and its buffers, for good)
                    if state.task is task and state.task_outcome not in (None, ACCEPTING):
                        state.task = None

    def _task_id(self, round_num: int, task_name: str, model_name: str = "") -> str:
        """The same for the same task of the same round (and model, in cross-site evaluation) in
        every run of the job: a result a site sends again after the server restarted (``resume``)
        still answers the task it was for."""
        key = (round_num, task_name, model_name)
        seq = self._dispatched.get(key, 0)
        self._dispatched[key] = seq + 1
        text = f"{self.registry.job_id}:{round_num}:{task_name}:{model_name}:{seq}"
        # Hex: it names shared-memory files, whose names are checked to be only what flkit writes.
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _collect(self, task: Task, sites: list[str], record: RoundRecord, min_answers: int,
                 timeout_s: float | None, timeout_label: str, started: float) -> JobEnd | None:
        """Wait until every site answered or failed; fail fast when min_answers is out of reach.

        Why it does not look at every site on every wake: each answer wakes this thread, and with a
        thousand sites a look at all of them per answer is a million steps per round, under the lock
        the sites need to answer. It looks again only when a failure happened, when as many tasks
        settled as were pending at its last look, or a second after it (to catch lapsed heartbeats)."""
        reg = self.registry
        last: tuple[float, int, int, int] | None = None  # (when, settled, failures, pending) at the last look
        with reg.cond:
            while True:
                if reg.end is not None:
                    return reg.end
                now = time.monotonic()
                if last is not None and reg.failures == last[2] and reg.settled - last[1] < last[3] \
                        and now - last[0] < 1.0 and (timeout_s is None or now < started + timeout_s):
                    wait = 1.0 - (now - last[0])
                    if timeout_s is not None:
                        wait = min(wait, started + timeout_s - now)
                    reg.cond.wait(max(wait, 0.0))
                    continue
                reg.reap_dead_locked()
                states = [reg.sites[s] for s in sites]
                pending = [s for s in states if s.task is task and s.task_outcome in (None, ACCEPTING)]
                done = [s for s in states if s.task is task and s.task_outcome == "done"]
                for s in states:
                    if s.task is task and s.task_outcome not in (None, ACCEPTING, "done"):
                        record.failed[s.name] = s.task_outcome
                if min_answers:  # cross-site evaluation (min_answers=0) never fails the job
                    why = self._mandatory_failed_locked()
                    missed = [s for s in self.config.mandatory_clients if s in record.failed]
                    if why or missed:
                        why = why or f"mandatory site {missed[0]}: {first_line(record.failed[missed[0]])}"
                        return JobEnd(True, f"round {task.round}: {why}")
                if len(done) + len(pending) < min_answers:
                    why = failure_list(record.failed)
                    if self.config.mode == EVALUATE:
                        return JobEnd(True, f"no site answered the evaluation ({why or 'no site was left'})")
                    return JobEnd(True, f"round {task.round}: fewer than min_clients={min_answers} sites "
                                        f"can answer ({why})")
                if not pending:
                    return None
                last = (time.monotonic(), reg.settled, reg.failures, len(pending))
                wait = 1.0
                if timeout_s is not None:
                    left = started + timeout_s - time.monotonic()
                    if left <= 0 and any(s.task_outcome is None for s in pending):
                        for s in pending:
                            if s.task_outcome is None:  # an answer being folded in finishes
                                reg.settle_locked(s, f"no answer within {timeout_label}={timeout_s:g}")
                        continue
                    if left > 0:  # past the deadline only folds are left: they notify when done
                        wait = min(wait, left)
                reg.cond.wait(wait)

    # -- results from the job service --------------------------------------

    def current_task(self) -> Task | None:
        """The task being collected now (None between tasks). Caller holds the registry's lock."""
        return None if self._open is None else self._open.task

    def max_result_bytes(self) -> int:
        """Upper bound for a valid result payload: about the size of the global model."""
        return 2 * self.model_bytes + (1 << 20)

    def _admit_locked(self, session_id: str, task_id: str) -> tuple[SiteStatus, _OpenTask, Task] | None:
        """The site's state and its open task, if ``task_id`` answers it; None if the site sent an
        answer again that was already taken (acknowledge it, fold nothing). Caller holds the
        registry's lock. Raises JobEndedError after the job, ValidationError for a stale task.

        A send that comes while an earlier send of the same answer is still being folded in (the
        site's call timed out, or its upload broke off and it sent again) waits for that one: if it
        was taken, this one is acknowledged; if it failed the site's task, this one gets that
        reason; if it was refused in a way the site may retry, this one is admitted."""
        reg = self.registry
        waited = False
        while True:
            ended = reg.end or self._ending
            if ended is not None:
                raise JobEndedError(f"job {reg.job_id} has ended: {ended.reason}")
            state = reg.touch_locked(session_id)
            site = state.name
            open_task = self._open
            task = None if open_task is None else open_task.task
            answers_it = task is not None and state.task is task and task.task_id == task_id
            if open_task is not None and task is not None and answers_it and state.task_outcome is None \
                    and site not in self._streaming:
                return state, open_task, task
            if answers_it and (state.task_outcome == ACCEPTING or site in self._streaming):
                reg.cond.wait(1.0)
                waited = True
                continue
            if task_id and task_id == state.last_done:
                # Sent again (the answer to the first send was lost in a reconnect): it was folded
                # in once, and is acknowledged again, never folded twice.
                log.info("site %s sent its result for task %s again; acknowledged", site, task_id)
                return None
            if waited and answers_it and state.task_outcome not in (None, "done"):
                raise ValidationError(f"site {site}: {state.task_outcome}")
            raise ValidationError(f"site {site}: result for a task that is no longer open (task {task_id})")

    def _answer(self, site: str, open_task: _OpenTask, task: Task, result: Result, with_params: bool) -> Answer:
        """The answer's metrics and, if it has params, their type, checked (ValidationError names
        what is wrong)."""
        answer = Answer(site, check_metrics(site, result.metrics), result.meta)
        if open_task.params != "ignored" and with_params:
            answer.params_type = params_type_of(site, result.params_type)
            if task.name == SUBMIT_MODEL and answer.params_type != ParamsType.FULL:
                raise ValidationError(f"site {site}: submit_model must be answered with FULL params")
        return answer

    def _refuse(self, state: SiteStatus, exc: BaseException, accepting: bool, task: Task | None = None) -> None:
        """A result the server cannot use: the site's task fails with the reason (and the site).
        ``task``: the task the result answered (only that task is settled, not a later one)."""
        site = state.name
        if isinstance(exc, ValidationError):
            log.error("rejected result: %s", exc)
            why = f"result rejected: {exc}"
        else:  # e.g. out of memory half-way through a fold: the round's aggregate is not whole
            log.error("site %s: the server could not use its result", site, exc_info=exc)
            why = f"the server could not use its result: {type(exc).__name__}: {exc}"
        with self.registry.cond:
            if state.task_outcome == (ACCEPTING if accepting else None) and (task is None or state.task is task):
                self.registry.settle_locked(state, why)  # closed here: the site may have failed meanwhile
        self.registry.fail_site(site, why)

    def _accept_locked(self, state: SiteStatus, open_task: _OpenTask, task: Task, answer: Answer) -> None:
        open_task.on_answer(answer)
        open_task.record.metrics[state.name] = answer.metrics
        if answer.weight is not None:
            open_task.record.weights[state.name] = answer.weight
        open_task.record.answered_after_s[state.name] = round(time.monotonic() - open_task.started, 4)
        self.registry.settle_locked(state, "done")
        state.last_done = task.task_id

    def _emit_result(self, site: str, task: Task, answer: Answer) -> None:
        self.emit({"type": "result", "round": task.round, "task": task.name, "site": site,
                   "metrics": answer.metrics, "model_name": task.meta.get("model_name")})

    def submit(self, session_id: str, result: Result) -> None:
        """Check one result and fold it in before returning (the Result's params are not kept).
        Raises ValidationError naming the site and the tensor; JobEndedError after the job."""
        reg = self.registry
        with reg.cond:
            admitted = self._admit_locked(session_id, result.task_id)
            if admitted is None:
                return
            state, open_task, task = admitted
            expected = self.global_params
            state.task_outcome = ACCEPTING  # (not a settling: the round still waits for this site)
        site = state.name
        found = None
        try:
            if self.config.dry_run and task.name == TRAIN:
                # Every problem of the result is listed, none refused: it is taken, never folded in.
                model_params, _ = meta_tensors.unpack(result.params)
                found = examine(site, replace(result, params=model_params), expected, self.config.key_metric)
                answer = Answer(site, found.metrics, result.meta)
            else:
                answer = self._answer(site, open_task, task, result, result.params is not None)
                if open_task.params == "required" and result.params is None:
                    raise ValidationError(f"site {site}: a {task.name} task must be answered with params")
                if open_task.params != "ignored" and result.params is not None:
                    params, groups = meta_tensors.unpack(result.params)
                    assert params is not None
                    check_params(site, params, expected)
                    if groups:
                        check_meta_tensors(site, groups, self.model_bytes)
                    answer.params, answer.meta_tensors = params, groups
                if open_task.prepare is not None:
                    open_task.prepare(answer)
                answer.params, answer.meta_tensors = None, {}  # the site's tensors are not kept past this call
        except BaseException as exc:
            self._refuse(state, exc, accepting=True)
            raise
        with reg.cond:
            ended = reg.end or self._ending
            if ended is not None:
                raise JobEndedError(f"job {reg.job_id} has ended: {ended.reason}")
            if found is not None:
                self.checks[site] = found
            self._accept_locked(state, open_task, task, answer)
        self._emit_result(site, task, answer)

    def begin_result(self, session_id: str, result: Result,
                     cancel: Callable[[], None] | None = None) -> StreamedResult | None | bool:
        """Open a result to be folded in while its params arrive (``result.params`` is None here).

        Returns a StreamedResult to feed (``StreamedResult.contribution``), then ``end_result`` or
        ``drop_result``; False when the open task's aggregator does not take results piece by piece
        (the transport then receives the result whole and calls ``submit``); True when the site sent
        an answer again that was already taken (acknowledge it). Raises as ``submit`` does for what
        the header alone shows (a stale task, bad metrics, a bad weight), before any byte is read.
        ``cancel``: stops the upload (the round closed first)."""
        reg = self.registry
        with reg.cond:
            admitted = self._admit_locked(session_id, result.task_id)
            if admitted is None:
                return True
            state, open_task, task = admitted
            if open_task.prepare != self._fold_in or self._aggregator is None:
                return False
            aggregator, expected = self._aggregator, self.global_params
            site = state.name
            try:
                answer = self._answer(site, open_task, task, result, True)
                weight = weight_of(site, answer.meta) * self.config.aggregation_weights.get(site, 1.0)
                answer.weight = weight
            except ValidationError as exc:
                failure: BaseException | None = exc
            else:
                if weight == 0:  # nothing to fold: taken whole, then skipped (``_fold_in``)
                    return False
                failure = None
                self._streaming[site] = task.task_id  # (a second send of it waits for this one)
        if failure is not None:
            self._refuse(state, failure, accepting=False)
            raise failure
        # Outside the registry's lock: the round's first contribution may prepare the sums (a pass
        # over the model), which the other sites' calls need not wait for.
        try:
            contribution = aggregator.contribution(task.round, site, weight, answer.params_type, cancel)
        except BaseException:
            self._unmark_streaming(site, task.task_id)
            raise
        if contribution is None:
            self._unmark_streaming(site, task.task_id)
            return False
        return StreamedResult(site, state, open_task, task, answer, contribution, expected)

    def _unmark_streaming(self, site: str, task_id: str) -> None:
        with self.registry.cond:
            if self._streaming.get(site) == task_id:
                del self._streaming[site]
            self.registry.cond.notify_all()

    def end_result(self, streamed: StreamedResult) -> None:
        """Every piece of ``streamed`` is in: it counts. Raises JobEndedError after the job, and
        RoundClosed (flkit.strategy.base) when the round no longer takes it; the caller then takes
        its pieces back out (``Contribution.unfold``) and calls ``drop_result``."""
        reg = self.registry
        with reg.cond:
            ended = reg.end or self._ending
            if ended is not None:
                raise JobEndedError(f"job {reg.job_id} has ended: {ended.reason}")
            state, task = streamed.state, streamed.task
            if self._open is not streamed.open_task or state.task is not task or state.task_outcome is not None:
                why = state.task_outcome if state.task is task and state.task_outcome else "the task closed"
                raise RoundClosed(f"site {streamed.site}: result for task {task.task_id} came too late ({why})")
            streamed.contribution.commit()
            self._streaming.pop(streamed.site, None)
            self._accept_locked(state, streamed.open_task, task, streamed.answer)
            reg.cond.notify_all()
        self._emit_result(streamed.site, task, streamed.answer)

    def drop_result(self, streamed: StreamedResult, problem: BaseException | None) -> None:
        """``streamed`` does not count (its pieces were taken back out, or its contribution was
        discarded as not whole). ``problem``: a ValidationError of the site's params fails the
        site's task, as in ``submit``; anything else (the upload broke off, the round closed) leaves
        the site free to send again."""
        self._unmark_streaming(streamed.site, streamed.task.task_id)
        if isinstance(problem, ValidationError):
            self._refuse(streamed.state, problem, accepting=False, task=streamed.task)

    # -- state --------------------------------------------------------------

    def _save_state(self, outcome: JobEnd | None) -> None:
        self.persistor.save_state(self._state(outcome), self._metrics(outcome))

    def _metrics(self, outcome: JobEnd | None) -> dict[str, Any]:
        """``metrics.json``: the run's history for people and tools (``round_state.json`` is what a
        resume needs). Per round: the sites offered, those that answered (with their weights and
        how long after the round's start), failed or were skipped, each site's metrics and their
        means, the key metric's score and whether it was the best, and the round's seconds."""
        cfg = self.config
        rounds = []
        for r in self.history:
            rounds.append({
                "round": r.round, "task": r.task, "sites": r.sites, "answered": sorted(r.metrics),
                "failed": r.failed, "skipped": r.notes, "weights": r.weights,
                "answered_after_s": r.answered_after_s, "metrics": r.metrics,
                "mean": mean_metrics(r.metrics),
                "aggregated": r.aggregated, "score": r.score, "best": r.best, "seconds": round(r.seconds, 4),
            })
        best = self.selector.best
        metrics: dict[str, Any] = {
            "job_id": self.registry.job_id,
            "mode": cfg.mode,
            "key_metric": cfg.key_metric,
            "key_metric_mode": "min" if cfg.negate_key_metric else "max",
            "strategy": self._strategy_name,
            "num_rounds": cfg.num_rounds,
            "status": "running" if outcome is None else ("failed" if outcome.failed else "completed"),
            "reason": None if outcome is None else outcome.reason,
            "best": None if best is None else {"round": best.round, "score": best.value},
            "rounds": rounds,
        }
        if cfg.dry_run:  # the findings per site (``flkit.server.preflight``)
            metrics["checks"] = {site: asdict(found) for site, found in self.checks.items()}
        return metrics

    def _state(self, outcome: JobEnd | None) -> dict[str, Any]:
        """The round state: what ``round_state.json`` says and a resumed server takes back."""
        best = self.selector.best
        state = {
            "job_id": self.registry.job_id,
            "completed_rounds": sum(1 for r in self.history if r.task == TRAIN),
            "num_rounds": self.config.num_rounds,
            "key_metric": self.config.key_metric,
            "best": None if best is None else {"round": best.round, "score": best.value, "sites": best.sites},
            "history": [r.__dict__ for r in self.history],
            "status": "running" if outcome is None else ("failed" if outcome.failed else "completed"),
            "reason": None if outcome is None else outcome.reason,
        }
        if self.cross_site is not None:
            state["cross_site_results"] = str(self.cross_site.path)
        try:
            strategy_state = self.strategy.state_dict()
            json.dumps(strategy_state, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self._strategy_name}.state_dict() is not JSON-able: {exc}") from None
        state["strategy"] = {"name": self._strategy_name, "state": strategy_state}
        return state
