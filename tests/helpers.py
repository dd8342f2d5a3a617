"""Running `python run.py ...` as a user does, and reading what it left in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

RUN_PY = str(Path(__file__).resolve().parents[1] / "run.py")
# A few epochs with two validations: enough to produce every metric, quick on 2 cores.
TINY = ["trainer.max_epochs=10", "trainer.check_val_every_n_epoch=5", "progress=false"]


def run_py(*args: str, cwd, uri: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python run.py <args>` in `cwd`, tracking to `uri`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("ECHO_PARENT_RUN_ID", None)
    return subprocess.run(
        [sys.executable, RUN_PY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **popen
    )


def start_run_py(*args: str, cwd, uri: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("ECHO_PARENT_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, RUN_PY, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def all_runs(uri: str, experiment: str = "echo") -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def sweep_runs(uri: str) -> tuple[object, list]:
    """The one sweep parent in the store and its children."""
    runs = all_runs(uri)
    parents = [r for r in runs if r.data.tags.get("echo.sweep_parent") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    from mlflow import MlflowClient

    return [a.path for a in MlflowClient(uri).list_artifacts(run_id, path)]
