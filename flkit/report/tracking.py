"""Experiment-tracking receivers: where the metrics that sites log end up (TensorBoard, MLflow, W&B).

Sites send records (see ``flkit.wire.tracking_records``); the job service hands each batch to
:class:`TrackingHub`, which passes every record to each receiver the job configured. The receivers
and their config keys follow NVIDIA FLARE's (``tb_folder``; ``tracking_uri``/``kw_args``;
``wandb_args``/``mode``) so a FLARE job's tracking section carries over.

Rules every receiver keeps:

* One run (or folder) per site, created on that site's first record, so sites that never log
  leave nothing behind.
* Everything goes under the job's result folder unless the job names somewhere else.
* The tracking libraries are imported when a receiver is built (the hub builds them all before
  the job starts), never when this module is imported: a missing library fails the job at once
  with the ``pip install 'flkit[...]'`` line, and a server that tracks nothing never pays for them.
* A record that cannot be written never fails the job: the hub logs it once per receiver and
  site, counts the rest, and reports the count at close.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from flkit.errors import ConfigError

log = logging.getLogger("flkit.server")

# Batches of records waiting for the receivers before a writer waits (memory stays bounded).
MAX_PENDING_BATCHES = 10_000
# How long close() lets the receivers write what is still queued.
CLOSE_TIMEOUT_S = 120.0
# How long a writer waits for room in the queue before its records are dropped (and counted).
PUT_TIMEOUT_S = 30.0

# The record types (flkit.wire.tracking_records.AnalyticsDataType values), grouped by what
# their value is. Plain strings here so the receivers need nothing from the wire package.
_NUMBER = {"SCALAR", "METRIC"}
_PARAMS = {"PARAMETER", "PARAMETERS"}
_TAGS = {"TAG", "TAGS"}


def _step(record: dict[str, Any]) -> int:
    """A record's step; NVFlare records an omitted global_step at 0, and so do we."""
    step = record.get("step")
    return 0 if step is None else int(step)


def _time(record: dict[str, Any]) -> float:
    """When the site logged the record (unix seconds); now if the record has no usable time."""
    when = record.get("time")
    return float(when) if isinstance(when, (int, float)) and when > 0 else time.time()


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a SCALAR/SCALARS/METRIC/METRICS record, by the name they are logged under.

    SCALAR/METRIC: ``{key: value}``. SCALARS: ``{f"{key}/{sub}": value}`` -- the sub-keys are
    series of one chart (``add_scalars("loss", {"train": .., "val": ..})``), and ``key/`` keeps
    them together in every backend's UI. METRICS: ``{name: value}`` -- like ``mlflow.log_metrics``,
    whose record key is only a label for the batch.
    """
    kind, key, value = record["type"], record["key"], record["value"]
    if kind in _NUMBER:
        return {key: float(value)}
    if kind == "SCALARS":
        return {f"{key}/{sub}": float(v) for sub, v in value.items()}
    if kind == "METRICS":
        return {name: float(v) for name, v in value.items()}
    raise ValueError(f"record type {kind!r} holds no numbers")


def _entries(record: dict[str, Any]) -> dict[str, Any]:
    """The name -> value pairs of a PARAMETER(S)/TAG(S) record (singular ones are ``{key: value}``)."""
    value = record["value"]
    return dict(value) if record["type"] in ("PARAMETERS", "TAGS") else {record["key"]: value}


def _relative(where: str, path: str) -> str:
    """``path`` checked to stay inside the folder it is joined to (no absolute path, no '..')."""
    parts = PurePosixPath(path).parts
    if not path or path.startswith("/") or "\\" in path or ".." in parts:
        raise ValueError(f"{where} {path!r} must be a relative path without '..'")
    return path


def _check_keys(tracking_type: str, where: str, given: dict[str, Any], known: set[str]) -> None:
    """Unknown keys are a typo or a setting flkit does not have: say so instead of ignoring them."""
    if not isinstance(given, dict):
        raise ConfigError(f"tracking_type={tracking_type!r}: {where} must be a dict, got {type(given).__name__}")
    unknown = set(given) - known
    if unknown:
        raise ConfigError(f"tracking_type={tracking_type!r}: unknown {where} keys {sorted(unknown)} "
                          f"(known: {sorted(known)})")


def _missing_library(tracking_type: str, package: str) -> ConfigError:
    return ConfigError(f"tracking_type={tracking_type!r} needs the {package} package: "
                       f"pip install 'flkit[{tracking_type}]'")


def _end_each(tracking_type: str, what: str, items: dict[str, Any], end: Callable[[Any], Any]) -> None:
    """``end(item)`` for every site's writer/run, logging failures, so one bad site cannot keep
    the others' runs open."""
    for site, item in items.items():
        try:
            end(item)
        except Exception:
            log.exception("%s: could not %s of site %s", tracking_type, what, site)


