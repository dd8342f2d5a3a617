"""Runs that go wrong end honestly: KILLED with their metrics so far, FAILED with the error,
stopped on a diverged loss, and resumable from their last checkpoint."""

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY, all_runs, artifacts, make_cfg, run_py, start_run_py, tracking_workers

from echo.checkpoints import download_checkpoint
from echo.config import ConfigError
from echo.faults import TrainingError
from echo.module import EchoModule
from echo.train import EpochProgress, train


def _only_run(uri):
    (run,) = all_runs(uri)
    return run


def _steps(uri, run_id, metric="train/loss") -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, metric))


def test_an_exception_ends_the_run_failed_with_the_error_recorded(store, monkeypatch):
    step = EchoModule.training_step

    def breaks_at_epoch_4(self, batch, batch_idx):
        if self.current_epoch == 3:
            raise RuntimeError("the disk is on fire")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(EchoModule, "training_step", breaks_at_epoch_4)
    with pytest.raises(RuntimeError, match="the disk is on fire"):
        train(make_cfg(*TINY, "trainer.check_val_every_n_epoch=1"))
    run = _only_run(store)
    assert run.info.status == "FAILED"
    assert run.data.tags["echo.error"] == "RuntimeError: the disk is on fire"
    assert {"error.txt", "checkpoints"} <= set(artifacts(store, run.info.run_id))
    assert _steps(store, run.info.run_id) == [1, 2, 3]  # the metrics so far are kept


def test_a_nan_loss_stops_the_run_with_a_clear_message(store, monkeypatch):
    forward = EchoModule.forward

    def diverges_at_epoch_3(self, x, state=None, **kwargs):
        scores, state = forward(self, x, state, **kwargs)
        return (scores * torch.nan if self.training and self.current_epoch >= 2 else scores), state

    monkeypatch.setattr(EchoModule, "forward", diverges_at_epoch_3)
    with pytest.raises(TrainingError, match=r"(train|val)/loss became nan at epoch 3: training diverged; lower"):
        train(make_cfg(*TINY, "trainer.check_val_every_n_epoch=1"))
    run = _only_run(store)
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["echo.error"]
    assert "checkpoints" not in artifacts(store, run.info.run_id)  # nothing worth resuming


@pytest.mark.slow
def test_checkpoints_every_n_epochs_and_resume_continues_as_a_linked_run(store):
    """The first run trains 5 epochs per Lightning step; the resumed one, validating every epoch, 1."""
    first = train(make_cfg(*TINY, "checkpoint_every=5", "trainer.check_val_every_n_epoch=5"))
    (run,) = all_runs(store)
    assert set(artifacts(store, run.info.run_id, "checkpoints")) == {"checkpoints/last.ckpt", "checkpoints/config.yaml"}
    resumed = train(
        make_cfg(*TINY, "trainer.check_val_every_n_epoch=1", "trainer.max_epochs=15", f"resume={run.info.run_id}")
    )
    assert resumed["epochs"] == 15 and first["epochs"] == 10
    saved = torch.load(download_checkpoint(run.info.run_id), weights_only=True)
    assert 0 < saved["train_time_s"] < resumed["train_time_s"]  # the time before the interruption counts
    new = next(r for r in all_runs(store) if r.info.run_id != run.info.run_id)
    assert new.info.status == "FINISHED" and new.data.tags["echo.resumed_from"] == run.info.run_id
    assert _steps(store, new.info.run_id) == list(range(11, 16))  # epochs 11..15, not from scratch
    assert _steps(store, new.info.run_id, "val/loss") == list(range(11, 16))


def test_resuming_an_unknown_run_or_one_without_a_checkpoint_is_a_config_error(store):
    with pytest.raises(ConfigError, match="resume=nope: no such MLflow run"):
        train(make_cfg(*TINY, "resume=nope"))
    train(make_cfg(*TINY))
    (run,) = all_runs(store)
    with pytest.raises(ConfigError, match="the run has no checkpoint"):
        train(make_cfg(*TINY, f"resume={run.info.run_id}"))
    assert len(all_runs(store)) == 1  # no half-written run


def _wait_for_running_run(uri, proc, timeout=120, children=0):
    """The first running run, once `children` sweep jobs (if any) are running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        running = [r for r in all_runs(uri) if r.info.status == "RUNNING"]
        if running and sum("mlflow.parentRunId" in r.data.tags for r in running) >= children:
            return running[0]
        time.sleep(0.5)
    raise AssertionError("no run started")


def _wait_for_epochs(proc, epochs: int, timeout: float = 120) -> None:
    """Read the run's progress bar (stderr, into `proc.stdout`) until it shows `epochs` epochs done."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
        assert chunk, f"the run ended before training {epochs} epochs: {seen[-3000:]}"
        seen += chunk
        done = re.findall(r"(\d+)/100000 \[", seen)
        if done and int(done[-1]) >= epochs:
            return
    raise AssertionError(f"no {epochs} epochs trained in {timeout} s")


