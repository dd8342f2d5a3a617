"""SLURM for real: a one-node cluster (tests/services/slurm.sh), sweeps submitted through submitit,
and a job requeued mid-run that continues from its checkpoint by itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
from helpers import TINY, all_runs, artifacts, run_py, start_run_py, sweep_runs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# A tiny run: 11 integers a sequence frame 7 windows, one optimizer step per epoch.
SMALL = ["task.length=11", "model.hidden_size=10", "stop_at=null"]


def _slurm(*args: str) -> str:
    return subprocess.run(list(args), capture_output=True, text=True, check=True, timeout=60).stdout


def _launcher(partition: str) -> list[str]:
    return ["hydra/launcher=slurm", f"hydra.launcher.partition={partition}", "hydra.launcher.mem_gb=1"]


def test_a_sweep_runs_as_real_slurm_jobs_tagged_with_job_and_node(slurm_cluster, tmp_path):
    from cluster_services import need_module

    need_module("hydra_plugins.hydra_submitit_launcher", 'pip install -e ".[submitit]"')
    uri = f"sqlite:///{tmp_path}/mlflow.db"  # on the disk the (one) node shares
    args = ["-m", *_launcher(slurm_cluster), "seed=0,1,2,3", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=uri, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2", "3"]
    node = _slurm("sinfo", "-h", "-N", "-o", "%N").split()[0]
    job_ids = set()
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val/exact_match", "test/exact_match", "train/loss"} <= set(child.data.metrics)
        job = child.data.tags["echo.slurm_job_id"]
        assert re.fullmatch(r"\d+_[0-3]", job), job  # a task of the sweep's job array, as squeue shows it
        assert child.data.tags["echo.slurm_node"] == node
        # SLURM itself ran it (finished jobs stay known to slurmctld for MinJobAge)
        assert "JobState=COMPLETED" in _slurm("scontrol", "show", "job", job)
        job_ids.add(job)
    assert len(job_ids) == 4
    assert "sweep.md" in artifacts(uri, parent.info.run_id)


def _wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def test_a_requeued_job_continues_from_its_checkpoint_with_no_gap_and_no_duplicate(slurm_cluster, tmp_path):
    """`scontrol requeue` mid-run: SIGTERM (the run checkpoints and ends KILLED), then SLURM runs the
    same job again (SLURM_RESTART_COUNT=1), which continues the run as its `echo.resumed_from`
    successor, its preset on the command line again. Every epoch's train/loss is in exactly one of the
    two; the sweep counts the job once."""
    from cluster_services import need_module
    from mlflow import MlflowClient

    need_module("hydra_plugins.hydra_submitit_launcher", 'pip install -e ".[submitit]"')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    epochs = 6000
    # launched with a preset: the requeued job gives it again, which is no change to its run
    args = ["-m", *_launcher(slurm_cluster), "experiment=tutorial_full_echo", "seed=0", f"trainer.max_epochs={epochs}"]
    args += ["trainer.check_val_every_n_epoch=200", "progress=false", *SMALL]
    proc = start_run_py(*args, cwd=tmp_path, uri=uri)
    client = MlflowClient(uri)
    try:

        def first_run_with_metrics():
            runs = [r for r in all_runs(uri) if "echo.slurm_job_id" in r.data.tags]
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                return runs[0]
            return None

        first = _wait_for(first_run_with_metrics, 1200, "the job's first metrics", proc)
        job = first.data.tags["echo.slurm_job_id"]
        _slurm("scontrol", "requeue", job)
        # SLURM holds a requeued batch job for two minutes before it may start again (its
        # BeginTime); let it start now. Nothing here tells the job to resume: it finds its run itself.
        _wait_for(lambda: "JobState=PENDING" in _slurm("scontrol", "show", "job", job), 120, "the requeue")
        _slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
        out, _ = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]

    parent, children = sweep_runs(uri)  # every run under the parent, the continued one too
    assert parent.info.status == "FINISHED"
    (killed,) = [c for c in children if c.info.run_id == first.info.run_id]
    (resumed,) = [c for c in children if c.info.run_id != first.info.run_id]
    assert killed.info.status == "KILLED" and resumed.info.status == "FINISHED"
    assert resumed.data.tags["echo.resumed_from"] == killed.info.run_id
    assert resumed.data.tags["echo.slurm_job_id"] == job == killed.data.tags["echo.slurm_job_id"]
    assert "echo.slurm_node" in resumed.data.tags
    assert "checkpoints/last.ckpt" in artifacts(uri, killed.info.run_id, "checkpoints")

    before = [m.step for m in client.get_metric_history(killed.info.run_id, "train/loss")]
    after = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert 0 < len(before) < epochs, len(before)  # requeued mid-way
    assert before + after == list(range(1, epochs + 1))  # no gap, no duplicate
    assert resumed.data.metrics["epochs"] == epochs

    # the sweep counts the job once: its last run
    assert parent.data.tags["echo.best_run_id"] == resumed.info.run_id
    table = client.download_artifacts(parent.info.run_id, "sweep.md", str(tmp_path))
    runs = [line for line in open(table).read().split("## Runs", 1)[1].splitlines() if line.startswith("|")]
    rows = runs[2:]  # below the header and its rule
    assert len(rows) == 1 and "FINISHED" in rows[0], rows


def test_lightning_does_not_warn_that_srun_is_unused(slurm_cluster, tmp_path):
    """Lightning warns on every run where `srun` exists ("available on your system but is not used")."""
    assert shutil.which("srun")
    result = run_py(*TINY, "logger=none", cwd=tmp_path, uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "srun" not in result.stderr, result.stderr[-3000:]


def test_a_sweep_whose_job_was_cancelled_stops_and_continues_submitting_only_that_job(slurm_cluster, tmp_path):
    """`scancel` of a running job: the sweep stops once its other job has ended (submitit alone waited
    forever: this cluster keeps no accounting), its parent KILLED; `-m resume=<parent>` submits one SLURM
    job, the cancelled one's, which resumes from its checkpoint; the finished job is kept, not submitted."""
    from cluster_services import need_module
    from mlflow import MlflowClient

    from echo.tracking.sweep_summary import children

    need_module("hydra_plugins.hydra_submitit_launcher", 'pip install -e ".[submitit]"')
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("echo")  # the schema, once: polling it never races its creation
    args = ["-m", *_launcher(slurm_cluster), "seed=0", "trainer.max_epochs=20,100000"]
    args += ["trainer.check_val_every_n_epoch=100", "progress=false", *SMALL]
    proc = start_run_py(*args, cwd=tmp_path, uri=uri)
    client = MlflowClient(uri)
    try:

        def short_finished_and_long_training():
            runs = {r.data.params.get("trainer.max_epochs"): r for r in all_runs(uri)}
            long, short = runs.get("100000"), runs.get("20")
            if short and short.info.status == "FINISHED" and long:
                return long if client.get_metric_history(long.info.run_id, "train/loss") else None
            return None

        first = _wait_for(short_finished_and_long_training, 600, "the short job's end and the long one's metrics", proc)
        _slurm("scancel", first.data.tags["echo.slurm_job_id"])
        cancelled = time.monotonic()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1 and time.monotonic() - cancelled < 180, out[-3000:]  # not forever
    assert f"echo: job #1 (SLURM job {first.data.tags['echo.slurm_job_id']}) ended CANCELLED" in out, out[-3000:]
    parent, before = sweep_runs(uri)
    assert parent.info.status == "KILLED" and f"`python run.py -m resume={parent.info.run_id}`" in out
    (short,) = [r for r in before if r.info.status == "FINISHED"]
    (killed,) = [r for r in before if r.info.run_id == first.info.run_id]
    assert killed.info.status == "KILLED"
    assert "checkpoints/last.ckpt" in artifacts(uri, killed.info.run_id, "checkpoints")

    done = max(m.step for m in client.get_metric_history(killed.info.run_id, "train/loss"))
    submitted = set(_slurm("squeue", "-h", "-t", "all", "-o", "%i").split())  # slurmctld keeps ended jobs 600 s
    continued = ["-m", "hydra/launcher=slurm", f"resume={parent.info.run_id}", f"trainer.max_epochs=20,{done + 100}"]
    result = run_py(*continued, cwd=tmp_path, uri=uri, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 jobs): 1 kept, 1 resumed, 0 run" in result.stderr
    again, after = sweep_runs(uri)
    assert again.info.status == "FINISHED" and len(after) == 3
    (resumed,) = [r for r in after if r.data.tags.get("echo.resumed_from") == killed.info.run_id]
    new_jobs = set(_slurm("squeue", "-h", "-t", "all", "-o", "%i").split()) - submitted
    assert new_jobs == {resumed.data.tags["echo.slurm_job_id"]}  # one SLURM job: the unfinished one
    assert resumed.data.tags["echo.job"] == killed.data.tags["echo.job"] == "1"  # its number in the sweep
    jobs = children(client, parent.info.run_id)  # a resumed chain is one job
    assert sorted(j.info.run_id for j in jobs) == sorted([short.info.run_id, resumed.info.run_id])
    assert all(j.info.status == "FINISHED" for j in jobs)
    steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")]
    assert steps == list(range(done + 1, done + 101))
