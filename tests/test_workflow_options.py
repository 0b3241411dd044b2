"""Server workflow options and site settings of NVFlare jobs, against a real server on loopback.

Covers per-round sampling (clients_per_round, seed), mandatory sites, aggregation weights,
start_round, header peeks and one simulator worker running one site at a time,
cross-site evaluation, tracking records (server and site receivers, the LogMetrics RPC), the
runner's site settings (framework, params_transfer_type, memory_gc_rounds) and the options of
external-process runners (launcher command, clean-up, shutdown_timeout, launch_timeout).

Sites are real Sessions driven from the test (or from threads), or real scripts under
``tests/scripts/wf_*.py``. Nothing waits on a sleep: threads are joined with timeouts and
every receive/wait has one.
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from rich.console import Console

import flkit.client.session as session_module
from flkit.client.session import Session
from flkit.errors import JobFailedError, ResultRejectedError
from flkit.job import BaseScriptRunner, FedAvgJob, ScriptRunner, SubprocessLauncher
from flkit.model import FLModel, ParamsType
from flkit.server.config import WorkflowConfig
from flkit.server.persistor import load_params
from flkit.server.server import FLServer
from flkit.server.sites import SiteStatus
from flkit.sim.progress import ProgressPrinter
from flkit.strategy.fedavg import WeightedMean
from flkit.tracking import write_record
from flkit.wire import flkit_pb2 as pb
from flkit.wire import flkit_pb2_grpc as pb_grpc
from flkit.wire.tracking_records import AnalyticsDataType

from conftest import SCRIPTS, ServerHarness

INITIAL = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -0.5])}
BAD_SHAPE = {"w": torch.ones(3, 3), "b": torch.zeros(2)}
WAIT_S = 30.0  # upper bound for anything that should take well under a second


def scaled(factor: float, shift: float = 0.0) -> dict[str, torch.Tensor]:
    return {k: v * factor + shift for k, v in INITIAL.items()}


def assert_params(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(torch.as_tensor(actual[name]), value, rtol=1e-6, atol=1e-6, msg=name)


def start_server(harness: ServerHarness, sites: list[str], *, out: str = "server", initial=None,
                 on_event=None, **workflow) -> FLServer:
    """Like ``harness.start`` but with its own output folder and an event listener."""
    workflow.setdefault("min_clients", len(sites))
    server = FLServer(WorkflowConfig(**workflow), sites, initial or INITIAL, harness.tmp_path / out,
                      job_id="test-job", on_event=on_event)
    harness.servers.append(server)
    server.start()
    return server


class SiteThreads:
    """Run one function per site in its own thread; ``join`` re-raises what any of them raised."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self, fn: Callable, *args) -> None:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:  # surfaced by join()
                self.errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a site thread is still running"
        if self.errors:
            raise self.errors[0]


def answer_loop(session: Session, reply: Callable[[FLModel], FLModel], seen: list[FLModel]) -> None:
    """A site's script: answer every task until the job ends."""
    while session.is_running():
        model = session.receive(timeout=WAIT_S)
        assert model is not None, f"{session.settings.site_name}: is_running() but no task"
        seen.append(model)
        session.send(reply(model))


def answer(session: Session, task: str, reply: Callable[[FLModel], FLModel]) -> FLModel:
    """Receive one task (it must be ``task``) and answer it; returns what was received."""
    model = session.receive(timeout=WAIT_S)
    assert model is not None, f"{session.settings.site_name}: no {task} task came"
    assert session.task_name == task, (session.settings.site_name, session.task_name, model.meta)
    session.send(reply(model))
    return model


def echo(model: FLModel) -> FLModel:
    return FLModel(params=model.params, metrics={"accuracy": 0.5})


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars in ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# --------------------------------------------------------------------------- 1. clients_per_round


FIVE = [f"site-{i}" for i in range(1, 6)]


def _run_sampled_job(harness: ServerHarness, out: str, **workflow) -> tuple[FLServer, dict[str, list[int]]]:
    server = start_server(harness, FIVE, out=out, num_rounds=4, min_clients=2, clients_per_round=2, **workflow)
    rounds: dict[str, list[FLModel]] = {s: [] for s in FIVE}
    pool = SiteThreads()
    for site in FIVE:
        pool.start(answer_loop, harness.session(server, site, receive_timeout_s=60), echo, rounds[site])
    outcome = server.wait(60)
    pool.join()
    assert outcome is not None and not outcome.failed, outcome
    # Sites that were not sampled stayed in the job (joined, waiting in is_running()) until it ended.
    assert {s: st.status for s, st in server.registry.sites.items()} == dict.fromkeys(FIVE, SiteStatus.JOINED)
    return server, {s: [m.current_round for m in models] for s, models in rounds.items()}