def _fresh_store(uri):
    """Create the schema here, once, so that polling it never races the run's own creation."""
    from mlflow import MlflowClient

    MlflowClient(uri).create_experiment("echo")


@pytest.mark.slow
@pytest.mark.parametrize("record", ["before", "after"])
def test_an_interrupt_as_an_epoch_ends_loses_none_of_its_metrics(store, monkeypatch, record):
    """Lightning counts an epoch processed before its end hooks run and completed after them, and
    the module records the epoch's training metrics in one of them: interrupted in between, before
    or after that record, the run resumes at that epoch, not after it, so the killed and the resumed
    run together hold every epoch once."""
    settings = ["trainer.max_epochs=100", "stop_at=null", "trainer.check_val_every_n_epoch=5", "progress=true"]
    owner = EpochProgress if record == "before" else EchoModule  # a callback's hook runs before the module's
    hook = owner.on_train_epoch_end

    def interrupt_at_epoch_10(self, *args):  # the second Lightning epoch, of 5 epochs (one validation's)
        module = args[-1] if args else self
        if record == "after":
            hook(self, *args)
        if module.epochs_at_step_end() == 10:
            raise KeyboardInterrupt
        if record == "before":
            hook(self, *args)

    monkeypatch.setattr(owner, "on_train_epoch_end", interrupt_at_epoch_10)
    with pytest.raises(SystemExit):
        train(make_cfg(*settings))
    killed = _only_run(store)
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(owner, "on_train_epoch_end", hook)
    train(make_cfg(*settings[:-1], "trainer.max_epochs=15", f"resume={killed.info.run_id}"))
    resumed = next(r for r in all_runs(store) if r.info.run_id != killed.info.run_id)
    assert _steps(store, killed.info.run_id) == [1, 2, 3, 4, 5]
    assert _steps(store, resumed.info.run_id) == list(range(6, 16))


