"""Where runs go and what they are called: the store's URI, run names, the tags a sweep shares."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

PARENT_RUN_ENV = "ECHO_PARENT_RUN_ID"  # set by the sweep callback for its jobs
SWEEP_TAG = "echo.sweep"
PARENT_TAG = "echo.sweep_parent"  # "true" on a sweep's parent run
# A sweep's parent run while another process creates it: calling this sets PARENT_RUN_ENV (echo.sweeps).
PENDING_PARENT: list = []


def parent_run_id() -> str | None:
    """The parent run of this process's runs (PARENT_RUN_ENV), once any pending one is created."""
    while PENDING_PARENT:
        PENDING_PARENT.pop()()
    return os.environ.get(PARENT_RUN_ENV)


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else `mlflow.db` in the current directory (where `mlflow ui` looks)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# `${tracking_uri:}`: where this process tracks runs, for jobs that do not inherit its environment (Ray's)
OmegaConf.register_new_resolver("tracking_uri", tracking_uri, replace=True)


def run_page(experiment_id: str, run_id: str) -> str:
    """The address of a run's page: on the tracking server if the store is one, else on `mlflow ui`'s default."""
    uri = tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def where_line(what: str, name: str, run_id: str, page: str | None) -> str:
    """The line that says where a run is kept and, where known, its page in the MLflow UI."""
    line = f"MLflow {what} '{name}' ({run_id}) in {tracking_uri()}"
    if page is None:
        return f"{line}: see it with `mlflow ui`"
    return f"{line}: {page}" + ("" if tracking_uri().startswith("http") else " (with `mlflow ui` running here)")


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_name_and_tags(hydra_cfg) -> tuple[str, dict[str, str]]:
    """A run is named by its command-line overrides ("model=encdec,task.n_out=2"); a sweep's jobs share its tag."""
    name = hydra_cfg.job.override_dirname or "default"
    tags = {}
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        tags = {SWEEP_TAG: Path(hydra_cfg.sweep.dir).name, "echo.job": str(hydra_cfg.job.num)}
    return name, tags