def test_clients_per_round_samples_that_many_sites_each_round_deterministically(harness):
    first, received = _run_sampled_job(harness, "server-a", seed=11)
    history = first.controller.history
    assert [r.round for r in history] == [0, 1, 2, 3] and all(r.task == "train" for r in history)
    for record in history:
        assert len(record.sites) == 2 and set(record.sites) <= set(FIVE), record
        assert sorted(record.metrics) == sorted(record.sites), record  # every sampled site answered
        assert not record.failed
    # A site got a task in exactly the rounds it was sampled for; otherwise its script kept waiting.
    for site in FIVE:
        assert received[site] == [r.round for r in history if site in r.sites], site
    assert len({frozenset(r.sites) for r in history}) > 1, "the sample never changed across rounds"

    second, _ = _run_sampled_job(harness, "server-b", seed=11)
    assert [r.sites for r in second.controller.history] == [r.sites for r in history]


def test_mandatory_clients_are_in_every_sample(harness):
    server, received = _run_sampled_job(harness, "server", seed=3, mandatory_clients=["site-4"])
    history = server.controller.history
    assert all("site-4" in r.sites and len(r.sites) == 2 for r in history), [r.sites for r in history]
    assert received["site-4"] == [0, 1, 2, 3]
    assert len({frozenset(r.sites) for r in history}) > 1  # the other place still varies


# --------------------------------------------------------------------------- 2. mandatory_clients


THREE = ["site-1", "site-2", "site-3"]


@pytest.mark.parametrize("how", ["result rejected", "failure reported"])
def test_failed_mandatory_site_fails_the_job_even_when_min_clients_allows_going_on(harness, how):
    server = start_server(harness, THREE, num_rounds=2, min_clients=1, mandatory_clients=["site-2"])
    sessions = {s: harness.session(server, s) for s in THREE}
    for session in sessions.values():
        session.connect(timeout=WAIT_S)
    for session in sessions.values():
        assert session.receive(timeout=WAIT_S) is not None
    sessions["site-1"].send(FLModel(params=scaled(2)))
    if how == "result rejected":
        with pytest.raises(ResultRejectedError, match="site-2: tensor 'w' has shape"):
            sessions["site-2"].send(FLModel(params=BAD_SHAPE))
    else:
        sessions["site-2"].close(failure="RuntimeError: CUDA out of memory")
    sessions["site-3"].send(FLModel(params=scaled(2)))  # not blamed: the job may have ended already
    outcome = server.wait(WAIT_S)
    assert outcome is not None and outcome.failed
    assert "mandatory site site-2 failed" in outcome.reason, outcome.reason
    assert ("result rejected" if how == "result rejected" else "CUDA out of memory") in outcome.reason
    assert server.controller.history == []  # round 0 was never completed


def test_mandatory_site_failing_before_it_joins_fails_the_job_before_any_round(harness):
    server = start_server(harness, THREE, num_rounds=1, min_clients=1, mandatory_clients=["site-2"])
    others = [harness.session(server, s) for s in ("site-1", "site-3")]
    for session in others:
        session.connect(timeout=WAIT_S)
    reporter = harness.session(server, "site-2")  # its script died before flkit.init()
    reporter.transport.report_failure("site-2", server.job_id, server.token, "", "ImportError: no module named x",
                                      timeout=WAIT_S)
    outcome = server.wait(WAIT_S)
    assert outcome is not None and outcome.failed
    assert "mandatory site site-2 failed: ImportError: no module named x" in outcome.reason, outcome.reason
    assert all(s.receive(timeout=WAIT_S) is None for s in others)  # no round was started


def test_failed_non_mandatory_site_with_min_clients_1_does_not_fail_the_job(harness):
    server = start_server(harness, THREE, num_rounds=2, min_clients=1)
    sessions = {s: harness.session(server, s) for s in THREE}
    for session in sessions.values():
        session.connect(timeout=WAIT_S)
    for session in sessions.values():
        assert session.receive(timeout=WAIT_S) is not None
    with pytest.raises(ResultRejectedError):
        sessions["site-2"].send(FLModel(params=BAD_SHAPE))
    for site in ("site-1", "site-3"):
        sessions[site].send(FLModel(params=scaled(2)))
    for site in ("site-1", "site-3"):  # round 1 goes on without site-2
        answer(sessions[site], "train", lambda m: FLModel(params=scaled(3)))
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    history = server.controller.history
    assert "site-2" in history[0].failed and sorted(history[0].metrics) == ["site-1", "site-3"]
    assert history[1].sites == ["site-1", "site-3"]
    assert_params(load_params(server.persistor.global_model_path), scaled(3))


