"""Reading and writing the store directly, for what is not one run's stream of metrics: sweep parents,
checkpoints, reports. Only the tracking package imports mlflow; everything else comes here."""

from __future__ import annotations

import os

from echo.tracking.naming import tracking_uri
from echo.tracking.worker import experiment_id, new_client, tag_provenance

__all__ = ["download_artifact", "experiment_id", "log_artifacts", "mlflow_client", "run_tags", "tag_provenance"]


def mlflow_client(uri: str | None = None):
    """An `MlflowClient` on the tracking store (`uri`, else `tracking_uri()`), for reading runs and artifacts."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for a file or two: noise
    return new_client(uri or tracking_uri())


def run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of run `run_id` in the tracking store; None if there is no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(mlflow_client().get_run(run_id).data.tags)
    except MlflowException:  # no such run, or a malformed id
        return None


def download_artifact(run_id: str, path: str, folder: str) -> str | None:
    """Download artifact `path` of run `run_id` into `folder`: its local path, or None if it is not there."""
    try:
        return mlflow_client().download_artifacts(run_id, path, folder)
    except Exception:  # MlflowException, OSError: not there
        return None


def log_artifacts(run_id: str, folder: str, artifact_path: str) -> None:
    """Copy the files in `folder` into run `run_id`'s artifacts under `artifact_path`, now."""
    mlflow_client().log_artifacts(run_id, folder, artifact_path)
