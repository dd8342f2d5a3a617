"""A process keeps its tracking worker for its next run: a sweep's jobs share one, each run
still complete and its own, and a killed process still leaves its current run KILLED. A
parallel sweep's jobs all write through one tracking service, which draws a run's figures
into the figure it drew the last run's into."""

import io
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import ROOT, TINY, all_runs, run_py, start_run_py, sweep_runs, tracking_workers
from mlflow import MlflowClient

from echo.tracking import SERVICE_ENV, Tracker, TrackingService
from echo.tracking import client as tracking


def _run(name: str) -> tuple[str, int]:
    """One tracked run of this process; its id and the pid of the worker that wrote it."""
    tracker = Tracker("echo", name)
    tracker.start({"name": name})
    tracker.log_metrics([("m", step, float(len(name))) for step in (1, 2)])
    tracker.end()
    return tracker.run_id, tracking._idle[-1].process.pid


@pytest.mark.slow
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


def test_a_run_asked_to_end_soon_is_written_ended_while_its_process_goes_on(store):
    tracker = Tracker("echo", "soon")
    tracker.start({"name": "soon"})
    tracker.log_metrics([("m", 1, 1.0)])
    tracker.end_soon("FINISHED")  # returns at once
    run_id = tracker.run_id  # the worker has made the store (a client made meanwhile would race it)
    client, deadline = MlflowClient(store), time.monotonic() + 30
    while client.get_run(run_id).info.status != "FINISHED":  # before `end` waits for it
        assert time.monotonic() < deadline, "the run was not ended"
        time.sleep(0.05)
    tracker.end("KILLED")  # waits only; the status asked for first stands
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and [m.value for m in client.get_metric_history(run.info.run_id, "m")] == [1.0]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="the service listens on a Unix socket")
def test_a_tracking_service_writes_overlapping_runs_and_ends_a_dropped_one_killed(store):
    service = TrackingService()
    try:
        assert SERVICE_ENV in os.environ
        dropped, finished = Tracker("echo", "dropped"), Tracker("echo", "finished")
        dropped.start({"name": "dropped"})
        finished.start({"name": "finished"})  # at the same time: a connection of its own
        assert isinstance(finished._worker, tracking._ServiceConnection) and finished._worker is not dropped._worker
        dropped.log_metrics([("m", 1, 1.0)])
        finished.log_metrics([("m", 1, 2.0)])
        finished.end()
        dropped_id = dropped.run_id
        dropped._worker.sock.shutdown(socket.SHUT_RDWR)  # as when its process dies
        deadline = time.monotonic() + 30
        while MlflowClient(store).get_run(dropped_id).info.status == "RUNNING":
            assert time.monotonic() < deadline, "the dropped run stayed RUNNING"
            time.sleep(0.2)
    finally:
        tracking._close_all()  # as this process's exit does: the service waits for every connection
        service.close()
    assert service.process.returncode == 0 and SERVICE_ENV not in os.environ
    client = MlflowClient(store)
    for run_id, name, status, value in (
        (dropped_id, "dropped", "KILLED", 1.0),
        (finished.run_id, "finished", "FINISHED", 2.0),
    ):
        run = client.get_run(run_id)
        assert (run.info.run_name, run.info.status, run.data.params) == (name, status, {"name": name})
        assert [m.value for m in client.get_metric_history(run_id, "m")] == [value]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_sweeps_jobs_share_one_worker_and_a_killed_sweep_leaves_its_current_run_killed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("echo")  # the schema, before polling it
    # job 0 trains 10 epochs; job 1 trains until it is killed
    args = ["-m", "trainer.max_epochs=10,100000", "stop_at=null", "trainer.check_val_every_n_epoch=5", "progress=false"]
    proc = start_run_py(*args, cwd=tmp_path, uri=uri)
    workers: dict[int, bytes] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "job 1 never started"
            workers |= tracking_workers(proc.pid)
            running = [r for r in all_runs(uri) if r.info.status == "RUNNING" and "mlflow.parentRunId" in r.data.tags]
            if running and "trainer.max_epochs=100000" in running[0].info.run_name:  # named at its creation
                break
            time.sleep(0.2)
        time.sleep(5)  # some epochs of job 1 (and at least one validation, which sends its metrics)
        workers |= tracking_workers(proc.pid)
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


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_a_joblib_sweeps_jobs_all_write_through_one_tracking_service(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "model.hidden_size=8,16,24", *TINY]
    proc = start_run_py(*args, cwd=tmp_path, uri=uri)
    workers: dict[int, bytes] = {}
    while proc.poll() is None:
        workers |= tracking_workers(proc.pid)
        time.sleep(0.1)
    assert proc.returncode == 0, proc.stdout.read()[-3000:]
    assert [b"--serve" in command for command in workers.values()] == [True]  # no job started its own
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["model.hidden_size"] for c in children) == ["16", "24", "8"]
    for child in children:
        assert child.info.status == "FINISHED" and "test/exact_match" in child.data.metrics
        assert [m.step for m in MlflowClient(uri).get_metric_history(child.info.run_id, "train/loss")] == list(
            range(1, 11)
        )


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _history(epochs: int, rate: float) -> list[list]:
    rows = []
    for epoch in range(1, epochs + 1):
        rows += [["train/loss", epoch, 4.6 * rate**epoch], ["train/acc", epoch, min(1.0, epoch / (epochs - 10))]]
        if epoch % 10 == 0:
            rows += [["val/loss", epoch, 4.0 * rate**epoch], ["val/exact_match", epoch, min(1.0, epoch / epochs)]]
    return rows


