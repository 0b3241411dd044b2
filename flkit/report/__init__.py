"""Observability: experiment-tracking receivers (TensorBoard, MLflow, W&B), used by the server
and, for ``client_side`` tracking, by the sites themselves."""