class TrackingReceiver(ABC):
    """One tracking backend (TensorBoard, MLflow, W&B) for a whole job; one run/folder per site.

    The hub serialises calls to one receiver, so receivers need no locks of their own.
    """

    #: the ``type`` of the tracking spec that builds this receiver
    tracking_type: str = ""

    @abstractmethod
    def write(self, site: str, record: dict[str, Any]) -> None:
        """Write one record of ``site``; raise if it cannot be written (the hub logs it)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and end every site's run/writer; called once, after the last write."""


class TensorBoardReceiver(TrackingReceiver):
    """Event files in ``<out_dir>/<tb_folder>/<site>/``, so ``tensorboard --logdir <out_dir>/<tb_folder>``
    shows one run per site.

    Mapping: SCALAR/METRIC -> scalar ``key``; SCALARS -> one scalar per sub-key, tag ``key/sub``
    (not torch's ``add_scalars``, which writes an extra event folder per sub-key that TensorBoard
    then lists as a run of its own, and builds folder names from user keys); METRICS -> one scalar
    per name; TEXT -> text ``key``; PARAMETER(S) -> text ``params/<name>``; TAG(S) -> text
    ``tags/<name>``. Missing step -> 0. Wall time is the site's logging time.

    The writer is tensorboard's own ``EventFileWriter`` fed with ``Event`` protos built here: a
    scalar costs about a third of torch's ``SummaryWriter.add_scalar``, which builds the same proto
    through several conversions. (``tensorboard.summary.Writer`` is marked experimental.)
    """

    tracking_type = "tensorboard"
    _KEYS = {"tb_folder"}
    #: seconds between flushes, so a TensorBoard pointed at a running job sees new points soon
    FLUSH_SECS = 10

    def __init__(self, config: dict[str, Any], out_dir: Path, job_name: str) -> None:
        _check_keys(self.tracking_type, "config", config, self._KEYS)
        try:
            import tensorboard  # noqa: F401 - fails first when the package is missing, whatever is cached
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.plugins.text.summary_v2 import text_pb
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise _missing_library(self.tracking_type, "tensorboard") from exc
        folder = config.get("tb_folder", "tb_events")
        if not isinstance(folder, str):
            raise ConfigError(f"tracking_type='tensorboard': tb_folder must be a string, got {folder!r}")
        try:
            _relative("tb_folder", folder)
        except ValueError as exc:
            raise ConfigError(f"tracking_type='tensorboard': {exc}") from None
        self._event, self._summary, self._text_pb, self._file_writer = Event, Summary, text_pb, EventFileWriter
        self.root = Path(out_dir) / folder
        self._writers: dict[str, Any] = {}

    def _writer(self, site: str) -> Any:
        writer = self._writers.get(site)
        if writer is None:
            folder = self.root / site
            folder.mkdir(parents=True, exist_ok=True)
            writer = self._file_writer(str(folder), flush_secs=self.FLUSH_SECS)
            self._writers[site] = writer
        return writer

    def write(self, site: str, record: dict[str, Any]) -> None:
        writer = self._writer(site)
        kind, step, when = record["type"], _step(record), _time(record)
        if kind == "TEXT":
            summaries = [self._text_pb(record["key"], record["value"])]
        elif kind in _PARAMS or kind in _TAGS:
            prefix = "params" if kind in _PARAMS else "tags"
            summaries = [self._text_pb(f"{prefix}/{name}", str(value)) for name, value in _entries(record).items()]
        else:
            summaries = [self._summary(value=[self._summary.Value(tag=tag, simple_value=value)
                                              for tag, value in _numbers(record).items()])]
        for summary in summaries:
            writer.add_event(self._event(wall_time=when, step=step, summary=summary))

    def close(self) -> None:
        writers, self._writers = self._writers, {}
        _end_each(self.tracking_type, "close the event file", writers, lambda writer: writer.close())


