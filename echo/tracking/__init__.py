"""Tracking in MLflow: the only package of echo that imports mlflow.

    naming.py   where runs go (`tracking_uri`), run names, the tags a sweep's runs share
    client.py   `Tracker`: one run, as messages to a worker process; `start_tracker(cfg, ...)`
    worker.py   the worker process that writes runs (its messages are tabled at its top)
    outbox.py   what the store refused, kept in ./echo-unsent/<run>/ to upload later (echo/upload.py)
    service.py  one worker for all the local jobs of a parallel sweep
    store.py    direct reads and writes: sweep parents, checkpoints, reports, stored networks
    sweep_summary.py  a sweep's summary on its parent run: table, seed statistics, plot, best child
    provenance.py  where a run came from: git commit and diff, command, versions, machine

Why not Lightning's `MLFlowLogger`: it writes from the training process, synchronously. Measured
on a 2-core CPU (listing A, 500 epochs): a lean Trainer ran ~150 epochs/s, ~75 with MLFlowLogger
on SQLite (~4 ms per call; ~55 ms over HTTP to a server); importing mlflow costs ~1 s of the
training process's start-up. The worker imports mlflow and writes on the other core while
training runs, batching 1,000 metrics per call (0.84 s for 10,000 values instead of 20 s). It
also ends a run KILLED when its training process dies, even by SIGKILL (its stdin closes), which
an in-process logger cannot; and sweep parents and checkpoints need the client API anyway.
"""

from echo.tracking.client import SERVICE_ENV, Tracker, close_service_connections, start_tracker, warm_up
from echo.tracking.naming import (
    PARENT_RUN_ENV,
    PARENT_TAG,
    SWEEP_TAG,
    flatten,
    run_name_and_tags,
    tracking_uri,
)
from echo.tracking.service import TrackingService
from echo.tracking.store import download_artifact, log_artifacts, mlflow_client, run_tags

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
    "log_artifacts",
    "mlflow_client",
    "run_name_and_tags",
    "run_tags",
    "start_tracker",
    "tracking_uri",
    "warm_up",
]
