"""The Strategy plans each round: per-site config reaches the script's FLModel.meta, a custom
strategy is named in job.json and shipped in the job folder, bad plans fail clearly, the
strategy's state is written after every round, and the sample of sites is seeded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import flkit.strategy as fs
from flkit.errors import ConfigError
from flkit.job import FedAvgJob, ScriptRunner
from flkit.job.config import load_job
from flkit.model import FLModel
from flkit.server.persistor import load_params
from flkit.strategy.fedavg import FedAvg

INITIAL = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}
SITES = ["site-1", "site-2", "site-3"]


@fs.register("test-per-site-lr")
class PerSiteLr(FedAvg):
    """Each site gets its own learning rate, halved every round; counts the rounds it planned."""

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = lr
        self.planned = 0

    def configure_train(self, round_num, sites, rng):
        self.planned += 1
        return {site: {"lr": self.lr * (i + 1) * 0.5 ** round_num} for i, site in enumerate(sites)}

    def state_dict(self):
        return {"planned": self.planned}


def _run_sites(harness, server, sites, reply, keep=True):
    """Each site answers every task with ``reply(site, model)``; returns what each received (with
    ``keep=False`` nothing: a site then drops each model once answered, as a script does)."""
    seen: dict[str, list[FLModel]] = {s: [] for s in sites}
    errors: list[BaseException] = []

    def loop(site: str) -> None:
        try:
            session = harness.session(server, site)
            while session.is_running():
                model = session.receive(timeout=30)
                if model is None:
                    break
                if keep:
                    seen[site].append(model)
                session.send(reply(site, model))
                del model
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(s,)) for s in sites]
    for t in threads:
        t.start()
    outcome = server.wait(60)
    for t in threads:
        t.join(30)
    assert not errors, errors
    return outcome, seen


def test_each_site_reads_its_own_config_from_meta_and_the_state_is_saved(harness):
    strategy = PerSiteLr(lr=0.2)
    server = harness.start(INITIAL, SITES, num_rounds=3, strategy=strategy)

    def reply(site, model):  # a script that trains with the lr it was given: it adds lr
        return FLModel(params={k: v + model.meta["lr"] for k, v in model.params.items()}, metrics={"accuracy": 0.5})

    outcome, seen = _run_sites(harness, server, SITES, reply)
    assert outcome is not None and not outcome.failed, outcome
    for i, site in enumerate(SITES):
        assert [m.meta["lr"] for m in seen[site]] == [0.2 * (i + 1) * 0.5 ** r for r in range(3)], site
    # The mean of the sites' additions, round after round: (0.2 + 0.4 + 0.6) / 3 * (1 + 0.5 + 0.25).
    expected = torch.full((3,), 0.4 * 1.75)
    torch.testing.assert_close(load_params(server.persistor.global_model_path)["b"], expected)
    state = json.loads(server.persistor.state_path.read_text())
    assert state["strategy"] == {"name": "test-per-site-lr", "state": {"planned": 3}}


class _Plans(FedAvg):
    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan

    def configure_train(self, round_num, sites, rng):
        return self.plan(list(sites))


@pytest.mark.parametrize(("plan", "message"), [
    (lambda sites: {**{s: {} for s in sites}, "site-9": {}}, "chose site(s) not offered this round: site-9"),
    (lambda sites: {"site-2": {}}, "chose 1 site(s); the round needs at least 2"),
    (lambda sites: {s: {"x": object()} for s in sites}, "is not JSON-able"),
    (lambda sites: {s: {"x": float("nan")} for s in sites}, "is not JSON-able"),
    (lambda sites: 1 / 0, "configure_train failed: ZeroDivisionError"),
    (lambda sites: {s: {} for s in sites if s != "site-2"}, "left out mandatory site(s) site-2"),
])
def test_a_bad_plan_fails_the_job_with_a_message_that_names_it(harness, plan, message):
    server = harness.start(INITIAL, SITES, num_rounds=1, min_clients=2, mandatory_clients=["site-2"],
                           strategy=_Plans(plan=plan))
    outcome, seen = _run_sites(harness, server, SITES, lambda site, m: FLModel(params=m.params))
    assert outcome is not None and outcome.failed
    assert message in outcome.reason and "_Plans.configure_train" in outcome.reason, outcome.reason
    assert not any(seen.values())  # no site was given a task of a plan that was refused


def test_a_strategy_that_drops_sites_trains_with_the_rest(harness):
    server = harness.start(INITIAL, SITES, num_rounds=2, min_clients=1,
                           strategy=_Plans(plan=lambda sites: {sites[0]: {}}))
    outcome, seen = _run_sites(harness, server, SITES,
                               lambda site, m: FLModel(params={k: v + 1 for k, v in m.params.items()}))
    assert outcome is not None and not outcome.failed, outcome
    assert [r.sites for r in server.controller.history] == [["site-1"], ["site-1"]]
    assert len(seen["site-1"]) == 2 and not seen["site-2"] and not seen["site-3"]


def test_fraction_offers_a_seeded_share_of_the_sites(harness):
    sites = [f"site-{i}" for i in range(1, 11)]

    def run(out: str, seed: int) -> list[list[str]]:
        harness.tmp_path = harness.tmp_path.parent / out
        server = harness.start(INITIAL, sites, num_rounds=3, fraction=0.25, min_clients=2, seed=seed)
        outcome, _ = _run_sites(harness, server, sites, lambda site, m: FLModel(params=m.params))
        assert outcome is not None and not outcome.failed, outcome
        return [r.sites for r in server.controller.history]

    first = run("a", seed=5)
    assert all(len(r) == 3 for r in first), first  # ceil(0.25 * 10)
    assert first == run("b", seed=5)
    assert first != run("c", seed=6)


def test_clients_per_round_and_fraction_are_exclusive():
    from flkit.server.config import WorkflowConfig

    with pytest.raises(ConfigError, match="not both"):
        WorkflowConfig(clients_per_round=2, fraction=0.5)
    with pytest.raises(ConfigError, match=r"fraction must be a number in \(0, 1\]"):
        WorkflowConfig(fraction=1.5)


def test_the_registry_refuses_what_a_job_could_not_name():
    with pytest.raises(ConfigError, match="unknown strategy 'no-such'; known: .*fedavg"):
        fs.create("no-such")
    with pytest.raises(ConfigError, match="cannot be built with arguments"):
        fs.create("fedavg", {"lr": 1})
    with pytest.raises(ConfigError, match="JSON values"):
        fs.create("test-per-site-lr", {"lr": float("inf")})
    with pytest.raises(ConfigError, match="is not allowed"):
        fs.register("Bad Name")
    with pytest.raises(TypeError, match="by name"):
        PerSiteLr(0.1)

    class Unregistered(FedAvg):
        pass

    with pytest.raises(ConfigError, match="not a registered strategy"):
        fs.spec_of(Unregistered())
    with pytest.raises(ConfigError, match="already taken"):
        fs.register("fedavg")(Unregistered)
    assert fs.spec_of(PerSiteLr(lr=0.5)) == {"name": "test-per-site-lr", "args": {"lr": 0.5}}


STRATEGY_FILE = '''
import flkit.strategy as fs
from flkit.strategy.fedavg import FedAvg


@fs.register("test-scaled-steps")
class ScaledSteps(FedAvg):
    def __init__(self, steps=1):
        super().__init__()
        self.steps = steps

    def configure_train(self, round_num, sites, rng):
        return {site: {"local_steps": self.steps * (round_num + 1)} for site in sites}
'''

SITE_SCRIPT = '''
import json
import os
import flkit as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    with open(os.path.join(os.environ["META_DIR"], flare.get_site_name() + ".jsonl"), "a") as f:
        f.write(json.dumps({"round": model.current_round, "local_steps": model.meta.get("local_steps")}) + "\\n")
    flare.send(flare.FLModel(params={k: v + 1 for k, v in model.params.items()}, metrics={"accuracy": 0.5}))
'''


def _custom_job(tmp_path: Path, **kwargs) -> FedAvgJob:
    (tmp_path / "scaled_steps.py").write_text(STRATEGY_FILE)
    (tmp_path / "site.py").write_text(SITE_SCRIPT)
    job = FedAvgJob(name="custom", initial_model=torch.nn.Linear(3, 2), n_clients=2, num_rounds=2,
                    strategy="test-scaled-steps", strategy_file=tmp_path / "scaled_steps.py", **kwargs)
    job.to_clients(ScriptRunner(str(tmp_path / "site.py")))
    return job


def test_a_custom_strategy_travels_in_the_job_folder_and_runs_from_the_command_line(tmp_path):
    job = _custom_job(tmp_path, strategy_args={"steps": 3})
    out = job.export_job(tmp_path / "jobs")
    spec = json.loads((out / "job.json").read_text())["strategy"]
    assert spec == {"name": "test-scaled-steps", "args": {"steps": 3}, "file": "custom/scaled_steps.py"}
    # A fresh process knows nothing of the strategy but what the job folder carries.
    env = {**os.environ, "META_DIR": str(tmp_path / "meta")}
    (tmp_path / "meta").mkdir()
    done = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(out), "-w", str(tmp_path / "ws"), "-q"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    for site in ("site-1", "site-2"):
        lines = [json.loads(x) for x in (tmp_path / "meta" / f"{site}.jsonl").read_text().splitlines()]
        assert lines == [{"round": 0, "local_steps": 3}, {"round": 1, "local_steps": 6}], site
    # The command line can give other arguments for one run.
    env["META_DIR"] = str(tmp_path / "meta2")
    (tmp_path / "meta2").mkdir()
    again = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(out), "-w", str(tmp_path / "ws2"),
                            "-q", "--strategy-args", '{"steps": 5}'], capture_output=True, text=True, timeout=300,
                           env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads((tmp_path / "meta2" / "site-1.jsonl").read_text().splitlines()[0])["local_steps"] == 5
    wrong = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(out), "-w", str(tmp_path / "ws3"),
                            "--strategy-args", '{"nope": 1}'], capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "cannot be built with arguments ['nope']" in wrong.stderr, wrong.stderr
    bad_json = subprocess.run([sys.executable, "-m", "flkit.cli", "simulate", str(out), "--strategy-args", "{x"],
                              capture_output=True, text=True, timeout=60)
    assert bad_json.returncode != 0 and "--strategy-args" in bad_json.stderr and "not JSON" in bad_json.stderr


def test_a_strategy_file_outside_the_job_folder_is_refused(tmp_path):
    out = _custom_job(tmp_path).export_job(tmp_path / "jobs")
    data = json.loads((out / "job.json").read_text())
    (tmp_path / "jobs" / "evil.py").write_text("raise SystemExit('must not run')\n")
    data["strategy"]["file"] = "../evil.py"
    (out / "job.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="outside the job folder"):
        load_job(out)


def test_a_strategy_defined_in_the_job_script_itself_is_refused_with_the_way_out(tmp_path):
    code = ("import torch, flkit.strategy as fs\n"
            "from flkit.strategy.fedavg import FedAvg\n"
            "from flkit.job import FedAvgJob\n"
            "@fs.register('test-in-main')\n"
            "class InMain(FedAvg):\n    pass\n"
            "FedAvgJob(initial_model=torch.nn.Linear(2, 2), strategy=InMain())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "put it in a file of its own and pass strategy_file" in done.stderr, done.stderr


def test_an_evaluation_round_is_aggregated_by_the_strategy(harness):
    server = harness.start(INITIAL, SITES, num_rounds=1, final_validation=True)
    scores = {"site-1": 0.2, "site-2": 0.5, "site-3": 0.8}
    outcome, _ = _run_sites(harness, server, SITES,
                            lambda site, m: FLModel(params=m.params, metrics={"accuracy": scores[site]}))
    assert outcome is not None and not outcome.failed, outcome
    validate = server.controller.history[-1]
    assert validate.task == "validate" and validate.aggregated == pytest.approx({"accuracy": 0.5})
    assert server.controller.history[0].aggregated is None  # train rounds have no evaluation to aggregate


def test_the_custom_strategy_of_the_docs_runs_as_written(tmp_path, harness):
    """docs/strategies.md's example, taken from the page: it registers, plans, and keeps its state."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "strategies.md").read_text()
    code = page.split("```python\n# lr_schedule.py\n")[1].split("```")[0]
    assert len(code.strip().splitlines()) < 30
    (tmp_path / "lr_schedule.py").write_text(code)
    fs.registry.load_file(tmp_path / "lr_schedule.py")
    strategy = fs.create("lr-schedule", {"lr": 0.4, "half_life": 2, "epochs": {"site-2": 3}})
    server = harness.start(INITIAL, SITES, num_rounds=4, strategy=strategy)
    outcome, seen = _run_sites(harness, server, SITES, lambda site, m: FLModel(params=m.params))
    assert outcome is not None and not outcome.failed, outcome
    assert [m.meta["lr"] for m in seen["site-1"]] == [0.4, 0.4, 0.2, 0.2]
    assert [m.meta["epochs"] for m in seen["site-2"]] == [3, 3, 3, 3] and seen["site-3"][0].meta["epochs"] == 1
    state = json.loads(server.persistor.state_path.read_text())["strategy"]
    assert state == {"name": "lr-schedule", "state": {"rounds_planned": 4}}


def test_sites_left_out_of_a_round_do_not_keep_old_global_models_alive(harness):
    """With sampling, a site not chosen for a while must not pin the model of the last round it took
    part in: the server's two global-model buffers keep being reused, whatever the sample."""
    sites = [f"site-{i}" for i in range(1, 21)]
    server = harness.start(INITIAL, sites, num_rounds=8, clients_per_round=3, min_clients=3, seed=2)

    outcome, _ = _run_sites(harness, server, sites, lambda site, m: FLModel(params={k: v + 1 for k, v in m.params.items()}),
                            keep=False)
    assert outcome is not None and not outcome.failed, outcome
    pool = server.controller._models
    # 9 sets taken (the initial model and 8 aggregates): without reuse all 9 would be new. A set the
    # writer thread still saves when the next aggregate is made costs one more now and then.
    assert pool.reused >= 4 and pool.allocated <= 5, (pool.allocated, pool.reused)