@pytest.mark.slow
def test_sigterm_ends_a_run_killed_with_its_metrics_and_it_resumes_from_its_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fresh_store(uri)
    long_run = ["trainer.max_epochs=100000", "stop_at=null", "trainer.check_val_every_n_epoch=5", "progress=true"]
    proc = start_run_py(*long_run, cwd=tmp_path, uri=uri)
    try:
        _wait_for_epochs(proc, 12)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    run = _only_run(uri)
    assert run.info.status == "KILLED"  # not RUNNING
    last = _steps(uri, run.info.run_id)[-1]
    assert last >= 5 and "val/exact_match" in run.data.metrics  # its metrics so far
    assert f"python run.py resume={run.info.run_id}" in proc.stdout.read()

    result = run_py(f"resume={run.info.run_id}", f"trainer.max_epochs={last + 10}", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    new = next(r for r in all_runs(uri) if r.info.run_id != run.info.run_id)
    assert new.info.status == "FINISHED" and new.data.tags["echo.resumed_from"] == run.info.run_id
    assert new.data.params["stop_at"] == "None"  # the killed run's config, not this command's defaults
    steps = _steps(uri, new.info.run_id)
    assert last <= steps[0] <= last + 1 and steps[-1] == last + 10


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sigterm_to_a_sweep_ends_the_parent_and_its_running_jobs_killed(tmp_path, launcher):
    if launcher == "joblib":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fresh_store(uri)
    long_runs = ["-m", f"hydra/launcher={launcher}", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["-m"]
    long_runs += ["model.hidden_size=10,20", "trainer.max_epochs=100000", "stop_at=null", "progress=false"]
    proc = start_run_py(*long_runs, cwd=tmp_path, uri=uri)
    running = 2 if launcher == "joblib" else 1  # basic: job 1 waits for job 0
    try:
        _wait_for_running_run(uri, proc, children=running)
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    time.sleep(1)  # let parallel workers finish closing their runs
    statuses = sorted(r.info.status for r in all_runs(uri))
    assert statuses == ["KILLED"] * (1 + running)  # never RUNNING; a job that never started has no run


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_an_interrupt_while_a_sweep_checks_its_jobs_stops_it_at_once_with_nothing_written(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fresh_store(uri)
    # 60 jobs to compose and check: seconds, interrupted once the sweep's tracking service has started
    proc = start_run_py("-m", "hydra/launcher=population", "seed=range(0,60)", *TINY, cwd=tmp_path, uri=uri)
    try:
        deadline = time.monotonic() + 60
        while not any(Path(socket).exists() for socket in _service_sockets(proc.pid)):  # it listens
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(1)  # the checks take several seconds more
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)  # the service and the store's connection stopped, not waited for
    finally:
        proc.kill()
    assert proc.returncode != 0 and "in check_sweep" in output
    assert all_runs(uri) == []


def _service_sockets(pid: int) -> list[str]:
    """The sockets of the sweep's tracking service (`worker.py --serve <socket>`), started by `pid`."""
    commands = [command.split(b"\0") for command in tracking_workers(pid).values()]
    return [c[c.index(b"--serve") + 1].decode() for c in commands if b"--serve" in c[:-1]]


def test_an_interrupt_that_hydra_or_omegaconf_turned_into_their_own_error_is_still_an_interrupt():
    # Ctrl-C as OmegaConf restores a node's flags surfaces as an AttributeError, then as Hydra's
    # ConfigCompositionException: the sweep must stop as interrupted, not report a bad job
    from hydra.errors import ConfigCompositionException

    from echo.sweeps import _interrupted

    def composed(interrupted: bool):
        try:
            try:
                if interrupted:
                    raise KeyboardInterrupt
                raise KeyError("a key OmegaConf looked for")
            except BaseException:
                raise AttributeError("'NoneType' object has no attribute '_flags'")  # noqa: B904 (as OmegaConf)
        except AttributeError as error:
            raise ConfigCompositionException() from error

    for interrupted in (True, False):
        with pytest.raises(ConfigCompositionException) as raised:
            composed(interrupted)
        assert _interrupted(raised.value) is interrupted


@pytest.mark.slow
def test_an_interrupt_between_two_epochs_resumes_at_the_next_one(store, monkeypatch):
    """Interrupted as a Lightning epoch (here epochs 11-15) starts, before its training step."""
    original = EchoModule.on_train_epoch_start

    def ctrl_c_as_epoch_11_starts(self):
        if self.current_epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(EchoModule, "on_train_epoch_start", ctrl_c_as_epoch_11_starts)
    settings = ["trainer.max_epochs=20", "trainer.check_val_every_n_epoch=5", "stop_at=null", "progress=false"]
    with pytest.raises(SystemExit):
        train(make_cfg(*settings))
    monkeypatch.setattr(EchoModule, "on_train_epoch_start", original)
    (killed,) = all_runs(store)
    assert _steps(store, killed.info.run_id) == list(range(1, 11))
    assert train(make_cfg(*settings, f"resume={killed.info.run_id}"))["epochs"] == 20
    new = next(r for r in all_runs(store) if r.info.run_id != killed.info.run_id)
    assert _steps(store, new.info.run_id) == list(range(11, 21))


@pytest.mark.slow
def test_a_resumed_run_may_validate_at_another_cadence(store, monkeypatch):
    """The killed run trained 5 epochs per Lightning step (its validation cadence); the resumed
    one validates every 2, so trains 1 per step: its epoch counts convert."""
    step = EchoModule.training_step

    def ctrl_c_in_epochs_11_to_15(self, *args):
        if self.epochs_at_step_end() == 15:
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(EchoModule, "training_step", ctrl_c_in_epochs_11_to_15)
    settings = ["trainer.max_epochs=20", "stop_at=null", "progress=false"]
    with pytest.raises(SystemExit):
        train(make_cfg(*settings, "trainer.check_val_every_n_epoch=5"))
    monkeypatch.setattr(EchoModule, "training_step", step)
    (killed,) = all_runs(store)
    assert _steps(store, killed.info.run_id) == list(range(1, 11))
    resumed = train(make_cfg(*settings, "trainer.check_val_every_n_epoch=2", f"resume={killed.info.run_id}"))
    assert resumed["epochs"] == 20
    new = next(r for r in all_runs(store) if r.info.run_id != killed.info.run_id)
    assert _steps(store, new.info.run_id) == list(range(11, 21))
    assert _steps(store, new.info.run_id, "val/exact_match") == [12, 14, 16, 18, 20]


@pytest.mark.slow
@pytest.mark.parametrize("hook", ["training_step", "validation_step"])
def test_a_run_interrupted_mid_epoch_resumes_by_redoing_that_epoch(store, monkeypatch, hook):
    original = getattr(EchoModule, hook)

    def ctrl_c_in_epoch_10(self, *args):
        if self.current_epoch == 9:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(EchoModule, hook, ctrl_c_in_epoch_10)
    settings = ["trainer.max_epochs=12", "trainer.check_val_every_n_epoch=5", "stop_at=null", "progress=false"]
    with pytest.raises(SystemExit):  # Lightning exits after a KeyboardInterrupt
        train(make_cfg(*settings))
    monkeypatch.setattr(EchoModule, hook, original)
    (killed,) = all_runs(store)
    assert killed.info.status == "KILLED" and _steps(store, killed.info.run_id) == list(range(1, 10))

    assert train(make_cfg(*settings, f"resume={killed.info.run_id}"))["epochs"] == 12
    new = next(r for r in all_runs(store) if r.info.run_id != killed.info.run_id)
    assert _steps(store, new.info.run_id) == [10, 11, 12]
    assert _steps(store, new.info.run_id, "val/exact_match")[0] == 10
