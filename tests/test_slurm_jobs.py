"""What a run inside a SLURM job knows about it, without a cluster: its tags, and which run a
requeued job's rerun continues (tests/test_slurm.py does the same on a real cluster)."""

import pytest

from echo.slurm import requeued_from, slurm_tags
from echo.tracking import mlflow_client
from echo.tracking.sweep_summary import children

NAME = "seed=1"


@pytest.fixture
def in_slurm_job(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "57")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "42")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURMD_NODENAME", "node7")
    return monkeypatch


def test_a_run_in_a_job_array_is_tagged_as_squeue_shows_it(in_slurm_job):
    assert slurm_tags() == {"echo.slurm_job_id": "42_3", "echo.slurm_node": "node7"}
    in_slurm_job.delenv("SLURM_ARRAY_JOB_ID")
    assert slurm_tags()["echo.slurm_job_id"] == "57"
    in_slurm_job.delenv("SLURM_JOB_ID")
    assert slurm_tags() == {}


def _run(client, status: str, checkpoint: bool, tmp_path, **tags) -> str:
    experiment = client.get_experiment_by_name("echo") or client.get_experiment(client.create_experiment("echo"))
    run = client.create_run(experiment.experiment_id, run_name=NAME, tags={"echo.slurm_job_id": "42_3", **tags})
    if checkpoint:
        (tmp_path / "last.ckpt").write_text("weights")
        client.log_artifact(run.info.run_id, str(tmp_path / "last.ckpt"), "checkpoints")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_only_a_rerun_continues_and_only_from_a_checkpoint(store, in_slurm_job, tmp_path, capsys):
    client = mlflow_client()
    killed = _run(client, "KILLED", True, tmp_path)
    assert requeued_from("echo", NAME) is None  # the first run of the job: nothing to continue
    in_slurm_job.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_from("echo", NAME) == killed
    assert requeued_from("echo", "seed=2") is None  # another job of the same array id elsewhere
    lost = _run(client, "RUNNING", False, tmp_path)  # SIGKILL'd: no checkpoint, never ended
    assert requeued_from("echo", NAME) is None
    assert "left no checkpoint" in capsys.readouterr().err
    assert client.get_run(lost).info.status == "KILLED"
    _run(client, "FINISHED", False, tmp_path)  # done, then requeued by a late time-limit signal
    with pytest.raises(SystemExit) as done:
        requeued_from("echo", NAME)
    assert done.value.code == 0 and "had finished" in capsys.readouterr().err


def test_a_sweep_counts_a_continued_job_once(store, tmp_path):
    client = mlflow_client()
    experiment = client.create_experiment("echo")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    first = _run(client, "KILLED", True, tmp_path, **{"mlflow.parentRunId": parent})
    second = _run(client, "FINISHED", False, tmp_path, **{"mlflow.parentRunId": parent, "echo.resumed_from": first})
    other = _run(client, "FINISHED", False, tmp_path, **{"mlflow.parentRunId": parent})
    assert {run.info.run_id for run in children(client, parent)} == {second, other}
