"""MLflow tracking: where runs go, what they are called, and what they hold.

A run is written by a worker process (echo/tracking_worker.py) that batches metrics (one
SQLite or HTTP call per thousand values), so logging costs training almost nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

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


class Tracker:
    """One MLflow run, written by a worker process (`echo.tracking_worker`).

    Calls return at once: messages go down a pipe, and the worker, started before training,
    imports mlflow and writes on the other core. `end` waits until the run is complete.
    """

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str] | None = None):
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self._run_id: str | None = None
        self._worker: subprocess.Popen | None = None

    def start(self, params: dict[str, object]) -> None:
        self._worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("tracking_worker.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches training, which then ends the run as KILLED
        )
        tags = dict(self.tags)
        if parent := os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = parent
        params = {k: str(v) for k, v in params.items()}
        self._send(
            op="start", uri=tracking_uri(), experiment=self.experiment, run_name=self.run_name, tags=tags, params=params
        )

    @property
    def run_id(self) -> str | None:
        if self._run_id is None and self._worker is not None:
            self._run_id = self._worker.stdout.readline().strip() or None
        return self._run_id

    def _send(self, **message) -> None:
        try:
            self._worker.stdin.write(json.dumps(message) + "\n")
            self._worker.stdin.flush()
        except (BrokenPipeError, ValueError):  # the worker died; it said why on stderr
            pass

    def log_metrics(self, rows: list[tuple[str, int, float]]) -> None:
        """(name, step, value) rows; the worker writes them in batches."""
        if rows:
            self._send(op="metrics", rows=rows, ms=int(time.time() * 1000))

    def log_text(self, text: str, name: str) -> None:
        self._send(op="text", text=text, name=name)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._send(op="artifact", path=str(Path(path).resolve()), artifact_path=artifact_path)

    def log_learning_curve(self, history: list[tuple[str, int, float]], target: float) -> None:
        self._send(op="curve", history=history, target=target)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send(op="tags", tags=tags)

    def end(self, status: str = "FINISHED", error: str | None = None, timeout: float = 300) -> None:
        """Close the run as FINISHED, FAILED or KILLED once everything sent is written."""
        if self._worker is None:
            return
        self._send(op="end", status=status, error=error)
        try:
            self._worker.stdin.close()
        except BrokenPipeError:
            pass
        if self._worker.wait(timeout) != 0:
            print(f"echo: MLflow tracking failed (see above); tracking URI {tracking_uri()}", file=sys.stderr)
        self._worker = None


def start_tracker(cfg, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
    """Start tracking a run of `cfg`: its params are the resolved config, flattened with dots."""
    from omegaconf import OmegaConf

    tracker = Tracker(cfg.logger.experiment, run_name, tags)
    tracker.start(flatten(OmegaConf.to_container(cfg, resolve=True)))
    return tracker


def run_name_and_tags(hydra_cfg) -> tuple[str, dict[str, str]]:
    """A run is named by its command-line overrides ("model=encdec,task.n_out=2"); a sweep's
    jobs share the sweep's tag."""
    name = hydra_cfg.job.override_dirname or "default"
    tags = {}
    if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
        tags = {SWEEP_TAG: Path(hydra_cfg.sweep.dir).name, "echo.job": str(hydra_cfg.job.num)}
    return name, tags


class SweepCallback(Callback):
    """A multirun is one parent MLflow run; its jobs are children (`mlflow.parentRunId`).

    The parent is created in the launching process before any job starts, which also
    creates the store and the experiment once (parallel jobs racing on a fresh SQLite
    file crash). At the end the parent gets a table of its children and the best one.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        if config.logger.name != "mlflow":
            return
        from mlflow import MlflowClient

        from echo.tracking_worker import experiment_id

        sweep = Path(config.hydra.sweep.dir).name
        excluded = set(config.hydra.job.config.override_dirname.exclude_keys)
        overrides = " ".join(o for o in config.hydra.overrides.task if o.split("=")[0] not in excluded)
        self.client = MlflowClient(tracking_uri())
        run = self.client.create_run(
            experiment_id(self.client, config.logger.experiment),
            run_name=f"sweep {overrides}",
            tags={SWEEP_TAG: sweep, "echo.sweep_parent": "true", "echo.overrides": overrides},
        )
        self.parent = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.parent
        atexit.register(self._end, "KILLED")  # if the sweep dies before on_multirun_end

    def on_multirun_end(self, config, **kwargs) -> None:
        if getattr(self, "parent", None):
            self.client.log_text(self.parent, sweep_table(self.client, self.parent), "sweep.md")
            self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.parent is not None:
            self.client.set_terminated(self.parent, status)
            os.environ.pop(PARENT_RUN_ENV, None)
            self.parent = None


def sweep_table(client, parent_run_id: str, metric: str = "val/exact_match") -> str:
    """A Markdown table of a sweep's child runs, best `metric` first."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
    children.sort(key=lambda r: -r.data.metrics.get(metric, -1.0))
    columns = ["val/exact_match", "test/exact_match", "time_to_target_s", "train_time_s"]
    lines = ["| run | status | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for run in children:
        values = [f"{run.data.metrics[c]:.4g}" if c in run.data.metrics else "" for c in columns]
        lines.append(f"| {run.info.run_name} | {run.info.status} | " + " | ".join(values) + " |")
    if children:
        client.set_tag(parent_run_id, "echo.best_run", children[0].info.run_name)
    return "\n".join(lines) + "\n"
