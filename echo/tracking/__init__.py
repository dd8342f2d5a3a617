"""Tracking in MLflow: the only package of echo that imports mlflow. A `Tracker` (client.py) sends a
run's writes to a worker process (worker.py); what the store refuses is kept locally (outbox.py).

Why not Lightning's `MLFlowLogger` (docs/tracking.md): it writes synchronously from the training
process (on a 2-core CPU, ~150 epochs/s became ~75 on SQLite; batching 10,000 values takes 0.84 s
instead of 20 s) and cannot end a run KILLED when that process dies.
"""

from echo.tracking.client import SERVICE_ENV, Tracker, close_service_connections, start_tracker, warm_up
from echo.tracking.naming import PARENT_RUN_ENV, PARENT_TAG, SWEEP_TAG, flatten, run_name_and_tags, tracking_uri
from echo.tracking.service import TrackingService
from echo.tracking.store import download_artifact, mlflow_client, run_tags

__all__ = [
    "PARENT_RUN_ENV",
    "PARENT_TAG",
    "SERVICE_ENV",
    "SWEEP_TAG",
    "Tracker",
    "close_service_connections",
    "TrackingService",
    "download_artifact",
    "flatten",
    "mlflow_client",
    "run_name_and_tags",
    "run_tags",
    "start_tracker",
    "tracking_uri",
    "warm_up",
]