def test_mandatory_site_that_leaves_after_a_round_fails_the_job(harness):
    server = start_server(harness, THREE, num_rounds=2, min_clients=1, mandatory_clients=["site-2"])
    sessions = {s: harness.session(server, s) for s in THREE}
    for session in sessions.values():
        session.connect(timeout=WAIT_S)
    for session in sessions.values():
        assert session.receive(timeout=WAIT_S) is not None
    # site-2 answers round 0 first and its script ends; round 0 is still open (site-1/3 pending),
    # so it leaves holding no task.
    sessions["site-2"].send(FLModel(params=scaled(2)))
    sessions["site-2"].close()
    for site in ("site-1", "site-3"):
        sessions[site].send(FLModel(params=scaled(2)))
    for site in ("site-1", "site-3"):
        model = sessions[site].receive(timeout=5)
        if model is not None:
            sessions[site].send(FLModel(params=scaled(3)))
    outcome = server.wait(WAIT_S)
    assert outcome is not None
    assert outcome.failed and "site-2" in outcome.reason, (outcome, [r.sites for r in server.controller.history])


# --------------------------------------------------------------------------- 3. aggregation_weights


def test_aggregation_weights_multiply_the_step_counts(harness):
    weights = {"site-1": 2.0, "site-3": 0.25}  # site-2 is not listed: factor 1
    steps = {"site-1": 1, "site-2": 3, "site-3": 4}
    sent = {"site-1": scaled(1.0), "site-2": scaled(2.0), "site-3": scaled(-7.0, 1.0)}
    server = start_server(harness, THREE, num_rounds=1, aggregation_weights=weights)
    sessions = {s: harness.session(server, s) for s in THREE}
    for session in sessions.values():
        session.connect(timeout=WAIT_S)
    for site, session in sessions.items():
        answer(session, "train", lambda m, site=site: FLModel(params=sent[site],
                                                              meta={"NUM_STEPS_CURRENT_ROUND": steps[site]}))
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome

    factor = {s: steps[s] * weights.get(s, 1.0) for s in THREE}  # 2, 3, 1
    total = sum(factor.values())
    expected = {k: sum(sent[s][k].double() * factor[s] for s in THREE) / total for k in INITIAL}
    saved = load_params(server.persistor.global_model_path)
    for name, value in expected.items():
        torch.testing.assert_close(saved[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
    # Not the steps-only mean: the weights made a difference.
    steps_only = sum(sent[s]["w"].double() * steps[s] for s in THREE) / sum(steps.values())
    assert not torch.allclose(saved["w"].double(), steps_only)


# --------------------------------------------------------------------------- 4. start_round


def test_start_round_numbers_the_rounds(harness):
    server = start_server(harness, ["site-1"], num_rounds=2, start_round=3)
    session = harness.session(server, "site-1")
    seen: list[FLModel] = []
    answer_loop(session, lambda m: FLModel(params=scaled(m.current_round)), seen)
    assert [(m.current_round, m.total_rounds) for m in seen] == [(3, 5), (4, 5)]
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    assert [r.round for r in server.controller.history] == [3, 4]
    state = json.loads(server.persistor.state_path.read_text())
    assert state["completed_rounds"] == 2 and state["status"] == "completed"
    assert_params(load_params(server.persistor.global_model_path), scaled(4))


def test_start_round_progress_line_counts_within_the_job(harness):
    out = io.StringIO()
    printer = ProgressPrinter(Console(file=out, width=200, color_system=None))
    server = start_server(harness, ["site-1"], num_rounds=2, start_round=3, on_event=printer)
    answer_loop(harness.session(server, "site-1"), echo, [])
    assert not server.wait(WAIT_S).failed
    fractions = [tuple(map(int, m)) for m in re.findall(r"round \d+ \((\d+)/(\d+)\)", out.getvalue())]
    assert len(fractions) == 2, out.getvalue()
    assert all(done <= total for done, total in fractions), out.getvalue()


def test_start_round_total_rounds_agree_between_config_and_tasks(harness):
    server = start_server(harness, ["site-1"], num_rounds=2, start_round=3)
    session = harness.session(server, "site-1")
    model = answer(session, "train", echo)
    assert session.job_config["total_rounds"] == model.total_rounds


# --------------------------------------------------------------------------- 5. one worker, header peeks


def test_a_header_peek_does_not_take_the_task(harness):
    """A launcher that starts one process per task (launch_once=False) peeks at the task's header;
    the task stays there for the process it then starts."""
    server = start_server(harness, ["site-1"], num_rounds=1)
    session = harness.session(server, "site-1")
    peek = session.peek_task(timeout=WAIT_S)
    assert peek is not None and peek.name == "train" and peek.round == 0 and peek.params is None
    again = session.peek_task(timeout=WAIT_S)
    assert again is not None and again.task_id == peek.task_id
    model = session.receive(timeout=WAIT_S)
    assert model is not None and model.current_round == 0
    session.send(FLModel(params=scaled(2)))
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome


def _non_overlapping(intervals: list[tuple[float, float, str]]) -> None:
    ordered = sorted(intervals)
    for (_, end_a, who_a), (start_b, _, who_b) in zip(ordered, ordered[1:], strict=False):
        assert end_a <= start_b, f"{who_a} held a task until {end_a:.4f} but {who_b} got one at {start_b:.4f}"


def test_simulator_threads_1_runs_one_site_at_a_time_and_every_site_answers(tmp_path):
    job = FedAvgJob(name="threads1", initial_model=dict(INITIAL), n_clients=3, num_rounds=2, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "wf_hold.py")))
    result = job.simulator_run(tmp_path / "ws", threads=1, quiet=True)
    assert result.ok, result.reason
    assert [(r.round, r.task, sorted(r.metrics)) for r in result.rounds] == [
        (0, "train", THREE), (1, "train", THREE)]
    holds = []
    for site in THREE:
        lines = [json.loads(x) for x in (tmp_path / "ws" / site / "holds.jsonl").read_text().splitlines()]
        assert [x["round"] for x in lines] == [0, 1], site
        holds += [(x["start"], x["end"], f"{site}/round {x['round']}") for x in lines]
    _non_overlapping(holds)


