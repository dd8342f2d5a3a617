"""MLflow tracking: where runs go, what they are called, and what they hold.

A run is written by a worker process (echo/tracking_worker.py) that batches metrics (one
SQLite or HTTP call per thousand values), so logging costs training almost nothing.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from echo.tracking_worker import ANSWER

PARENT_RUN_ENV = "ECHO_PARENT_RUN_ID"  # set by the sweep callback for its jobs
SWEEP_TAG = "echo.sweep"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else `mlflow.db` (SQLite) in the current directory,
    where a plain `mlflow ui` finds it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mlflow_client():
    """An `MlflowClient` on the tracking store (`tracking_uri()`), for reading runs and artifacts."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri())


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


WORKER = str(Path(__file__).with_name("tracking_worker.py"))
SERVICE_ENV = "ECHO_TRACKING_SERVICE"  # a parallel sweep's tracking service, for its local jobs


class _Worker:
    """A tracking worker process (`echo.tracking_worker`), writing one run after another.

    Starting one costs an interpreter and an mlflow import (seconds of CPU on a small machine),
    so a process keeps its worker between runs: the jobs of a sequential sweep, or the jobs a
    parallel launcher's worker process runs in turn, share one. It is only reused from the
    process, directory and environment it was started in, where a new one would behave the same.
    """

    def __init__(self):
        self.owner = _owner()
        self.process = subprocess.Popen(
            [sys.executable, WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches training, which then ends the run as KILLED
        )
        self._read_answers_from(self.process.stdout)

    def _read_answers_from(self, stream) -> None:
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.gone = threading.Event()
        threading.Thread(target=self._read_answers, args=(stream,), daemon=True).start()

    def _read_answers(self, stream) -> None:
        """Queue the worker's answers (lines it marks as such; MLflow may print others); None at its end."""
        try:
            for line in stream:
                if line.startswith(ANSWER):
                    self.answers.put(line[len(ANSWER) :].strip())
        except OSError:
            pass
        self.gone.set()
        self.answers.put(None)

    def reusable(self) -> bool:
        return not self.gone.is_set() and self.owner == _owner()

    def _write(self, text: str) -> None:
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def send(self, message: dict) -> None:
        try:
            self._write(json.dumps(message) + "\n")
        except (OSError, ValueError):  # the worker died; it said why on stderr
            pass

    def answer(self, timeout: float | None = None) -> str | None:
        """The worker's next answer; None if it exited first. TimeoutError after `timeout` seconds."""
        try:
            return self.answers.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def close(self, wait: float = 300) -> None:
        """No more runs: the worker ends a run still open as KILLED, then exits (waited for up to `wait` s)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            pass


class _ServiceConnection(_Worker):
    """A connection to a parallel sweep's tracking service (`tracking_worker.py --serve`), used
    as a worker of this process's own: the service writes runs from all the sweep's jobs at once."""

    def __init__(self, path: str):
        self.owner = _owner()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.stream = self.sock.makefile("w", encoding="utf-8")
        self._read_answers_from(self.sock.makefile("r", encoding="utf-8"))

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def close(self, wait: float = 300) -> None:
        """No more runs: the service ends a run still open as KILLED (waited for up to `wait` s)."""
        try:
            self.stream.close()
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.gone.wait(wait)
        self.sock.close()


class TrackingService:
    """A tracking worker that writes the runs of all a parallel sweep's local jobs at once
    (`tracking_worker.py --serve`), so that none of them starts a worker of its own.

    The launching process starts it before the jobs (echo/sweeps.py): it imports mlflow while the
    sweep starts, on a core that is idle then. Jobs find it through SERVICE_ENV; one whose
    directory differs, or that runs elsewhere, starts its own worker.
    """

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="echo-tracking-")
        path = os.path.join(self.folder, "socket")
        self.process = subprocess.Popen(
            [sys.executable, WORKER, "--serve", path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the jobs, which end their runs
        )
        if self.process.stdout.readline().strip() == ANSWER + "ready":  # listening
            os.environ[SERVICE_ENV] = json.dumps({"socket": path, "cwd": os.getcwd()})
        self.process.stdout.close()

    def close(self, wait: float = 30) -> None:
        """No more jobs: it exits once every job's connection has closed (waited for up to `wait` s)."""
        os.environ.pop(SERVICE_ENV, None)
        if self.process.stdin.closed:
            return
        self.process.stdin.close()
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


# Set by torch and Lightning in the training process as they load and train; MLflow reads none.
_NOT_FOR_MLFLOW = ("TORCH", "PYTORCH_", "PL_", "CUDA_")


def _owner() -> tuple:
    """What a tracking worker inherits from the process starting it: its id, directory, environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_MLFLOW)}
    return os.getpid(), os.getcwd(), env


_workers: list[_Worker] = []  # this process's workers, to close at exit
_idle: list[_Worker] = []  # those between runs (one, unless runs overlapped)


def _take_worker() -> _Worker:
    while _idle:
        worker = _idle.pop()
        if worker.reusable():
            return worker
        _close(worker)
    if not _workers:
        atexit.register(_close_all)
    _workers.append(_connect_to_service() or _Worker())
    return _workers[-1]


def _connect_to_service() -> _ServiceConnection | None:
    """A connection to the sweep's tracking service, if there is one and it writes from this directory."""
    service = json.loads(os.environ.get(SERVICE_ENV) or "null")
    if service is None or service["cwd"] != os.getcwd():
        return None
    try:
        return _ServiceConnection(service["socket"])
    except OSError:  # it is gone, or on another machine
        return None


def _close(worker: _Worker, wait: float = 300) -> None:
    if worker in _workers:
        _workers.remove(worker)
    worker.close(wait)


def _close_all() -> None:
    """At exit: every run this process left open ends KILLED, and its workers exit."""
    _idle.clear()
    for worker in list(_workers):
        if worker.owner[0] == os.getpid():  # not a forked parent's
            _close(worker)


class Tracker:
    """One MLflow run, written by a worker process (`echo.tracking_worker`).

    Calls return at once: messages go down a pipe, and the worker, started before training (or
    kept from this process's previous run), imports mlflow and writes on the other core. `end`
    waits until the run is complete.
    """

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str] | None = None):
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self._run_id: str | None = None
        self._worker: _Worker | None = None
        self._answered = False

    def start(self, params: dict[str, object]) -> None:
        self._worker = _take_worker()
        tags = dict(self.tags)
        if parent := os.environ.get(PARENT_RUN_ENV):
            tags["mlflow.parentRunId"] = parent
        params = {k: str(v) for k, v in params.items()}
        self._send(
            op="start", uri=tracking_uri(), experiment=self.experiment, run_name=self.run_name, tags=tags, params=params
        )

    @property
    def run_id(self) -> str | None:
        if not self._answered and self._worker is not None:
            self._run_id, self._answered = self._worker.answer() or None, True
        return self._run_id

    def _send(self, **message) -> None:
        self._worker.send(message)

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
        worker, self._worker = self._worker, None
        worker.send({"op": "end", "status": status, "error": error})
        try:
            if not self._answered:  # the worker answers `start` first
                self._run_id, self._answered = worker.answer(timeout), True
            if self._run_id is not None and worker.answer(timeout) == "ended":
                _idle.append(worker)  # for this process's next run
                return
        except TimeoutError:
            _close(worker, wait=0)  # it ends the run when it can, then exits
            problem = f"did not finish in {timeout:g} s"
        else:
            _close(worker)  # it exited
            problem = "failed (see above)"
        print(f"echo: MLflow tracking {problem}; tracking URI {tracking_uri()}", file=sys.stderr)


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


def log_artifacts(run_id: str, folder: str, artifact_path: str) -> None:
    """Copy the files in `folder` into run `run_id`'s artifacts under `artifact_path`, now."""
    mlflow_client().log_artifacts(run_id, folder, artifact_path)
