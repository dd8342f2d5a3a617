"""A shared tracking server: parallel jobs over HTTP lose nothing, and metrics stay buffered."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from helpers import TINY, all_runs, artifacts, run_py, sweep_runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mlflow_server(request, tmp_path):
    """A real `mlflow server` on 127.0.0.1 with an artifact destination and a SQLite backend, or a
    fresh database on a real PostgreSQL (tests/services/postgres.sh), as a team would run it."""
    backend = f"sqlite:///{tmp_path}/server.db"
    if request.param == "postgres":
        from cluster_services import fresh_database, need_module

        need_module("psycopg", 'pip install -e ".[server]"  (psycopg[binary]: SQLAlchemy 2.1 drives postgresql://)')
        backend = fresh_database(request.getfixturevalue("postgres_database"))
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", backend, "--workers", "1"]
    command += ["--artifacts-destination", str(tmp_path / "artifacts")]
    # its own process group: the server's workers are stopped with it
    server = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded machine starts it slowly
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_eight_parallel_jobs_against_a_server_lose_nothing(mlflow_server, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sizes = [str(h) for h in range(10, 90, 10)]
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"model.hidden_size={','.join(sizes)}", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=mlflow_server)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    parent, children = sweep_runs(mlflow_server)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["model.hidden_size"] for c in children) == sorted(sizes)
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val/exact_match", "test/exact_match", "train_time_s"} <= set(child.data.metrics)
        assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == list(range(1, 11))
        assert "learning_curve.png" in artifacts(mlflow_server, child.info.run_id)
    assert {"sweep.md", "sweep.png"} <= set(artifacts(mlflow_server, parent.info.run_id))


@pytest.mark.slow
def test_a_checkpoint_uploads_and_a_run_resumes_through_the_server(mlflow_server, tmp_path):
    """Checkpoints go into the server's artifact destination, and `resume=` downloads them from there."""
    from mlflow import MlflowClient

    result = run_py(*TINY, "checkpoint_every=5", cwd=tmp_path, uri=mlflow_server)
    assert result.returncode == 0, result.stderr[-3000:]
    (first,) = all_runs(mlflow_server)
    assert "checkpoints/last.ckpt" in artifacts(mlflow_server, first.info.run_id, "checkpoints")
    assert list((tmp_path / "artifacts").rglob("last.ckpt")), "not uploaded to the server's artifact destination"
    assert not (tmp_path / "mlruns").exists()

    result = run_py(f"resume={first.info.run_id}", "trainer.max_epochs=20", cwd=tmp_path, uri=mlflow_server)
    assert result.returncode == 0, result.stderr[-3000:]
    (resumed,) = [r for r in all_runs(mlflow_server) if r.info.run_id != first.info.run_id]
    assert resumed.info.status == "FINISHED" and resumed.data.tags["echo.resumed_from"] == first.info.run_id
    steps = [m.step for m in MlflowClient(mlflow_server).get_metric_history(resumed.info.run_id, "train/loss")]
    assert steps == list(range(11, 21))


@pytest.mark.slow
def test_metrics_are_buffered_not_sent_every_epoch(store, monkeypatch, capsys):
    """Over HTTP each call costs ~55 ms (docs/tracking.md): the tracking worker, which receives every
    epoch's metrics, must not make one call per epoch."""
    from mlflow import MlflowClient

    from echo.tracking.worker import RunWriter

    calls = []
    log_batch = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            calls.append(len(metrics))
        return log_batch(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    answers = []
    writer = RunWriter(reply=answers.append)
    writer.start(store, "echo", "buffered", {}, {"model.hidden_size": "20"})
    run_id = answers[0]
    for epoch in range(1, 41):  # what a run with validation every epoch sends
        names = ("train/loss", "train/acc", "val/loss", "val/token_acc", "val/exact_match")
        writer.handle(json.dumps({"op": "metrics", "rows": [[name, epoch, 0.5] for name in names], "ms": 0}))
    writer.handle(json.dumps({"op": "end", "status": "FINISHED"}))
    assert answers[-1] == "ended"
    assert sum(calls) == 40 * 5 and len(calls) <= 3, calls
    history = MlflowClient(store).get_metric_history(run_id, "val/exact_match")
    assert [m.step for m in history] == list(range(1, 41))
