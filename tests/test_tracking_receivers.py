"""The server's tracking receivers against the real libraries, offline, all output under tmp_path."""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from flkit.errors import ConfigError
from flkit.report.tracking import TrackingHub

SITES = ("site-1", "site-2")
T0 = 1_700_000_000.0


def rec(key: str, value: Any, kind: str, step: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"key": key, "value": value, "type": kind, "step": step, "time": T0 + (step or 0), **extra}


def site_records(offset: float) -> list[dict[str, Any]]:
    """One record of every type; values differ per site (``offset``) and steps go backwards once."""
    return [
        rec("loss", 1.0 + offset, "SCALAR", 5),
        rec("loss", 0.5 + offset, "SCALAR", 2),  # out of order on purpose
        rec("loss", 0.25 + offset, "SCALAR"),  # no step -> 0
        rec("acc", 0.75 + offset, "METRIC", 1),
        rec("loss_split", {"train": 0.3 + offset, "val": 0.4 + offset}, "SCALARS", 3),
        rec("metrics", {"f1": 0.6 + offset, "auc": 0.7 + offset}, "METRICS", 4),
        rec("lr", 0.01, "PARAMETER"),
        rec("params", {"batch_size": 32, "optimizer": "sgd"}, "PARAMETERS"),
        rec("stage", "warmup", "TAG"),
        rec("tags", {"model": "cnn"}, "TAGS"),
        rec("note", f"hello {offset}", "TEXT", 1),
        rec("report", "the report", "TEXT", 2, path="reports/final.txt"),
    ]


def write_all(hub: TrackingHub) -> None:
    for i, site in enumerate(SITES):
        hub.write(site, site_records(float(i)))
    hub.close()
    hub.close()  # idempotent


@pytest.fixture
def no_stray_files():
    """The receivers write under the job's folder only: nothing appears in the cwd or the repo."""
    places = {Path.cwd(), Path(__file__).resolve().parent.parent}
    names = ("wandb", "mlruns", "tb_events", "runs")
    before = {p / n for p in places for n in names if (p / n).exists()}
    yield
    after = {p / n for p in places for n in names if (p / n).exists()}
    assert after <= before, f"written outside tmp_path: {sorted(map(str, after - before))}"


# ---------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_per_site(tmp_path, no_stray_files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_all(TrackingHub([{"type": "tensorboard", "config": {}}], tmp_path, "job"))
    assert sorted(p.name for p in (tmp_path / "tb_events").iterdir()) == list(SITES)
    for i, site in enumerate(SITES):
        acc = EventAccumulator(str(tmp_path / "tb_events" / site))
        acc.Reload()
        tags = acc.Tags()
        assert sorted(tags["scalars"]) == sorted(["loss", "acc", "loss_split/train", "loss_split/val", "f1", "auc"])

        def points(tag, acc=acc):
            return [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)]

        assert points("loss") == [(5, 1.0 + i), (2, 0.5 + i), (0, 0.25 + i)]
        assert points("acc") == [(1, 0.75 + i)]
        assert points("loss_split/train") == [(3, round(0.3 + i, 5))]
        assert points("loss_split/val") == [(3, round(0.4 + i, 5))]
        assert points("f1") == [(4, round(0.6 + i, 5))] and points("auc") == [(4, round(0.7 + i, 5))]
        assert acc.Scalars("loss")[0].wall_time == pytest.approx(T0 + 5)
        texts = {t.removesuffix("/text_summary"): acc.Tensors(t) for t in tags["tensors"]}
        assert set(texts) == {"note", "report", "params/lr", "params/batch_size", "params/optimizer",
                              "tags/stage", "tags/model"}
        assert texts["note"][0].tensor_proto.string_val == [f"hello {float(i)}".encode()]
        assert texts["note"][0].step == 1
        assert texts["params/batch_size"][0].tensor_proto.string_val == [b"32"]


def test_tensorboard_folder_setting(tmp_path):
    hub = TrackingHub([{"type": "tensorboard", "config": {"tb_folder": "tb/events"}}], tmp_path, "job")
    hub.write("site-1", [rec("loss", 1.0, "SCALAR", 1)])
    hub.close()
    assert list((tmp_path / "tb" / "events" / "site-1").glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="tb_folder"):
        TrackingHub([{"type": "tensorboard", "config": {"tb_folder": "../outside"}}], tmp_path, "job")


# ---------------------------------------------------------------------------------------- MLflow


