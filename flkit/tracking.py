"""Experiment tracking for sites, with NVFlare's writer classes and method names.

``SummaryWriter`` (TensorBoard's ``add_scalar``/``add_scalars``), ``WandBWriter`` (``log``)
and ``MLflowWriter`` (``log_metric``, ``log_params``, ``set_tag``...) all end in
``flare.log``: each record is written to ``<site workspace>/tracking.jsonl`` and, when the
job has tracking receivers (``add_experiment_tracking``), sent to the server, which writes
TensorBoard event files, MLflow runs or W&B runs per site. Records are batched: a call
costs a JSON line, not a network round trip.

Create a writer after ``flare.init()`` (or ``flare.patch(trainer)`` with Lightning).
"""

from __future__ import annotations

from typing import Any

from flkit.client.current import AnySession, require_session
from flkit.compat import warn_ignored
from flkit.wire.tracking_records import AnalyticsDataType, make_record

__all__ = ["AnalyticsDataType", "MLflowWriter", "SummaryWriter", "WandBWriter", "write_record"]


def write_record(session: AnySession, key: str, value: Any, data_type: Any = None, **kwargs: Any) -> None:
    """Check one record and hand it to the site's RecordQueue (its tracking.jsonl, its receivers).

    ``global_step`` (or ``step``) in kwargs is the record's step, ``walltime`` its time; ``path``
    names a text artifact (MLflow's ``log_text``). Other keywords (NVFlare hands them to the
    receiver's writer, e.g. torch's ``new_style``) are named in an IgnoredArgumentWarning.
    """
    step = kwargs.pop("global_step", kwargs.pop("step", None))
    path = kwargs.pop("path", None)
    when = kwargs.pop("walltime", None)
    for name in sorted(kwargs):
        warn_ignored("flare.log", name, "the receivers write each record as it is")
    session.queue_record(make_record(key, value, data_type, step=step, path=path, when=when))


def _session() -> AnySession:
    return require_session()


class SummaryWriter:
    """TensorBoard-style writer bound to the current site."""

    def __init__(self) -> None:
        self._session = _session()

    def add_scalar(self, tag: str, scalar: float, global_step: int | None = None, **kwargs: Any) -> None:
        write_record(self._session, tag, scalar, AnalyticsDataType.SCALAR, global_step=global_step, **kwargs)

    def add_scalars(self, tag: str, scalars: dict[str, float], global_step: int | None = None,
                    **kwargs: Any) -> None:
        write_record(self._session, tag, scalars, AnalyticsDataType.SCALARS, global_step=global_step, **kwargs)

    def flush(self) -> None:
        """Records are written as they come and sent in batches; nothing to do here."""


class WandBWriter:
    """Weights & Biases-style writer bound to the current site (``log(metrics, step)``)."""

    def __init__(self) -> None:
        self._session = _session()

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        write_record(self._session, "metrics", metrics, AnalyticsDataType.METRICS, global_step=step)


class MLflowWriter:
    """MLflow-style writer bound to the current site."""

    def __init__(self) -> None:
        self._session = _session()

    def log_param(self, key: str, value: Any) -> None:
        write_record(self._session, key, value, AnalyticsDataType.PARAMETER)

    def log_params(self, values: dict[str, Any]) -> None:
        write_record(self._session, "params", values, AnalyticsDataType.PARAMETERS)

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        write_record(self._session, key, value, AnalyticsDataType.METRIC, global_step=step)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        write_record(self._session, "metrics", metrics, AnalyticsDataType.METRICS, global_step=step)

    def log_text(self, text: str, artifact_file_path: str) -> None:
        write_record(self._session, "text", text, AnalyticsDataType.TEXT, path=artifact_file_path)

    def set_tag(self, key: str, tag: Any) -> None:
        write_record(self._session, key, tag, AnalyticsDataType.TAG)

    def set_tags(self, tags: dict[str, Any]) -> None:
        write_record(self._session, "tags", tags, AnalyticsDataType.TAGS)