class MLflowReceiver(TrackingReceiver):
    """One MLflow run per site (name ``<run_name>-<site>``, tag ``site``) in one experiment per job.

    Talks through ``MlflowClient`` with explicit run ids: the fluent ``mlflow.log_*`` API keeps one
    global active run per thread, which does not fit several sites logging from gRPC threads.

    Mapping: SCALAR/METRIC(S) -> metrics with step and timestamp; SCALARS -> metric ``key/sub`` per
    sub-key; PARAMETER(S) -> params (MLflow refuses to change a logged param: the hub logs that
    once); TAG(S) -> run tags; TEXT -> ``log_text`` to ``record["path"]`` or ``<key>.txt``. Plural
    types go in one ``log_batch`` call (one request to a tracking server, not one per value).

    ``tracking_uri`` defaults to a file store in ``<out_dir>/mlruns`` (``mlflow ui --backend-store-uri
    <that uri>``); a scheme-less relative path is taken inside ``out_dir``. mlflow-skinny has no SQL
    backend, and MLflow 3.x refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is true, so for a
    file store that variable is set to true in this process unless it is already set.
    The experiment and runs are made on the first record, not here, so a job whose sites log
    nothing leaves no empty runs (and a tracking server is not contacted before it is needed).
    A site whose run cannot be created is not tried again; its records count as failed.
    """

    tracking_type = "mlflow"
    _KEYS = {"tracking_uri", "kw_args"}
    _KW_KEYS = {"experiment_name", "run_name", "experiment_tags", "run_tags", "artifact_location"}

    def __init__(self, config: dict[str, Any], out_dir: Path, job_name: str) -> None:
        _check_keys(self.tracking_type, "config", config, self._KEYS)
        kw = config.get("kw_args") or {}
        _check_keys(self.tracking_type, "kw_args", kw, self._KW_KEYS)
        for name in ("experiment_tags", "run_tags"):
            if not isinstance(kw.get(name) or {}, dict):
                raise ConfigError(f"tracking_type='mlflow': kw_args.{name} must be a dict")
        try:
            import mlflow  # noqa: F401
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise _missing_library(self.tracking_type, "mlflow") from exc
        self._entities = (Metric, Param, RunTag)
        self.tracking_uri = self._resolve_uri(config.get("tracking_uri"), Path(out_dir))
        self.experiment_name = str(kw.get("experiment_name") or f"{job_name}-experiment")
        self.run_name = str(kw.get("run_name") or job_name)
        self.experiment_tags = {str(k): str(v) for k, v in (kw.get("experiment_tags") or {}).items()}
        self.run_tags = {str(k): str(v) for k, v in (kw.get("run_tags") or {}).items()}
        self.artifact_location = kw.get("artifact_location")
        try:
            # Builds the store now: a bad URI or a refused file store fails before the job starts.
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as exc:  # MlflowException and whatever a store plugin raises
            raise ConfigError(f"tracking_type='mlflow': cannot use tracking_uri {self.tracking_uri!r}: {exc}") from exc
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # site -> run id
        self._unstarted: set[str] = set()  # sites whose run could not be created

    @staticmethod
    def _resolve_uri(uri: Any, out_dir: Path) -> str:
        if uri is None:
            uri = (out_dir / "mlruns").resolve().as_uri()
        if not isinstance(uri, str) or not uri:
            raise ConfigError(f"tracking_type='mlflow': tracking_uri must be a non-empty string, got {uri!r}")
        scheme = urlparse(uri).scheme
        if scheme == "" and not Path(uri).is_absolute():
            uri = (out_dir / uri).resolve().as_uri()
            scheme = "file"
        if scheme in ("", "file") or len(scheme) == 1:  # a path, a file: URI, or a Windows drive letter
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return uri

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location,
                        tags=self.experiment_tags or None)
                except Exception:
                    # Another process made it in the meantime; use theirs (re-raise if not so).
                    found = self.client.get_experiment_by_name(self.experiment_name)
                    if found is None:
                        raise
            if found is not None:
                self._experiment_id = found.experiment_id
                for name, value in self.experiment_tags.items():
                    self.client.set_experiment_tag(found.experiment_id, name, value)
        return self._experiment_id

    def _run(self, site: str) -> str:
        run_id = self._runs.get(site)
        if run_id is None:
            if site in self._unstarted:
                # Not again for every record: against an unreachable server each try costs
                # MLflow's whole retry schedule, and the gRPC thread waits for it.
                raise RuntimeError(f"mlflow: the run of site {site} could not be created (first error above)")
            try:
                run = self.client.create_run(self._experiment(), run_name=f"{self.run_name}-{site}",
                                             tags={**self.run_tags, "site": site})
            except Exception:
                self._unstarted.add(site)
                raise
            run_id = self._runs[site] = run.info.run_id
        return run_id

    def write(self, site: str, record: dict[str, Any]) -> None:
        run_id = self._run(site)
        Metric, Param, RunTag = self._entities
        kind, step = record["type"], _step(record)
        millis = int(_time(record) * 1000)
        if kind == "TEXT":
            path = record.get("path") or f"{record['key']}.txt"
            self.client.log_text(run_id, record["value"], _relative("text artifact path", path))
        elif kind == "PARAMETER":
            self.client.log_param(run_id, record["key"], str(record["value"]))
        elif kind == "TAG":
            self.client.set_tag(run_id, record["key"], str(record["value"]))
        elif kind == "PARAMETERS":
            self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in _entries(record).items()])
        elif kind == "TAGS":
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in _entries(record).items()])
        elif kind in _NUMBER:
            self.client.log_metric(run_id, record["key"], float(record["value"]), timestamp=millis, step=step)
        else:
            self.client.log_batch(run_id, metrics=[Metric(k, v, millis, step) for k, v in _numbers(record).items()])

    def close(self) -> None:
        runs, self._runs = self._runs, {}
        _end_each(self.tracking_type, "end the run", runs, lambda run_id: self.client.set_terminated(run_id, "FINISHED"))


