"""A process keeps its tracking worker for its next run: a sweep's jobs share one, each run
still complete and its own, and a killed process still leaves its current run KILLED."""

import os
import signal
import time
from pathlib import Path

import pytest
from helpers import all_runs, start_run_py
from mlflow import MlflowClient

from echo import tracking
from echo.tracking import Tracker


def _run(name: str) -> tuple[str, int]:
    """One tracked run of this process; its id and the pid of the worker that wrote it."""
    tracker = Tracker("echo", name)
    tracker.start({"name": name})
    tracker.log_metrics([("m", step, float(len(name))) for step in (1, 2)])
    tracker.end()
    return tracker.run_id, tracking._idle[-1].process.pid


def test_runs_of_one_process_share_its_worker_unless_the_directory_changed(store, tmp_path, monkeypatch):
    a, worker = _run("a")
    bb, same_worker = _run("bb")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ccc, new_worker = _run("ccc")  # a new worker, as if started by a new process here
    assert same_worker == worker and new_worker != worker
    client = MlflowClient(store)
    for run_id, name in ((a, "a"), (bb, "bb"), (ccc, "ccc")):
        run = client.get_run(run_id)  # written and ended before `end` returned
        assert run.info.status == "FINISHED" and run.info.run_name == name and run.data.params == {"name": name}
        assert [m.value for m in client.get_metric_history(run_id, "m")] == [len(name)] * 2


def _tracking_workers(pid: int) -> set[int]:
    """The tracking worker processes that process `pid` started and that are running now."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"tracking_worker.py" in command:
            found.add(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_sweeps_jobs_share_one_worker_and_a_killed_sweep_leaves_its_current_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("echo")  # the schema, before polling it
    # job 0 trains 10 epochs; job 1 trains until it is killed
    args = ["-m", "trainer.max_epochs=10,100000", "stop_at=null", "trainer.check_val_every_n_epoch=5", "progress=false"]
    proc = start_run_py(*args, cwd=tmp_path, uri=uri)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "job 1 never started"
            workers |= _tracking_workers(proc.pid)
            running = [r for r in all_runs(uri) if r.info.status == "RUNNING" and "mlflow.parentRunId" in r.data.tags]
            if running and "trainer.max_epochs=100000" in running[0].info.run_name:  # named at its creation
                break
            time.sleep(0.2)
        time.sleep(2)  # some epochs of job 1
        workers |= _tracking_workers(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs: the worker sees its stdin close
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 30
    while any(r.info.status == "RUNNING" for r in all_runs(uri) if "mlflow.parentRunId" in r.data.tags):
        assert time.monotonic() < deadline, "the killed job's run stayed RUNNING"
        time.sleep(0.5)
    assert len(workers) == 1  # both jobs, one worker
    children = {r.data.params["trainer.max_epochs"]: r for r in all_runs(uri) if "mlflow.parentRunId" in r.data.tags}
    assert {k: r.info.status for k, r in children.items()} == {"10": "FINISHED", "100000": "KILLED"}
    client = MlflowClient(uri)
    finished, killed = children["10"].info.run_id, children["100000"].info.run_id
    assert [m.step for m in client.get_metric_history(finished, "train/loss")] == list(range(1, 11))
    assert [m.step for m in client.get_metric_history(finished, "val/exact_match")] == [5, 10]
    assert "test/exact_match" in children["10"].data.metrics
    assert "test/exact_match" not in children["100000"].data.metrics
    assert client.get_metric_history(killed, "train/loss")[0].step == 1  # its own history, from epoch 1