# --------------------------------------------------------------------------- 6. cross-site evaluation

TWO = ["site-1", "site-2"]
SITE_MODELS = {"site-1": scaled(1.0, 10.0), "site-2": scaled(1.0, -10.0)}
SRV_GLOBAL = "SRV_FL_global_model.safetensors"
SRV_BEST = "SRV_best_FL_global_model.safetensors"


def _score(site: str, model_name: str) -> dict[str, float]:
    """A distinct, recognisable score per (evaluator, model)."""
    return {"accuracy": round(0.1 * (TWO.index(site) + 1) + 0.01 * len(model_name), 4)}


def _train_round(sessions: dict[str, Session]) -> None:
    """Round 0: site-1 sends 2x, site-2 4x the initial model (global: 3x; best: the initial model)."""
    for factor, (site, session) in zip((2.0, 4.0), sessions.items(), strict=True):
        answer(session, "train", lambda m, f=factor, s=site: FLModel(params=scaled(f),
                                                                     metrics={"accuracy": 0.6 if s == "site-1"
                                                                              else 0.8}))


def _validate_all(sessions: dict[str, Session], models: list[str], server: FLServer,
                  submitted: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every session answers one validate task per model, in order, checking what each carries."""
    for model_name in models:
        for site, session in sessions.items():
            got = answer(session, "validate", lambda m, s=site: FLModel(metrics=_score(s, m.meta["model_name"])))
            assert got.meta["model_name"] == model_name, (site, got.meta)
            if model_name == SRV_GLOBAL:
                expected = load_params(server.persistor.global_model_path)
            elif model_name == SRV_BEST:
                expected = load_params(server.persistor.best_model_path)
            else:
                expected = submitted[model_name]
            assert_params(got.params, expected)


def _cross_site_server(harness: ServerHarness, sites=TWO, **cse):
    kw = {k: cse.pop(k) for k in ("key_metric",) if k in cse}
    server = start_server(harness, sites, num_rounds=1, cross_site_eval={"validation_timeout_s": 60,
                                                                         "submit_model_timeout_s": 60, **cse}, **kw)
    sessions = {s: harness.session(server, s) for s in sites}
    for session in sessions.values():
        session.connect(timeout=WAIT_S)
    return server, sessions


def _results(server: FLServer) -> tuple[dict, dict | None]:
    folder = server.persistor.directory / "cross_site_val"
    errors = folder / "errors.json"
    return (json.loads((folder / "cross_val_results.json").read_text()),
            json.loads(errors.read_text()) if errors.exists() else None)


def test_cross_site_evaluation_scores_every_model_at_every_site(harness):
    server, sessions = _cross_site_server(harness)
    _train_round(sessions)
    for site, session in sessions.items():
        got = answer(session, "submit_model", lambda m, s=site: FLModel(params=SITE_MODELS[s]))
        assert got.params is None and got.current_round == 0
    models = [SRV_GLOBAL, SRV_BEST, "site-1", "site-2"]
    _validate_all(sessions, models, server, SITE_MODELS)
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome

    # The server models are what the round produced: the 3x global and the initial (best) model.
    assert_params(load_params(server.persistor.global_model_path), scaled(3.0))
    assert_params(load_params(server.persistor.best_model_path), INITIAL)
    results, errors = _results(server)
    assert results == {site: {m: _score(site, m) for m in models} for site in TWO}  # NVFlare's shape
    assert errors is None
    for site in TWO:
        stored = server.persistor.directory / "cross_site_val" / "models" / f"{site}.safetensors"
        assert_params(load_params(stored), SITE_MODELS[site])
    assert all(s.receive(timeout=WAIT_S) is None for s in sessions.values())  # then the job ends


def test_site_answering_submit_model_without_params_is_not_scored(harness):
    server, sessions = _cross_site_server(harness)
    _train_round(sessions)
    answer(sessions["site-1"], "submit_model", lambda m: FLModel(params=SITE_MODELS["site-1"]))
    answer(sessions["site-2"], "submit_model", lambda m: FLModel(metrics={}))
    models = [SRV_GLOBAL, SRV_BEST, "site-1"]
    _validate_all(sessions, models, server, SITE_MODELS)
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    results, errors = _results(server)
    assert results == {site: {m: _score(site, m) for m in models} for site in TWO}
    assert errors == {"site-2": {"submit_model": "answered without params"}}


def test_submit_model_false_scores_only_the_server_models(harness):
    server, sessions = _cross_site_server(harness, submit_model=False)
    _train_round(sessions)
    _validate_all(sessions, [SRV_GLOBAL, SRV_BEST], server, {})  # the first task after training is validate
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    results, _ = _results(server)
    assert results == {site: {m: _score(site, m) for m in (SRV_GLOBAL, SRV_BEST)} for site in TWO}


def test_participating_clients_limit_the_evaluators(harness):
    server, sessions = _cross_site_server(harness, participating_clients=["site-2"])
    _train_round(sessions)
    answer(sessions["site-2"], "submit_model", lambda m: FLModel(params=SITE_MODELS["site-2"]))
    _validate_all({"site-2": sessions["site-2"]}, [SRV_GLOBAL, SRV_BEST, "site-2"], server, SITE_MODELS)
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    assert sessions["site-1"].receive(timeout=WAIT_S) is None  # site-1 got no cross-site task
    results, _ = _results(server)
    assert results == {"site-2": {m: _score("site-2", m) for m in (SRV_GLOBAL, SRV_BEST, "site-2")}}


def test_without_key_metric_there_is_no_best_model_to_score(harness):
    server, sessions = _cross_site_server(harness, key_metric=None)
    _train_round(sessions)
    for site, session in sessions.items():
        answer(session, "submit_model", lambda m, s=site: FLModel(params=SITE_MODELS[s]))
    models = [SRV_GLOBAL, "site-1", "site-2"]
    _validate_all(sessions, models, server, SITE_MODELS)
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    assert not server.persistor.best_model_path.exists()
    results, _ = _results(server)
    assert results == {site: {m: _score(site, m) for m in models} for site in TWO}


def test_cross_site_failures_are_noted_and_do_not_fail_the_job(harness):
    """site-2's model is refused (which fails site-2: it scores nothing more); site-1 then crashes
    holding the last validate task. Both are noted, and the trained job still completes."""
    server, sessions = _cross_site_server(harness)
    s1, s2 = sessions["site-1"], sessions["site-2"]
    _train_round(sessions)
    answer(s1, "submit_model", lambda m: FLModel(params=SITE_MODELS["site-1"]))
    with pytest.raises(ResultRejectedError, match="site-2: tensor 'w' has shape"):
        answer(s2, "submit_model", lambda m: FLModel(params=BAD_SHAPE))
    s2.close(failure="RuntimeError: my model was refused")
    _validate_all({"site-1": s1}, [SRV_GLOBAL, SRV_BEST], server, {})
    last = s1.receive(timeout=WAIT_S)
    assert last is not None and last.meta["model_name"] == "site-1"
    s1.close(failure="RuntimeError: the evaluation crashed")
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    results, errors = _results(server)
    assert results == {"site-1": {m: _score("site-1", m) for m in (SRV_GLOBAL, SRV_BEST)}, "site-2": {}}
    assert sorted(errors) == ["site-1", "site-2"]
    assert "result rejected" in errors["site-2"]["submit_model"]
    assert "the evaluation crashed" in errors["site-1"]["site-1"]
    assert not (server.persistor.directory / "cross_site_val" / "models" / "site-2.safetensors").exists()


def test_site_crashing_during_cross_site_does_not_stall_or_fail_the_job(harness):
    server, sessions = _cross_site_server(harness)  # validation_timeout_s=60
    s1, s2 = sessions["site-1"], sessions["site-2"]
    _train_round(sessions)
    answer(s1, "submit_model", lambda m: FLModel(params=SITE_MODELS["site-1"]))
    assert s2.receive(timeout=WAIT_S) is not None and s2.task_name == "submit_model"
    s2.close(failure="RuntimeError: the site's script crashed")  # holding its submit_model task
    for model_name in (SRV_GLOBAL, SRV_BEST, "site-1"):
        got = s1.receive(timeout=3)  # each next model comes at once: site-2 is gone, nothing to wait for
        assert got is not None and got.meta["model_name"] == model_name, (model_name, got)
        s1.send(FLModel(metrics=_score("site-1", model_name)))
    outcome = server.wait(3)
    assert outcome is not None and not outcome.failed, outcome
    results, errors = _results(server)
    assert results["site-1"] == {m: _score("site-1", m) for m in (SRV_GLOBAL, SRV_BEST, "site-1")}
    assert "script crashed" in errors["site-2"]["submit_model"]


# --------------------------------------------------------------------------- 7. tracking records


def test_in_process_job_streams_every_writer_to_tensorboard_and_keeps_local_records(tmp_path):
    job = FedAvgJob(name="tracked", initial_model=dict(INITIAL), n_clients=2, num_rounds=2, analytics_receiver=True)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "wf_tracking.py")))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    ws = tmp_path / "ws"
    assert sorted(p.name for p in (ws / "server" / "tb_events").iterdir()) == TWO
    for i, site in enumerate(TWO):
        off = 10.0 * i
        got = scalars(ws / "server" / "tb_events" / site)
        assert got == {
            "loss": [(0, off + 1.0), (1, off + 0.5)],
            "acc": [(0, off + 0.5), (1, off + 0.75)],
            "f1": [(0, off + 0.25), (1, off + 0.5)],
            "custom": [(0, off), (1, off + 2.0)],
            "walltime_kw": [(0, off)],
            "after_job": [(9, off + 7.0)],
        }, site
        records = [json.loads(line) for line in (ws / site / "tracking.jsonl").read_text().splitlines()]
        assert all(r["site"] == site for r in records)
        per_round = [(key, kind, step) for rnd in (0, 1) for key, kind, step in (
            ("loss", "SCALAR", rnd), ("acc", "METRIC", rnd), ("params", "PARAMETERS", None),
            ("stage", "TAG", None), ("metrics", "METRICS", rnd), ("custom", "SCALAR", rnd))]
        assert [(r["key"], r["type"], r["step"]) for r in records] == \
            per_round[:6] + [("walltime_kw", "SCALAR", 0)] + per_round[6:] + [("after_job", "SCALAR", 9)]
        assert records[6]["time"] == 1234.5  # SummaryWriter's walltime is the record's time
        assert records[2]["value"] == {"lr": 0.1, "opt": "sgd"} and records[3]["value"] == "round-0"
        refused = json.loads((ws / site / "refused.json").read_text())
        assert refused["nan"] == "ValidationError: tracking record 'x' value must be a finite number, got nan"
        assert refused["text"] == "ValidationError: tracking record 'x' value must be a finite number, got 'high'"
        assert refused["kwarg_warnings"] == ["flare.log: new_style is accepted but has no effect in flkit: the "
                                             "receivers write each record as it is"]


def _raw_log_metrics(server: FLServer, session_id: str, records_json: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        pb_grpc.FLKitStub(channel).LogMetrics(pb.MetricsBatch(session_id=session_id, records_json=records_json),
                                              timeout=WAIT_S)


GOOD_RECORD = {"key": "loss", "value": 0.5, "type": "SCALAR", "step": 1, "time": 1_700_000_000.0}
MALFORMED_BATCHES = {
    "invalid JSON": ("[{\"key\": ", "not valid JSON"),
    "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "not an array": (json.dumps(GOOD_RECORD), "must be a JSON array"),
    "unknown field": (json.dumps([{**GOOD_RECORD, "colour": "red"}]), "unknown fields ['colour']"),
    "NaN value": ('[{"key": "loss", "value": NaN, "type": "SCALAR"}]', "must be a finite number"),
    "text path with ..": (json.dumps([{"key": "t", "value": "hi", "type": "TEXT", "path": "../../escape.txt"}]),
                          "without '..'"),
}


@pytest.mark.parametrize("case", list(MALFORMED_BATCHES))
def test_log_metrics_refuses_malformed_batches(harness, case):
    text, message = MALFORMED_BATCHES[case]
    server = harness.start(INITIAL, ["site-1"], num_rounds=1, tracking=[{"type": "tensorboard", "config": {}}])
    session = harness.session(server, "site-1")
    session.connect(timeout=WAIT_S)
    _raw_log_metrics(server, session._session_id, json.dumps([GOOD_RECORD]))  # a good batch is taken
    with pytest.raises(grpc.RpcError) as refused:
        _raw_log_metrics(server, session._session_id, text)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    answer(session, "train", echo)  # the job is unharmed
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    assert not list(harness.tmp_path.rglob("escape.txt"))


def test_log_metrics_from_an_unknown_session_is_not_found(harness):
    server = harness.start(INITIAL, ["site-1"], num_rounds=1)
    with pytest.raises(grpc.RpcError) as refused:
        _raw_log_metrics(server, "0" * 32, json.dumps([GOOD_RECORD]))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_client_side_tracking_writes_only_in_the_listed_sites_folder(harness):
    server = harness.start(INITIAL, TWO, num_rounds=1, client_tracking=[
        {"type": "tensorboard", "config": {}, "clients": ["site-1"]}])
    sessions = {s: harness.session(server, s) for s in TWO}
    for step, session in enumerate(sessions.values()):
        session.connect(timeout=WAIT_S)
        write_record(session, "loss", 0.5 + step, AnalyticsDataType.SCALAR, global_step=3)
    assert sessions["site-1"].job_config["client_tracking"] == [{"type": "tensorboard", "config": {}}]
    assert sessions["site-2"].job_config["client_tracking"] == []
    for session in sessions.values():
        answer(session, "train", echo)
    outcome = server.wait(WAIT_S)
    assert outcome is not None and not outcome.failed, outcome
    for session in sessions.values():
        session.close()  # flushes the site's own receivers
    tmp = harness.tmp_path
    assert scalars(tmp / "site-1" / "tb_events" / "site-1") == {"loss": [(3, 0.5)]}
    assert not (tmp / "site-2" / "tb_events").exists()
    assert not (tmp / "server" / "tb_events").exists()  # nothing was sent to (or written by) the server
    for site in TWO:  # both keep their local record
        assert len((tmp / site / "tracking.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------- 8. site settings from the runner


def test_framework_numpy_gives_and_takes_numpy_arrays(tmp_path):
    job = FedAvgJob(name="numpy", initial_model=dict(INITIAL), n_clients=2, num_rounds=2, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "wf_numpy.py"), framework="numpy"))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    saved = load_params(result.global_model_path)
    assert all(v.dtype == torch.float32 for v in saved.values())
    assert_params(saved, scaled(1.0, 2.0))


def _delta_job(tmp_path: Path, name: str, site1_transfer: str, sent_as: dict[str, set[str]]) -> Path:
    sent_as.clear()
    job = FedAvgJob(name=name, initial_model=dict(INITIAL), n_clients=2, num_rounds=2, key_metric=None)
    job.to(ScriptRunner(script=str(SCRIPTS / "wf_delta.py"), params_transfer_type=site1_transfer), "site-1")
    job.to(ScriptRunner(script=str(SCRIPTS / "wf_delta.py")), "site-2")
    result = job.simulator_run(tmp_path / name, quiet=True)
    assert result.ok, result.reason
    return result.global_model_path


def test_diff_transfer_on_one_site_gives_the_same_global_model(tmp_path, monkeypatch):
    sent_as: dict[str, set[str]] = {}  # site -> params types the server's FedAvg was given
    original = WeightedMean.add

    def spy(self, result):
        sent_as.setdefault(result.site, set()).add(ParamsType(result.params_type).value)
        return original(self, result)

    monkeypatch.setattr(WeightedMean, "add", spy)
    full_path = _delta_job(tmp_path, "all_full", "FULL", sent_as)
    assert sent_as == {"site-1": {"FULL"}, "site-2": {"FULL"}}
    diff_path = _delta_job(tmp_path, "one_diff", "DIFF", sent_as)
    assert sent_as == {"site-1": {"DIFF"}, "site-2": {"FULL"}}
    expected = scaled(1.0, -2.0 - 4.0)  # steps-weighted shifts: (1 - 9)/4 = -2, then (2 - 18)/4 = -4
    assert_params(load_params(full_path), expected)
    assert_params(load_params(diff_path), expected)


@pytest.fixture
def gc_calls(monkeypatch) -> list[int]:
    """Calls of gc.collect() made by sessions (the module's gc is replaced by a counter)."""
    calls: list[int] = []
    monkeypatch.setattr(session_module, "gc", types.SimpleNamespace(collect=lambda *a: calls.append(1)))
    return calls


def test_memory_gc_rounds_collects_after_every_nth_answered_task(harness, gc_calls):
    server = harness.start(INITIAL, ["site-1"], num_rounds=4)
    session = harness.session(server, "site-1", memory_gc_rounds=2)
    counts = []
    for _ in range(4):
        answer(session, "train", echo)
        counts.append(len(gc_calls))
    assert counts == [0, 1, 1, 2]
    assert not server.wait(WAIT_S).failed


def test_memory_gc_rounds_from_the_script_runner(tmp_path, gc_calls):
    job = FedAvgJob(name="gc", initial_model=dict(INITIAL), n_clients=1, num_rounds=3, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "wf_numpy.py"),
                                framework="numpy", memory_gc_rounds=1))
    result = job.simulator_run(tmp_path / "ws", quiet=True, backend="threads")  # gc_calls counts in this process
    assert result.ok, result.reason
    assert len(gc_calls) == 3  # once after each answered task


