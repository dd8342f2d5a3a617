"""Reading the store directly, for what is not one run's stream of writes: sweeps, checkpoints, reports."""

from __future__ import annotations

import os

from echo.tracking.naming import tracking_uri
from echo.tracking.worker import new_client


def mlflow_client():
    """An `MlflowClient` on the tracking store."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for a file or two: noise
    return new_client(tracking_uri())


def run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of run `run_id`; None if there is no such run."""
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


def run_record(run_id: str) -> dict | None:
    """Run `run_id`'s status, experiment name and tags; None if there is no such run."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        run = client.get_run(run_id)
    except MlflowException:  # no such run, or a malformed id
        return None
    experiment = client.get_experiment(run.info.experiment_id)
    return {"status": run.info.status, "experiment": experiment.name, "tags": dict(run.data.tags)}


def sweep_jobs(parent_run_id: str) -> list:
    """A sweep's jobs, each as its last run, oldest first (sweep_summary.children)."""
    from echo.tracking.sweep_summary import children

    return sorted(children(mlflow_client(), parent_run_id), key=lambda run: run.info.start_time or 0)


def saved_files(run_id: str, folder: str) -> set[str]:
    """The names of the files in run `run_id`'s artifacts under `folder`."""
    try:
        return {os.path.basename(a.path) for a in mlflow_client().list_artifacts(run_id, folder)}
    except Exception:  # MlflowException, OSError: nothing there
        return set()
