"""Reading and writing the store directly, for what is not one run's stream of metrics: sweep parents,
checkpoints, reports. Only the tracking package imports mlflow; everything else comes here."""

from __future__ import annotations

from echo.tracking.naming import tracking_uri
from echo.tracking.worker import experiment_id

__all__ = ["experiment_id", "mlflow_client"]


def mlflow_client():
    """An `MlflowClient` on the tracking store (`tracking_uri()`), for reading runs and artifacts."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())
