"""Whole runs: the listings' models learn, runs land in MLflow, bad configs stop early."""

from pathlib import Path

import pytest
from helpers import all_runs, artifacts, csv_metrics, make_cfg, metric_history, run_py, sweep_runs

from echo.config import ConfigError
from echo.train import train


def test_listing_a_model_learns_the_full_echo():
    summary = train(make_cfg("logger=none", "trainer.max_epochs=40", "task.sequences_per_epoch=8", "model.lr=1e-2"))
    assert summary["val/token_acc"] > 0.5  # chance is 0.01
    assert summary["test/token_acc"] > 0.5


@pytest.mark.slow
def test_listing_b_model_learns_the_partial_echo():
    summary = train(make_cfg("logger=none", "model=encdec", "task=partial", "trainer.max_epochs=100"))
    assert summary["val/token_acc"] > 0.25  # chance is 0.01
    assert summary["test/token_acc"] > 0.25


def test_a_run_lands_in_mlflow_with_params_metrics_and_artifacts(store, capsys):
    train(make_cfg("trainer.max_epochs=20", "model.hidden_size=12"), run_name="tiny")
    (run,) = all_runs(store)
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.hidden_size"] == "12" and params["task.n_in"] == "5" and params["trainer.max_epochs"] == "20"
    assert params["threads"] == "1"  # threads=auto, recorded as the count it came to
    assert len(metric_history(store, run.info.run_id, "train/loss")) == 20
    assert [step for step, _ in metric_history(store, run.info.run_id, "val/exact_match")] == [10, 20]
    for name in ("train/acc", "val/loss", "val/token_acc", "test/token_acc", "test/exact_match", "train_time_s"):
        assert name in run.data.metrics
    assert {"config.yaml", "expected_predicted.txt", "learning_curve.png"} <= set(artifacts(store, run.info.run_id))
    assert "Expected: [" in capsys.readouterr().out


def test_logger_csv_writes_lightnings_metrics_csv_and_nothing_to_mlflow(store, tmp_path):
    """The module logs through Lightning's Logger interface: Lightning's own CSVLogger takes it all."""
    result = run_py("logger=csv", "trainer.max_epochs=20", "progress=false", cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "csv_logs" / "echo" / "version_0"
    assert [step for step, _ in csv_metrics(folder, "train/loss")] == list(range(1, 21))
    assert [step for step, _ in csv_metrics(folder, "val/exact_match")] == [10, 20]
    assert [step for step, _ in csv_metrics(folder, "test/token_acc_by_position")] == [1, 2, 3, 4, 5]
    for name in ("train/acc", "val/loss", "test/exact_match", "train_time_s", "chance/token_acc"):
        assert csv_metrics(folder, name), name
    assert "  name: csv\n" in (folder / "config.yaml").read_text()
    assert "Expected: [" in (folder / "expected_predicted.txt").read_text()
    assert not (tmp_path / "mlflow.db").exists()


def test_reaching_the_target_is_recorded_and_stops_training(store):
    cfg = make_cfg("trainer.max_epochs=200", "task.sequences_per_epoch=8", "model.lr=1e-2", "target=0.2", "stop_at=0.3")
    summary = train(cfg)
    assert summary["val/exact_match"] >= 0.3 and summary["epochs"] < 200
    assert summary["epochs_to_target"] <= summary["epochs"]
    assert summary["samples_to_target"] == summary["epochs_to_target"] * 8 * 21
    assert 0 < summary["time_to_target_s"] <= summary["train_time_s"]


def test_lightning_steps_of_several_epochs_train_exactly_as_steps_of_one(store, monkeypatch):
    """A Lightning step trains the epochs between two validations (here 5) in a row: every
    epoch's metrics come out as they do with one epoch per step."""
    settings = ["trainer.max_epochs=20", "trainer.check_val_every_n_epoch=5", "stop_at=null", "model.hidden_size=12"]
    train(make_cfg(*settings), run_name="five")
    monkeypatch.setattr("echo.train.epochs_per_step", lambda cfg, resumed=None: 1)
    train(make_cfg(*settings), run_name="one")
    runs = {r.info.run_name: r.info.run_id for r in all_runs(store)}

    def history(run: str, metric: str) -> list[tuple[int, float]]:
        return metric_history(store, runs[run], metric)

    for metric in ("train/loss", "train/acc", "val/loss", "val/exact_match"):
        assert history("five", metric) == history("one", metric)
    assert [step for step, _ in history("five", "train/loss")] == list(range(1, 21))
    assert [step for step, _ in history("five", "val/loss")] == [5, 10, 15, 20]


BAD_CONFIGS = {
    "task.n_out=6": "task.n_out=6 is larger than task.n_in=5",
    "task.n_in=30": "task.n_in=30 is longer than the sequence",
    "model.batch_size=5": "model.batch_size=5 does not divide the 21 windows",
    "model.hidden_size=0": "model.hidden_size=0 must be a whole number >= 1",
    "task.n_unique=-3": "task.n_unique=-3 must be a whole number >= 2",
    "trainer.max_epochs=0": "trainer.max_epochs=0 must be a whole number >= 1",
    "model.name=lstm9": "model.name='lstm9' is unknown",
    "model.lr=-1": "model.lr=-1 must be a positive number",
    "stop_at=2": "stop_at=2 must be a fraction",
    "threads=0": "threads=0 must be auto or a whole number >= 1",
    "checkpoint_every=0": "checkpoint_every=0 must be a whole number >= 1 or null",
}


@pytest.mark.parametrize("override", BAD_CONFIGS)
def test_a_bad_config_fails_before_training_with_one_clear_line(override, store):
    with pytest.raises(ConfigError, match=BAD_CONFIGS[override]):
        train(make_cfg(override))
    assert not Path("mlflow.db").exists()  # nothing was tracked


def test_the_cli_reports_a_bad_config_in_one_line_and_exits_non_zero(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py("model=encdec", "model.batch_size=4", cwd=tmp_path, uri=uri)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("echo: bad config: model.batch_size=4 does not divide")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_makes_one_finished_run_per_value_grouped_under_a_parent(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py("-m", "model.hidden_size=8,16", "trainer.max_epochs=3", "progress=false", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Expected: [") == 2 * 21
    parent, children = sweep_runs(uri)
    assert len(all_runs(uri)) == 3 and parent.info.status == "FINISHED"
    assert sorted(r.data.params["model.hidden_size"] for r in children) == ["16", "8"]
    names = {r.info.run_name for r in children}
    assert names == {"model.hidden_size=8,trainer.max_epochs=3", "model.hidden_size=16,trainer.max_epochs=3"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["echo.sweep"] == parent.data.tags["echo.sweep"]
        assert "test/exact_match" in child.data.metrics
