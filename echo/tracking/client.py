"""The training side of tracking: a `Tracker` per run, sending messages to a worker process
(echo/tracking/worker.py) that writes them, so logging costs training almost nothing."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from echo.tracking.naming import PARENT_RUN_ENV, flatten, parent_run_id, run_page, tracking_uri
from echo.tracking.outbox import ROOT, TrackingFailed, TrackingStartError, failed_message
from echo.tracking.worker import ANSWER

WORKER = str(Path(__file__).with_name("worker.py"))
SERVICE_ENV = "ECHO_TRACKING_SERVICE"  # a parallel sweep's tracking service, for its local jobs


def start_worker(*args: str) -> subprocess.Popen:
    """`worker.py *args` in a session of its own: Ctrl-C reaches the training processes, which end their runs."""
    command = [sys.executable, WORKER, *args]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)


class _Worker:
    """A tracking worker process, writing one run after another. Starting one costs seconds of CPU, so
    a process keeps it between runs, reused only from the process, directory and environment it started in."""

    def __init__(self):
        self.owner = _owner()
        self.process = start_worker()
        self.stream = self.process.stdin
        self._read_answers_from(self.process.stdout)

    def _read_answers_from(self, stream) -> None:
        """Queue the worker's answers; None at its end."""
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.gone = threading.Event()

        def read() -> None:
            with contextlib.suppress(OSError):
                for line in stream:
                    if line.startswith(ANSWER):
                        self.answers.put(line[len(ANSWER) :].strip())
            self.gone.set()
            self.answers.put(None)

        threading.Thread(target=read, daemon=True).start()

    def send(self, message: dict) -> None:
        with contextlib.suppress(OSError, ValueError):  # the worker died; it said why on stderr
            self.stream.write(json.dumps(message) + "\n")
            self.stream.flush()

    def close(self, wait: float = 300) -> None:
        """No more runs: the worker ends a run still open as KILLED, then exits (waited for up to `wait` s)."""
        with contextlib.suppress(OSError):
            self.stream.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(wait)


class _ServiceConnection(_Worker):
    """A connection to a parallel sweep's tracking service (`worker.py --serve`), used as a worker."""

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

    def close(self, wait: float = 300) -> None:
        with contextlib.suppress(OSError):
            self.stream.close()
            self.sock.shutdown(socket.SHUT_WR)
        self.gone.wait(wait)
        self.sock.close()


# Set by torch and Lightning in the training process as they load and train; MLflow reads none.
_NOT_FOR_MLFLOW = ("TORCH", "PYTORCH_", "PL_", "CUDA_", PARENT_RUN_ENV)  # the worker is told the parent


