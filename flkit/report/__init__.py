"""Observability: experiment-tracking receivers (TensorBoard, MLflow, W&B), used by the server
and, for ``client_side`` tracking, by the sites themselves (``tracking``); and ``flkit report``,
a run's ``metrics.json`` drawn as a PNG and a self-contained HTML page (``history``, ``render``)."""