# --------------------------------------------------------------------------- 9. external-process runners


def test_launcher_command_runs_from_the_site_folder_and_clean_up_runs_after(tmp_path):
    launcher = SubprocessLauncher(script="python3 -u custom/wf_ext_launch.py",
                                  clean_up_script="python3 -c \"open('cleaned','w').write('x')\"")
    job = FedAvgJob(name="launcher", initial_model=dict(INITIAL), n_clients=1, num_rounds=1, key_metric=None)
    job.to_clients(BaseScriptRunner(script=str(SCRIPTS / "wf_ext_launch.py"), launch_external_process=True,
                                    launcher=launcher))
    result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    site_dir = (tmp_path / "ws" / "site-1").resolve()
    launched = json.loads((site_dir / "launched.json").read_text())
    assert launched == {"cwd": str(site_dir), "argv0": "custom/wf_ext_launch.py"}
    assert (site_dir / "cleaned").read_text() == "x"
    log = (site_dir / "output.log").read_text()
    assert re.search(r"=== flkit launch 1: \S*python\S* -u custom/wf_ext_launch\.py\n", log), log
    assert log.index("=== flkit launch 1") < log.index("=== flkit clean-up")


@pytest.mark.slow
def test_shutdown_timeout_lets_a_script_finish_after_the_job(tmp_path, caplog):
    """The script works 12 s after the job ended: longer than the simulator's 10 s grace, within
    shutdown_timeout=20. It must be left to finish and write its file."""
    job = FedAvgJob(name="late", initial_model=dict(INITIAL), n_clients=1, num_rounds=1, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "wf_late_exit.py"), script_args="12",
                                launch_external_process=True, shutdown_timeout=20))
    with caplog.at_level("WARNING", logger="flkit.sim"):
        result = job.simulator_run(tmp_path / "ws", quiet=True)
    assert result.ok, result.reason
    assert (tmp_path / "ws" / "site-1" / "late_done").read_text() == "done"
    assert not [r for r in caplog.records if "stopping it" in r.getMessage()]
    assert result.site_errors == {}


@pytest.mark.parametrize("option", ["launch_timeout", "init_timeout_s"])
def test_launch_timeout_fails_a_script_that_never_calls_init(tmp_path, option):
    job = FedAvgJob(name="noinit", initial_model=dict(INITIAL), n_clients=1, num_rounds=1, key_metric=None)
    job.to_clients(ScriptRunner(script=str(SCRIPTS / "wf_never_init.py"), launch_external_process=True,
                                **{option: 2}))
    started = time.monotonic()
    with pytest.raises(JobFailedError, match=r"wf_never_init\.py did not call flkit\.init\(\) within 2 s"):
        job.simulator_run(tmp_path / "ws", quiet=True)
    assert time.monotonic() - started < 20
    assert "loading a very large dataset" in (tmp_path / "ws" / "site-1" / "output.log").read_text()