def _owner() -> tuple:
    """What a tracking worker inherits from the process starting it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_MLFLOW)}
    return os.getpid(), os.getcwd(), env


_workers: list[_Worker] = []  # this process's workers, to close at exit
_idle: list[_Worker] = []  # those between runs (one, unless runs overlapped)


def _take_worker() -> _Worker:
    while _idle:
        worker = _idle.pop()
        if not worker.gone.is_set() and worker.owner == _owner():
            return worker
        _close(worker)
    if not _workers:
        atexit.register(_close_all)
    worker = None
    service = json.loads(os.environ.get(SERVICE_ENV) or "null")
    if service is not None and service["cwd"] == os.getcwd():  # the sweep's tracking service, here
        with contextlib.suppress(OSError):  # it is gone, or on another machine
            worker = _ServiceConnection(service["socket"])
    _workers.append(worker or _Worker())
    return _workers[-1]


def _close(worker: _Worker, wait: float = 300) -> None:
    if worker in _workers:
        _workers.remove(worker)
    worker.close(wait)


def close_service_connections() -> None:
    """Close this process's idle connections to the sweep's tracking service (an in-process launcher's
    jobs keep them), so that the service can exit."""
    for worker in [w for w in _idle if isinstance(w, _ServiceConnection)]:
        _idle.remove(worker)
        _close(worker)


def _close_all() -> None:
    """At exit: every run this process left open ends KILLED, and its workers exit."""
    _idle.clear()
    for worker in list(_workers):
        if worker.owner[0] == os.getpid():  # not a forked parent's
            _close(worker)


class Tracker:
    """One MLflow run, written by a worker process: calls return at once, `end` waits until it is written."""

    def __init__(self, experiment: str, run_name: str, tags: dict[str, str] | None = None):
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self._run_id: str | None = None
        self._worker: _Worker | None = None
        self._answered, self._end_sent = False, False
        self.start_error: str | None = None  # why the store could not create the run

    def start(self, params: dict[str, object]) -> None:
        self._worker = _take_worker()
        tags = dict(self.tags)
        if parent := parent_run_id():
            tags["mlflow.parentRunId"] = parent
        params = {k: str(v) for k, v in params.items()}
        self._send(
            op="start", uri=tracking_uri(), experiment=self.experiment, run_name=self.run_name, tags=tags, params=params
        )

    @property
    def run_id(self) -> str | None:
        if not self._answered and self._worker is not None:
            self._take_start_answer(self._worker.answers.get())
        return self._run_id

    def _take_start_answer(self, answer: str | None) -> None:
        self._answered = True
        if answer is None:
            self.start_error = "the tracking worker exited (see its error above)"
        elif answer.startswith("failed "):
            self.start_error = answer.removeprefix("failed ")
        else:
            self._run_id = answer

    def check_started(self) -> None:
        """Wait until the store has created the run; TrackingStartError if it could not."""
        if self.run_id is None:
            raise TrackingStartError(self._start_failure())

    def _start_failure(self) -> str:
        return (
            f"could not start an MLflow run in experiment '{self.experiment}' of {tracking_uri()} "
            f"({self.start_error}): fix the store or logger.experiment, or run with logger=none"
        )

    def _send(self, **message) -> None:
        self._worker.send(message)

    def log_metrics(self, rows: list[tuple[str, int, float]]) -> None:
        """(name, step, value) rows."""
        if rows:
            self._send(op="metrics", rows=rows, ms=int(time.time() * 1000))

    def log_text(self, text: str, name: str) -> None:
        self._send(op="text", text=text, name=name)

    def log_learning_curve(
        self, history: list[tuple[str, int, float]], target: float, baseline: float | None = None
    ) -> None:
        """`learning_curve.png`; `baseline`: a loss to draw across it (chance/loss)."""
        self._send(op="curve", history=history, target=target, baseline=baseline)

    def log_artifacts(self, folder: str, path: str, remove: bool = False) -> None:
        """The files in `folder` under `path`; `remove`: the worker removes the folder afterwards."""
        self._send(op="artifacts", folder=folder, path=path, remove=remove)

    def log_tags(self, tags: dict[str, str]) -> None:
        self._send(op="tags", tags=tags)

    def page(self, timeout: float = 300) -> str | None:
        """The address of the run's page in the MLflow UI, once what was sent so far is written (None if unknown)."""
        if self._worker is None or self.run_id is None:
            return None
        self._send(op="where")
        try:
            experiment = self._worker.answers.get(timeout=timeout)
        except queue.Empty:
            return None
        return run_page(experiment, self.run_id) if experiment else None

    def log_length_generalisation(
        self, by_length: dict[int, tuple[float, ...]], trained: tuple[int, int], chance: float
    ) -> None:
        """`length_generalisation.png` of {length: (token acc, exact match)}."""
        rows = [[n, token, exact] for n, (token, exact, *_) in sorted(by_length.items())]
        self._send(op="lengths", rows=rows, trained=list(trained), chance=chance)

    def log_params(self, params: dict[str, object]) -> None:
        """More params, known once training is set up (e.g. `n_params`)."""
        self._send(op="params", params={k: str(v) for k, v in params.items()})

    def log_by_position_plot(self, accuracy: list[float], chance: float) -> None:
        """The plot of `test/token_acc_by_position` (accuracy at output positions 1, 2, ...)."""
        self._send(op="positions", accuracy=accuracy, chance=chance)

    def end_soon(self, status: str = "FINISHED", error: str | None = None) -> None:
        """Ask for the run's end now without waiting (a population's finished member); `end` then only
        waits for it. Its status stands."""
        if self._worker is not None and not self._end_sent:
            self._worker.send({"op": "end", "status": status, "error": error})
            self._end_sent = True

    def end(self, status: str = "FINISHED", error: str | None = None, timeout: float = 300) -> None:
        """Close the run (unless `end_soon` did) once everything sent is written. TrackingStartError if the
        store never created the run; TrackingFailed if it refused writes (kept in a local folder)."""
        if self._worker is None:
            return
        self.end_soon(status, error)
        worker, self._worker = self._worker, None
        try:
            if not self._answered:  # the worker answers `start` first
                self._take_start_answer(worker.answers.get(timeout=timeout))
            ended = worker.answers.get(timeout=timeout)
        except queue.Empty:
            _close(worker, wait=0)  # it ends the run when it can (or keeps it locally), then exits
            kept = f"; what it has not written yet goes to ./{ROOT} when it gives up"
            raise TrackingFailed(f"writing to {tracking_uri()} did not finish in {timeout:g} s{kept}") from None
        if ended is None:
            _close(worker)  # it exited
            raise TrackingFailed(f"the tracking worker writing to {tracking_uri()} exited (see its error above)")
        _idle.append(worker)  # for this process's next run
        if self.start_error is not None:
            raise TrackingStartError(self._start_failure())
        if ended.startswith("unsent "):
            unsent = json.loads(ended.removeprefix("unsent "))
            raise TrackingFailed(failed_message(unsent, self.run_name, self._run_id, tracking_uri()))


def warm_up() -> None:
    """Start this process's tracking worker now, to import mlflow and open the store while the
    training process imports torch; the next run's Tracker takes it."""
    if not _idle:
        _idle.append(_take_worker())
    _idle[-1].send({"op": "open", "uri": tracking_uri()})


def start_tracker(cfg, run_name: str, tags: dict[str, str] | None = None) -> Tracker:
    """Start tracking a run of `cfg`: its params are the resolved config, flattened with dots; the
    worker tags where it came from (provenance.py)."""
    from omegaconf import OmegaConf

    tracker = Tracker(cfg.logger.experiment, run_name, tags)
    tracker.start(flatten(OmegaConf.to_container(cfg, resolve=True)))
    tracker._send(op="provenance", argv=list(sys.argv))
    return tracker