class WandBReceiver(TrackingReceiver):
    """One Weights & Biases run per site (name ``<name>-<site>``, group = job name by default).

    Runs live in ``<out_dir>/wandb/`` (``wandb.init(dir=out_dir)``); the default mode is offline, so
    nothing leaves the machine until someone runs ``wandb sync <out_dir>/wandb/offline-run-*``.
    Several runs share the process through ``reinit="create_new"`` (wandb >= 0.19).

    Steps: W&B drops a ``run.log(..., step=s)`` whose step is lower than the run's last one, and
    sites do log out of order (a step per round for one key, a step per batch for another). So
    W&B's own ``_step`` just counts rows, and the record's step goes in every row as the field
    ``global_step``, declared with ``define_metric("*", step_metric="global_step")`` so that charts
    use it as their x-axis. Nothing is dropped. (A record key named ``global_step`` is shadowed.)

    Mapping: SCALAR/METRIC(S)/SCALARS -> one ``run.log`` row (SCALARS as ``key/sub``, METRICS by
    name); PARAMETER(S) -> ``run.config``; TAG(S) -> ``run.config["tags/<name>"]`` (W&B's own tags
    are plain labels, not name/value pairs); TEXT -> ``run.summary[key]`` (the last text wins).

    Defaults passed to ``wandb.init`` unless ``wandb_args`` says otherwise: project ``flkit``,
    ``settings`` with ``console="off"`` (a site's run must not capture the server's stdout),
    ``x_disable_stats=True`` (the server machine's CPU/GPU graphs say nothing about a site) and
    ``silent=True`` (no banner per site on the server console). In online mode the credentials are
    checked when the receiver is built, so that ``wandb.init`` never prompts for a key mid-job.
    """

    tracking_type = "wandb"
    _KEYS = {"wandb_args", "mode"}
    _MODES = ("offline", "online", "disabled")
    #: wandb.init arguments this receiver sets itself, per site or from other config keys
    _OWN_ARGS = {"dir", "mode", "reinit", "id", "resume", "resume_from", "fork_from"}
    STEP_METRIC = "global_step"
    DEFAULT_SETTINGS = {"console": "off", "x_disable_stats": True, "silent": True}

    def __init__(self, config: dict[str, Any], out_dir: Path, job_name: str) -> None:
        _check_keys(self.tracking_type, "config", config, self._KEYS)
        args = config.get("wandb_args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"tracking_type='wandb': wandb_args must be a dict, got {type(args).__name__}")
        args = dict(args)
        mode = config.get("mode", "offline")
        if mode not in self._MODES:
            raise ConfigError(f"tracking_type='wandb': mode must be one of {list(self._MODES)}, got {mode!r}")
        try:
            import wandb
        except ImportError as exc:
            raise _missing_library(self.tracking_type, "wandb") from exc
        import inspect

        known = set(inspect.signature(wandb.init).parameters) - self._OWN_ARGS
        _check_keys(self.tracking_type, "wandb_args", args, known)
        settings = args.pop("settings", None) or {}
        if isinstance(settings, dict):
            settings = {**self.DEFAULT_SETTINGS, **settings}
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            # Without credentials wandb.init would ask for a key on the console -- from a gRPC
            # thread, in the middle of the job. Fail now instead (verify=False: no network).
            raise ConfigError("tracking_type='wandb' with mode='online' needs W&B credentials: set WANDB_API_KEY "
                              "or run `wandb login` (or use mode='offline' and `wandb sync` later)")
        self._wandb = wandb
        self.dir = Path(out_dir)
        self.mode = mode
        self.base_name = str(args.pop("name", None) or job_name)
        args.setdefault("group", job_name)
        args.setdefault("project", "flkit")
        self.args = {**args, "settings": settings}
        self._runs: dict[str, Any] = {}
        _hold_wandb()  # released in close()
        self._unstarted: set[str] = set()  # sites whose wandb.init failed

    def _run(self, site: str) -> Any:
        run = self._runs.get(site)
        if run is None:
            if site in self._unstarted:  # online, a failing wandb.init can take its 90 s timeout each time
                raise RuntimeError(f"wandb: the run of site {site} could not be started (first error above)")
            self.dir.mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp folder otherwise
            try:
                run = self._wandb.init(**self.args, name=f"{self.base_name}-{site}", dir=str(self.dir),
                                       mode=self.mode, reinit="create_new")
            except Exception:
                self._unstarted.add(site)
                raise
            run.define_metric(self.STEP_METRIC)
            run.define_metric("*", step_metric=self.STEP_METRIC)
            self._runs[site] = run
        return run

    def write(self, site: str, record: dict[str, Any]) -> None:
        run = self._run(site)
        kind = record["type"]
        if kind == "TEXT":
            run.summary[record["key"]] = record["value"]
        elif kind in _PARAMS:
            run.config.update(_entries(record), allow_val_change=True)
        elif kind in _TAGS:
            run.config.update({f"tags/{k}": v for k, v in _entries(record).items()}, allow_val_change=True)
        else:
            run.log({**_numbers(record), self.STEP_METRIC: _step(record)})

    def close(self) -> None:
        runs, self._runs = self._runs, {}
        _end_each(self.tracking_type, "finish the run", runs, lambda run: run.finish())
        _release_wandb(bool(runs))


# W&B receivers alive in this process (the server's and in-process sites' own), and whether any made runs.
_wandb_lock = threading.Lock()
_wandb_users = 0
_wandb_used = False


def _hold_wandb() -> None:
    global _wandb_users
    with _wandb_lock:
        _wandb_users += 1


def _release_wandb(made_runs: bool) -> None:
    """The last W&B receiver of the process to close waits for W&B's service process to finish and
    exit (``wandb.teardown``): ``run.finish()`` can return before the service has written a run's
    transaction log (seen offline with several runs). An earlier teardown would end the runs of the
    receivers still open, so it waits for the last one."""
    global _wandb_users, _wandb_used
    with _wandb_lock:
        _wandb_users -= 1
        _wandb_used |= made_runs
        last, used = _wandb_users == 0, _wandb_used
        if last:
            _wandb_used = False
    if last and used:
        import wandb

        wandb.teardown()


RECEIVERS: dict[str, type[TrackingReceiver]] = {
    cls.tracking_type: cls for cls in (TensorBoardReceiver, MLflowReceiver, WandBReceiver)
}


class _Slot:
    """A receiver with its lock and error bookkeeping (the lock serialises calls from gRPC threads)."""

    def __init__(self, receiver: TrackingReceiver) -> None:
        self.receiver = receiver
        self.lock = threading.Lock()
        self.failures: dict[str, int] = {}  # site -> records that could not be written
        self.closed = False


class TrackingHub:
    """Every receiver a job configured, fed by the gRPC threads that receive the sites' records."""

    def __init__(self, specs: list[dict[str, Any]], out_dir: Path, job_name: str) -> None:
        """Build every receiver now, so a missing library or a bad setting fails before the job starts."""
        self._slots: list[_Slot] = []
        self._pending: queue.Queue[tuple[str, list[dict[str, Any]]] | None] = queue.Queue(MAX_PENDING_BATCHES)
        self._worker: threading.Thread | None = None
        self._dropped = 0
        self._drop_lock = threading.Lock()
        try:
            for spec in specs:
                kind = spec.get("type")
                cls = RECEIVERS.get(kind)
                if cls is None:
                    raise ConfigError(f"unknown tracking type {kind!r} (known: {sorted(RECEIVERS)})")
                self._slots.append(_Slot(cls(spec.get("config") or {}, Path(out_dir), job_name)))
        except BaseException:
            self.close()  # the receivers built so far
            raise
        if self._slots:
            self._worker = threading.Thread(target=self._work, name="flkit-tracking", daemon=True)
            self._worker.start()

    @property
    def enabled(self) -> bool:
        """Whether any receiver is configured (the service skips the work otherwise)."""
        return bool(self._slots)

    def write(self, site: str, records: list[dict[str, Any]]) -> None:
        """Queue ``site``'s records for every receiver and return at once.

        The receivers write in one worker thread, so neither a site's logging call nor the
        server's gRPC threads wait for TensorBoard, MLflow or W&B. The queue is bounded: when
        the receivers fall behind by MAX_PENDING_BATCHES, the caller waits (memory stays bounded).
        """
        if self._worker is None or not self._worker.is_alive():
            if self._slots:
                log.warning("%d tracking record(s) of site %s arrived after the receivers closed; dropped",
                            len(records), site)
            return
        try:
            self._pending.put((site, records), timeout=PUT_TIMEOUT_S)
        except queue.Full:
            with self._drop_lock:
                self._dropped += len(records)
                first = self._dropped == len(records)
            if first:
                log.warning("tracking receivers fell %d batches behind for %.0f s; dropping records (counted, "
                            "reported at the end)", MAX_PENDING_BATCHES, PUT_TIMEOUT_S)

    def _work(self) -> None:
        while True:
            item = self._pending.get()
            if item is None:
                return
            self._deliver(*item)

    def _deliver(self, site: str, records: list[dict[str, Any]]) -> None:
        """Hand ``site``'s records to every receiver; never raises for a record a receiver refuses."""
        for slot in self._slots:
            with slot.lock:
                if slot.closed:
                    log.debug("%s: %d record(s) of site %s arrived after close; dropped",
                              slot.receiver.tracking_type, len(records), site)
                    continue
                for record in records:
                    try:
                        slot.receiver.write(site, record)
                    except Exception:
                        self._failed(slot, site, record)

    @staticmethod
    def _failed(slot: _Slot, site: str, record: dict[str, Any]) -> None:
        count = slot.failures.get(site, 0)
        slot.failures[site] = count + 1
        if count == 0:  # once per receiver and site: a broken backend must not flood the log
            log.exception("%s: could not write record %r (type %s) of site %s; further errors of this "
                          "site are counted and reported at the end", slot.receiver.tracking_type,
                          record.get("key"), record.get("type"), site)

    def close(self) -> None:
        """Write what is queued, then flush and close every receiver (each even if another fails);
        safe to call twice."""
        worker, self._worker = self._worker, None
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        if worker is not None and worker.is_alive():
            try:
                self._pending.put(None, timeout=CLOSE_TIMEOUT_S)
            except queue.Full:
                pass
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.warning("tracking receivers did not finish writing within %.0f s; closing them anyway",
                            CLOSE_TIMEOUT_S)
        if self._dropped:
            log.warning("%d tracking record(s) were dropped because the receivers fell behind", self._dropped)
        for slot in self._slots:
            if not slot.lock.acquire(timeout=max(1.0, deadline - time.monotonic())):
                log.warning("%s: a write is still stuck; the receiver is left open", slot.receiver.tracking_type)
                continue
            try:
                if slot.closed:
                    continue
                slot.closed = True
                try:
                    slot.receiver.close()
                except Exception:
                    log.exception("%s: could not close the tracking receiver", slot.receiver.tracking_type)
                for site, count in sorted(slot.failures.items()):
                    log.warning("%s: %d tracking record(s) of site %s could not be written",
                                slot.receiver.tracking_type, count, site)
            finally:
                slot.lock.release()
