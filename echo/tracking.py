"""MLflow tracking: where runs go, what they are called, and what they hold.

Metrics are buffered and written in batches (one SQLite or HTTP call per thousand values),
so logging costs almost nothing per epoch. mlflow itself is imported only when a run starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytorch_lightning as pl

PARENT_RUN_ENV = "ECHO_PARENT_RUN_ID"  # set by the sweep callback for its jobs
SWEEP_TAG = "echo.sweep"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else `mlflow.db` (SQLite) in the current directory,
    where a plain `mlflow ui` finds it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


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


def experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing (tolerating a parallel creator)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another job created it first
        return client.get_experiment_by_name(name).experiment_id


class Tracker:
    """One MLflow run: params at the start, buffered metrics, artifacts, a final status."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str] | None = None, flush_every_s: float = 10.0):
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self.flush_every_s = flush_every_s
        self._buffer: list = []
        self.run_id: str | None = None

    def start(self, params: dict[str, object]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param, RunTag

        self.client = MlflowClient(tracking_uri())
        tags = dict(self.tags)
        if parent := os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(experiment_id(self.client, self.experiment), run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        self._RunTag, self._last_flush = RunTag, time.monotonic()

    def log_metrics(self, rows: list[tuple[str, int, float]], force: bool = False) -> None:
        """Queue (name, step, value) rows; write them when due (or `force`)."""
        now_ms = int(time.time() * 1000)
        self._buffer += [(name, step, value, now_ms) for name, step, value in rows]
        if force or time.monotonic() - self._last_flush > self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(name, float(value), ts, step) for name, step, value, ts in self._buffer]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self._buffer, self._last_flush = [], time.monotonic()

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, figure, name: str) -> None:
        self.client.log_figure(self.run_id, figure, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[self._RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        """Write what is buffered and close the run as FINISHED, FAILED or KILLED."""
        if self.run_id is None:
            return
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status)


class TrackingCallback(pl.Callback):
    """Hands the module's new metric rows to the tracker after every validation."""

    def __init__(self, tracker: Tracker):
        self.tracker, self._sent = tracker, 0

    def send(self, module, force: bool = False) -> None:
        module.flush_train_metrics()
        rows, self._sent = module.history[self._sent :], len(module.history)
        self.tracker.log_metrics(rows, force=force)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.send(module)

    def on_train_end(self, trainer, module) -> None:
        self.send(module)

    def on_exception(self, trainer, module, exception) -> None:
        self.send(module)  # keep the metrics so far of a crashed or interrupted run


def run_name_and_tags(hydra_cfg) -> tuple[str, dict[str, str]]:
    """A run is named by its command-line overrides ("model=encdec,task.n_out=2"); a sweep's
    jobs share the sweep's tag."""
    name = hydra_cfg.job.override_dirname or "default"
    tags = {}
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        tags = {SWEEP_TAG: Path(hydra_cfg.sweep.dir).name, "echo.job": str(hydra_cfg.job.num)}
    return name, tags
