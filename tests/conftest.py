"""Fixtures. What the tests share besides fixtures (composing the real configs, running
`python run.py`, reading MLflow) is in helpers.py."""

import pytest
from cluster_services import _slurm_service, postgres_database, ray_cluster, slurm_cluster  # noqa: F401


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite MLflow store in a temporary directory, used by every run in the test."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