def test_a_figure_drawn_again_with_another_runs_data_is_the_figure_drawn_fresh():
    from echo.tracking import worker

    for draw, first, second in (
        (worker.learning_curve, (_history(200, 0.97), 0.99), (_history(480, 0.99), 0.99)),
        (worker.by_position, ([0.2, 0.4, 0.9], 0.01), ([1.0, 0.7, 0.1], 0.01)),
    ):
        worker._figures.clear()
        fresh = _png(draw(*second))
        worker._figures.clear()
        _png(draw(*first))
        again = _png(draw(*second))
        assert len(worker._figures) == 1  # the first run's figure, with the second's data
        assert again == fresh
        ax = draw(*second).axes[0]  # its axes span the second's data
        x, y = ax.lines[0].get_data()
        (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
        assert x_lo <= min(x) and max(x) <= x_hi and y_lo <= min(y) and max(y) <= y_hi
    pyplot = worker.pyplot()
    pyplot.close("all")
    worker._figures.clear()
    for outputs in range(1, worker.KEPT_FIGURES + 4):  # a layout per output count: the oldest are closed
        worker.by_position([0.5] * outputs, 0.01)
    assert len(worker._figures) == len(pyplot.get_fignums()) == worker.KEPT_FIGURES


@pytest.mark.slow
def test_processes_opening_one_new_store_at_once_create_it_once(tmp_path):
    # A sweep's store process and its first job's worker, or parallel jobs: without the lock, one
    # or two of three crash with `table ... already exists`
    import subprocess
    import sys

    uri, go = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "go"
    code = (
        "import os, time; import mlflow; from echo.tracking.worker import new_client\n"
        "print('ready', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        f"new_client({uri!r}).search_experiments()"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    try:
        assert [p.stdout.readline().strip() for p in processes] == ["ready"] * 3  # mlflow imported: all go at once
        go.touch()
        errors = [p.communicate(timeout=120)[1] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [0, 0, 0], "\n".join(e[-1500:] for e in errors)
    assert MlflowClient(uri).get_experiment("0").name == "Default"


@pytest.mark.slow
def test_a_run_whose_artifacts_cannot_be_written_does_not_stay_running(tmp_path):
    """The store takes the run but not its artifacts (their folder cannot be made, even by root): the
    run exits non-zero in one line, what it could not write is kept locally, and it ends in the store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "a_file").touch()
    MlflowClient(uri).create_experiment("echo", artifact_location=str(tmp_path / "a_file" / "artifacts"))
    work = tmp_path / "work"
    work.mkdir()
    result = run_py(*TINY, cwd=work, uri=uri)
    assert result.returncode == 3, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("echo: tracking failed: could not write run"), lines
    assert "Traceback" not in result.stdout + result.stderr
    (run,) = all_runs(uri)
    assert run.info.status == "FAILED" and run.data.tags["echo.kept_in"] in lines[0]
    kept = Path(run.data.tags["echo.kept_in"])
    assert kept.parent == work / "echo-unsent" and (kept / "end.json").read_text() == '{\n "status": "FINISHED"\n}'


def test_an_outbox_is_private_and_never_written_through_a_link_that_was_there(tmp_path, monkeypatch):
    """Another user's link named like the outbox (here and in the temporary directory) is not
    followed: a fresh folder of this user's alone is made beside it, its files 0600."""
    import json
    import stat

    from echo.tracking import worker
    from echo.tracking.outbox import ROOT, Outbox, read

    elsewhere, work, tmp = tmp_path / "elsewhere", tmp_path / "work", tmp_path / "tmp"
    for folder in (elsewhere, work, tmp):
        folder.mkdir()
    (work / ROOT).symlink_to(elsewhere)
    (tmp / ROOT).symlink_to(elsewhere)
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    checkpoint = tmp_path / "checkpoint"
    (checkpoint / "inner").mkdir(parents=True)
    (checkpoint / "inner" / "last.ckpt").write_text("weights")
    (checkpoint / "inner" / "last.ckpt").chmod(0o644)

    box = Outbox({"run_name": "r", "run_id": "abcdef0123", "params": {"a": "1"}}, "why")
    box.metrics([("train/loss", 1.0, 5, 1)])
    box.tags({"t": "1"})
    box.params({"n_params": "3"})
    box.text("x: 1\n", "config.yaml")
    box.figure(worker.by_position([0.5, 0.7], 0.01), "token_acc_by_position.png")
    box.artifacts(str(checkpoint), "checkpoints")
    box.end("FINISHED")
    assert box.lost is None and list(elsewhere.iterdir()) == []  # nothing went through the link
    assert box.folder.parent.parent == work and box.folder.parent.name.startswith(f"{ROOT}-")
    modes = {p.relative_to(box.folder.parent): stat.S_IMODE(p.lstat().st_mode) for p in box.folder.rglob("*")}
    modes[Path(".")] = stat.S_IMODE(box.folder.parent.lstat().st_mode)
    assert {p: m for p, m in modes.items() if m != (0o700 if (box.folder.parent / p).is_dir() else 0o600)} == {}
    assert len(modes) == 12, sorted(modes)  # root, run, artifacts, checkpoints, inner; 7 files
    kept = read(box.folder)
    assert kept["metrics"] == [("train/loss", 1.0, 5, 1)] and kept["status"] == "FINISHED"
    assert (box.folder / "artifacts" / "checkpoints" / "inner" / "last.ckpt").read_text() == "weights"
    assert json.loads((box.folder / "params.json").read_text()) == {"n_params": "3"}

    (work / ROOT).unlink()  # no link there now: ./echo-unsent itself, made 0700
    mine = Outbox({"run_name": "r", "run_id": "0123456789"}, "why")
    assert mine.folder == work / ROOT / "r.01234567" and stat.S_IMODE((work / ROOT).stat().st_mode) == 0o700
    (work / ROOT).chmod(0o755)  # an older echo's: this user's, so made private again
    again = Outbox({"run_name": "r", "run_id": "9876543210"}, "why")
    assert again.folder.parent == work / ROOT and stat.S_IMODE((work / ROOT).stat().st_mode) == 0o700
    if os.getuid() == 0:  # (only root can give a folder to another user)
        (work / ROOT).rename(work / "moved")
        (work / ROOT).mkdir(mode=0o777)
        os.chown(work / ROOT, 65534, 65534)  # nobody's: not used
        other = Outbox({"run_name": "r", "run_id": "5555555555"}, "why")
        assert other.folder.parent.parent == work and other.folder.parent.name.startswith(f"{ROOT}-")
        assert list((work / ROOT).iterdir()) == []


def test_a_lightning_module_logs_its_hyperparameters_and_metrics_into_the_run_as_lightnings_docs_show(store):
    """A module a researcher adds logs through echo's Lightning logger with `save_hyperparameters` and
    `self.log`, as with any Lightning logger: its params and metrics land in the run."""
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    from echo.logger import MLflowRunLogger

    class Logged(BoringModel):
        def __init__(self, lr: float = 0.1, sizes: dict | None = None):
            super().__init__()
            self.save_hyperparameters()

        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            self.log("train/extra", out["loss"])
            return out

    tracker = Tracker("echo", "researcher")
    tracker.start({"name": "researcher"})
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=0, log_every_n_steps=1, logger=MLflowRunLogger(tracker),
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Logged(sizes={"hidden": 20}))
    tracker.end()
    client = MlflowClient(store)
    params = client.get_run(tracker.run_id).data.params
    assert params == {"name": "researcher", "lr": "0.1", "sizes.hidden": "20"}
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/extra")] == [0, 1, 2]