@pytest.fixture
def mlflow_env(monkeypatch):
    # The receiver sets MLFLOW_ALLOW_FILE_STORE for file stores; setenv-then-delenv makes
    # monkeypatch restore whatever was there before the test.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "placeholder")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def test_mlflow_runs_per_site(tmp_path, mlflow_env, no_stray_files):
    from mlflow.tracking import MlflowClient

    spec = {"type": "mlflow", "config": {"kw_args": {"experiment_tags": {"owner": "me"}, "run_tags": {"x": "y"}}}}
    write_all(TrackingHub([spec], tmp_path, "job"))

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("job-experiment")
    assert experiment.tags["owner"] == "me"
    runs = {r.data.tags["site"]: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == list(SITES)
    for i, site in enumerate(SITES):
        run = runs[site]
        assert run.info.run_name == f"job-{site}" and run.info.status == "FINISHED"
        assert run.data.tags["x"] == "y" and run.data.tags["stage"] == "warmup" and run.data.tags["model"] == "cnn"
        assert run.data.params == {"lr": "0.01", "batch_size": "32", "optimizer": "sgd"}

        def history(name, run_id=run.info.run_id):
            return [(m.step, m.value) for m in client.get_metric_history(run_id, name)]

        assert sorted(history("loss")) == sorted([(5, 1.0 + i), (2, 0.5 + i), (0, 0.25 + i)])
        assert history("acc") == [(1, 0.75 + i)]
        assert history("loss_split/train") == [(3, 0.3 + i)] and history("loss_split/val") == [(3, 0.4 + i)]
        assert history("f1") == [(4, 0.6 + i)] and history("auc") == [(4, 0.7 + i)]
        assert client.get_metric_history(run.info.run_id, "acc")[0].timestamp == int((T0 + 1) * 1000)
        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        assert (artifacts / "note.txt").read_text() == f"hello {float(i)}"
        assert (artifacts / "reports" / "final.txt").read_text() == "the report"


def test_mlflow_names_and_relative_uri(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    spec = {"type": "mlflow", "config": {"tracking_uri": "tracking", "kw_args": {
        "experiment_name": "exp", "run_name": "trial"}}}
    hub = TrackingHub([spec], tmp_path, "job")
    hub.write("site-9", [rec("loss", 1.0, "SCALAR", 1)])
    hub.close()
    client = MlflowClient(tracking_uri=(tmp_path / "tracking").as_uri())  # relative: inside out_dir
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert run.info.run_name == "trial-site-9"


# ---------------------------------------------------------------------------------------- W&B


def wandb_records(path: Path) -> list[Any]:
    """The records of an offline run's transaction log (``run-<id>.wandb``).

    wandb 0.31 writes offline runs only into this log (no wandb-summary.json or config.yaml
    until ``wandb sync``): a 7-byte header, then LevelDB-log chunks (crc32, length, type)
    in 32 KiB blocks, each record a ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full / first
            pending = chunk
        elif kind in (3, 4):  # middle / last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def item_key(item: Any) -> str:
    """A history/config/summary item's name (wandb fills ``key`` or, in history, ``nested_key``)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_runs_per_site(tmp_path, monkeypatch, no_stray_files):
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "result"
    spec = {"type": "wandb", "config": {"mode": "offline", "wandb_args": {"project": "p", "config": {"seed": 1}}}}
    write_all(TrackingHub([spec], out, "job"))

    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2
    seen = {}
    for run_dir in run_dirs:
        (log_file,) = run_dir.glob("run-*.wandb")
        records = wandb_records(log_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.project == "p" and run.run_group == "job"
        rows = [{item_key(i): json.loads(i.value_json) for i in r.history.item}
                for r in records if r.WhichOneof("record_type") == "history"]
        # wandb.init's config is in the run record; later run.config updates are config records.
        configs = [run.config] + [r.config for r in records if r.WhichOneof("record_type") == "config"]
        config = {item_key(i): json.loads(i.value_json) for c in configs for i in c.update}
        summary = {item_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
                   for i in r.summary.update}
        finished = any(r.WhichOneof("record_type") == "exit" for r in records)
        seen[run.display_name] = (rows, config, summary, finished)
    assert sorted(seen) == ["job-site-1", "job-site-2"]
    for i, site in enumerate(SITES):
        rows, config, summary, finished = seen[f"job-{site}"]
        assert finished
        logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]
        assert logged == [  # every row kept, even the ones whose step goes backwards
            {"loss": 1.0 + i, "global_step": 5},
            {"loss": 0.5 + i, "global_step": 2},
            {"loss": 0.25 + i, "global_step": 0},
            {"acc": 0.75 + i, "global_step": 1},
            {"loss_split/train": 0.3 + i, "loss_split/val": 0.4 + i, "global_step": 3},
            {"f1": 0.6 + i, "auc": 0.7 + i, "global_step": 4},
        ]
        assert [row["_step"] for row in rows] == list(range(6))
        assert config["seed"] == 1 and config["lr"] == 0.01 and config["batch_size"] == 32
        assert config["optimizer"] == "sgd" and config["tags/stage"] == "warmup" and config["tags/model"] == "cnn"
        assert summary["note"] == f"hello {float(i)}" and summary["report"] == "the report"


def test_wandb_args_checked(tmp_path):
    with pytest.raises(ConfigError, match="projct"):
        TrackingHub([{"type": "wandb", "config": {"wandb_args": {"projct": "p"}}}], tmp_path, "job")
    with pytest.raises(ConfigError, match="'dir'"):
        TrackingHub([{"type": "wandb", "config": {"wandb_args": {"dir": "elsewhere"}}}], tmp_path, "job")
    with pytest.raises(ConfigError, match="mode"):
        TrackingHub([{"type": "wandb", "config": {"mode": "sometimes"}}], tmp_path, "job")


def test_wandb_online_without_credentials_fails_before_the_job(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        TrackingHub([{"type": "wandb", "config": {"mode": "online"}}], tmp_path, "job")


# ---------------------------------------------------------------------------------------- threads


def test_sites_log_from_several_threads(tmp_path, monkeypatch, mlflow_env, no_stray_files):
    """gRPC calls arrive on worker threads, several sites at once; every backend gets every record."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    specs = [{"type": t, "config": {}} for t in ("tensorboard", "mlflow", "wandb")]
    hub = TrackingHub(specs, tmp_path, "job")
    sites = [f"site-{i}" for i in range(4)]

    def site_thread(site):
        for step in range(10):
            hub.write(site, [rec("loss", float(step), "SCALAR", step), rec("m", {"a": 1.0, "b": 2.0}, "METRICS", step)])

    threads = [threading.Thread(target=site_thread, args=(site,)) for site in sites]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    hub.close()

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("job-experiment").experiment_id])
    assert sorted(r.data.tags["site"] for r in runs) == sites
    for site in sites:
        acc = EventAccumulator(str(tmp_path / "tb_events" / site))
        acc.Reload()
        assert [e.step for e in acc.Scalars("loss")] == list(range(10))
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "a")) == 10
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 4


# ---------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("tracking_type, module", [
    ("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")])
def test_missing_library_names_the_extra(tmp_path, monkeypatch, tracking_type, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` raise ImportError
    with pytest.raises(ConfigError) as info:
        TrackingHub([{"type": tracking_type, "config": {}}], tmp_path, "job")
    assert str(info.value) == (f"tracking_type='{tracking_type}' needs the {module} package: "
                               f"pip install 'flkit[{tracking_type}]'")


@pytest.mark.parametrize("spec, names", [
    ({"type": "tensorboard", "config": {"tb_dir": "x"}}, "tb_dir"),
    ({"type": "mlflow", "config": {"uri": "x"}}, "uri"),
    ({"type": "mlflow", "config": {"kw_args": {"experiment": "x"}}}, "experiment"),
    ({"type": "wandb", "config": {"project": "x"}}, "project"),
])
def test_unknown_config_keys_refused(tmp_path, spec, names):
    with pytest.raises(ConfigError, match=f"unknown .*'{names}'"):
        TrackingHub([spec], tmp_path, "job")


def test_receiver_error_is_logged_once_and_job_goes_on(tmp_path, caplog, mlflow_env):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hub = TrackingHub([{"type": "mlflow", "config": {}}, {"type": "tensorboard", "config": {}}], tmp_path, "job")
    mlflow_receiver = hub._slots[0].receiver

    def broken(site, record):
        raise RuntimeError("tracking server is down")

    mlflow_receiver.write = broken
    with caplog.at_level(logging.WARNING, logger="flkit.server"):
        hub.write("site-1", [rec("loss", 1.0, "SCALAR", 1), rec("loss", 2.0, "SCALAR", 2)])
        hub.write("site-1", [rec("loss", 3.0, "SCALAR", 3)])
        hub.write("site-2", [rec("loss", 4.0, "SCALAR", 1)])
        hub.close()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [("site-1" in r.getMessage(), "site-2" in r.getMessage()) for r in errors] == [(True, False),
                                                                                           (False, True)]
    assert all("mlflow" in r.getMessage() and r.exc_info for r in errors)
    assert any("3 tracking record(s) of site site-1" in r.getMessage() for r in caplog.records)
    acc = EventAccumulator(str(tmp_path / "tb_events" / "site-1"))  # the other receiver got everything
    acc.Reload()
    assert [e.value for e in acc.Scalars("loss")] == [1.0, 2.0, 3.0]


def test_hub_without_receivers_and_unknown_type(tmp_path):
    hub = TrackingHub([], tmp_path, "job")
    assert not hub.enabled
    hub.write("site-1", [rec("loss", 1.0, "SCALAR", 1)])
    hub.close()
    assert TrackingHub([{"type": "tensorboard", "config": {}}], tmp_path, "job").enabled
    with pytest.raises(ConfigError, match="unknown tracking type"):
        TrackingHub([{"type": "neptune", "config": {}}], tmp_path, "job")


def test_importing_the_module_loads_no_tracking_library():
    code = ("import sys, flkit.report.tracking; "
            "print(sorted(m for m in ('mlflow', 'wandb', 'tensorboard', 'torch.utils.tensorboard') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
