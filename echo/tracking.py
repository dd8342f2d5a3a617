"""MLflow tracking: where runs go, what they are called, and what they hold.

A run is written by a worker process (echo/tracking_worker.py) that batches metrics (one
SQLite or HTTP call per thousand values), so logging costs training almost nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

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

    def log_learning_curve(self, history: list[tuple[str, int, float]], target: float) -> None:
        self._send(op="curve", history=history, target=target)

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
