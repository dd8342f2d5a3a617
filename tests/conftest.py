"""Shared fixtures: the real Hydra configs, composed and shrunk; a private MLflow store."""

from pathlib import Path

import pytest
from cluster_services import _slurm_service, postgres_database, ray_cluster, slurm_cluster  # noqa: F401
from hydra import compose, initialize_config_dir

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def make_cfg(*overrides: str):
    """The project's real config with `overrides`, as `python run.py <overrides>` composes it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite MLflow store in a temporary directory, used by every run in the test."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri
