"""`python run.py -m resume=<sweep parent run id>`: a sweep that stopped goes on under the same parent,
finished jobs kept, interrupted ones resumed from their checkpoints, missing ones run; jobs are matched
by their resolved config; searches end at n_trials in all (echo/continuation.py)."""

import json
import os
import re
import signal
import socket
import time

import pytest
import yaml
from helpers import all_runs, metric_history, run_py, start_run_py, sweep_runs
from mlflow import MlflowClient

from echo.continuation import CHECKPOINTS, merged
from echo.tracking.sweep_summary import children

# Tiny jobs: one batch of 7 windows per epoch, a small held-out set, one thread
SMALL = ["task.length=11", "model.hidden_size=10", "task.eval_windows=100", "threads=1"]
QUICK = [*SMALL, "trainer.max_epochs=10", "trainer.check_val_every_n_epoch=5", "progress=false"]


def _fresh_store(uri):
    MlflowClient(uri).create_experiment("echo")  # the schema, once: polling it never races its creation


def _sigterm_after(proc, finished: int, epochs: int = 0, total: int = 0, timeout: float = 300) -> str:
    """SIGTERM to the sweep once `finished` of its runs have ended (their `MLflow run` lines) and the next
    has trained `epochs` of `total` epochs (its progress bar); returns what it printed."""
    seen, deadline = "", time.monotonic() + timeout
    while time.monotonic() < deadline:
        chunk = os.read(proc.stdout.fileno(), 4096).decode(errors="replace")
        assert chunk, f"the sweep ended first: {seen[-3000:]}"
        seen += chunk
        parts = re.split(r"^MLflow run ", seen, flags=re.MULTILINE)
        if len(parts) > finished:
            done = re.findall(rf"(\d+)/{total} \[", parts[finished]) if epochs else ["0"]
            if done and int(done[-1]) >= epochs:
                proc.send_signal(signal.SIGTERM)
                rest, _ = proc.communicate(timeout=120)
                return seen + rest
    raise AssertionError(f"not reached in {timeout} s: {seen[-3000:]}")


def _by_seed(runs) -> dict[str, list]:
    found = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        found.setdefault(run.data.params["seed"], []).append(run)
    return found


@pytest.mark.slow
def test_a_killed_sweep_continues_keeping_finished_jobs_and_resuming_the_interrupted_one(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fresh_store(uri)
    sweep = ["-m", "seed=0,1,2,3", "trainer.max_epochs=300", "trainer.check_val_every_n_epoch=5", "stop_at=null"]
    proc = start_run_py(*sweep, *SMALL, "progress=true", cwd=tmp_path, uri=uri)
    try:
        output = _sigterm_after(proc, finished=2, epochs=20, total=300)
    finally:
        proc.kill()
    parent, before = sweep_runs(uri)
    assert parent.info.status == "KILLED" and proc.returncode != 0
    assert f"continue it with `python run.py -m resume={parent.info.run_id}`" in output
    assert parent.data.tags["echo.continue_with"] == f"python run.py -m resume={parent.info.run_id}"
    first = _by_seed(before)
    assert sorted(first) == ["0", "1", "2"] and first["2"][0].info.status == "KILLED"

    result = run_py("-m", f"resume={parent.info.run_id}", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    line = f"echo: continuing sweep {parent.info.run_id} (4 jobs): 2 kept, 1 resumed, 1 run"
    assert line in result.stderr
    assert next(x for x in result.stderr.splitlines() if x.startswith("echo:")) == line  # before anything trains
    again, after = sweep_runs(uri)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert again.data.tags["echo.continued"] == "2 kept, 1 resumed, 1 run"
    jobs = _by_seed(children(MlflowClient(uri), parent.info.run_id))  # a resumed chain is one job
    assert sorted(jobs) == ["0", "1", "2", "3"] and all(len(runs) == 1 for runs in jobs.values())
    assert all(runs[0].info.status == "FINISHED" for runs in jobs.values())
    for seed in ("0", "1"):  # the same runs, not trained again
        assert jobs[seed][0].info.run_id == first[seed][0].info.run_id
        assert jobs[seed][0].info.end_time == first[seed][0].info.end_time
    killed, resumed = first["2"][0], jobs["2"][0]
    assert resumed.data.tags["echo.resumed_from"] == killed.info.run_id
    assert resumed.data.tags["mlflow.parentRunId"] == parent.info.run_id
    old = [step for step, _ in metric_history(uri, killed.info.run_id, "train/loss")]
    new = [step for step, _ in metric_history(uri, resumed.info.run_id, "train/loss")]
    assert new[0] > 1 and sorted(old + new) == list(range(1, 301))  # every epoch once, across the two
    assert {"mean/val/exact_match", "std/val/exact_match"} <= set(again.data.metrics)  # one setting, 4 seeds
    assert "resume" not in again.data.tags.get("echo.best_run", "") and "echo.best.resume" not in again.data.tags


@pytest.mark.slow
def test_a_continued_sweep_matches_jobs_by_config_and_runs_only_the_new_ones(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py("-m", "seed=0,1", *QUICK, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, first = sweep_runs(uri)
    # more seeds: the two that finished are kept, two run
    result = run_py("-m", f"resume={parent.info.run_id}", "seed=0,1,2,3", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(4 jobs): 2 kept, 0 resumed, 2 run" in result.stderr
    assert result.stdout.count("Expected: [") == 2 * 7  # two runs trained and tested (7 windows each)
    again, runs = sweep_runs(uri)
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1", "2", "3"]
    assert {r.info.run_id for r in first} <= {r.info.run_id for r in runs}
    assert "seed=0,1,2,3" in json.loads(again.data.tags["echo.argv"])  # what a next continuation composes
    # a setting that differs is a new job, never a kept one
    result = run_py("-m", f"resume={parent.info.run_id}", "seed=0", "model.lr=2e-3", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1 jobs): 0 kept, 0 resumed, 1 run" in result.stderr
    assert len(sweep_runs(uri)[1]) == 5


@pytest.mark.slow
def test_a_joblib_sweep_continues_with_each_job_deciding_in_its_worker(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    joblib = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    result = run_py("-m", *joblib, "seed=0", *QUICK, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, (kept,) = sweep_runs(uri)
    result = run_py("-m", f"resume={parent.info.run_id}", "seed=0,1,2", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(3 jobs): 1 kept, 0 resumed, 2 run" in result.stderr
    assert "Joblib" in result.stdout + result.stderr  # the recorded launcher, composed again
    again, runs = sweep_runs(uri)
    assert again.info.status == "FINISHED" and len(runs) == 3 and kept.info.run_id in {r.info.run_id for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.mark.slow
def test_a_killed_population_continues_as_a_population(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fresh_store(uri)
    sweep = ["-m", "hydra/launcher=population", "seed=0,1,2", "trainer.max_epochs=100000", "stop_at=null"]
    proc = start_run_py(*sweep, *SMALL, "progress=false", cwd=tmp_path, uri=uri)
    try:
        deadline = time.monotonic() + 240
        while sum(r.info.status == "RUNNING" and "echo.population" in r.data.tags for r in all_runs(uri)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.5)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
    parent, members = sweep_runs(uri)
    assert parent.info.status == "KILLED" and len(members) == 3
    done = {m.info.run_id: max(s for s, _ in metric_history(uri, m.info.run_id, "train/loss")) for m in members}
    epochs = max(done.values()) + 20
    result = run_py("-m", f"resume={parent.info.run_id}", f"trainer.max_epochs={epochs}", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(3 jobs): 0 kept, 3 resumed, 0 run" in result.stderr
    assert "continue as one stacked model" in result.stderr
    again, runs = sweep_runs(uri)
    assert again.info.status == "FINISHED"
    resumed = [r for r in runs if "echo.resumed_from" in r.data.tags]
    assert len(resumed) == 3 and len({r.data.tags["echo.population"] for r in resumed}) == 1
    for run in resumed:
        assert run.info.status == "FINISHED"
        steps = [s for s, _ in metric_history(uri, run.info.run_id, "train/loss")]
        assert steps == list(range(done[run.data.tags["echo.resumed_from"]] + 1, epochs + 1))


@pytest.mark.slow
def test_a_killed_optuna_search_continues_to_n_trials_in_all(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _fresh_store(uri)
    search = ["hparams_search=optuna", "hydra.sweeper.n_trials=6", "objective=val/token_acc"]
    search += ["trainer.max_epochs=200", "trainer.check_val_every_n_epoch=5", "task.length=11"]
    search += ["task.eval_windows=100", "threads=1"]
    proc = start_run_py(*search, "progress=true", cwd=tmp_path, uri=uri)
    try:
        _sigterm_after(proc, finished=3, epochs=10, total=200)
    finally:
        proc.kill()
    parent, first = sweep_runs(uri)
    assert parent.info.status == "KILLED"
    assert sorted(r.info.status for r in first) == ["FINISHED"] * 3 + ["KILLED"]
    result = run_py("-m", f"resume={parent.info.run_id}", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(6 trials in all): 3 kept, 1 resumed, 2 run" in result.stderr
    again, runs = sweep_runs(uri)
    assert again.info.status == "FINISHED" and len(runs) == 7  # 6 trials, one of them resumed: a chain of two
    trials = children(MlflowClient(uri), parent.info.run_id)
    assert len(trials) == 6 and all(t.info.status == "FINISHED" for t in trials)
    assert {r.info.run_id for r in first if r.info.status == "FINISHED"} <= {t.info.run_id for t in trials}
    (resumed,) = [t for t in trials if "echo.resumed_from" in t.data.tags]
    killed = next(r for r in first if r.info.status == "KILLED")
    assert resumed.data.tags["echo.resumed_from"] == killed.info.run_id
    assert resumed.data.params["model.hidden_size"] == killed.data.params["model.hidden_size"]
    assert resumed.data.params["model.lr"] == killed.data.params["model.lr"]
    assert len({(t.data.params["model.hidden_size"], t.data.params["model.lr"]) for t in trials}) == 6


@pytest.mark.slow
def test_an_optuna_time_search_continues_to_n_trials_in_all_minimising_time_to_target(tmp_path):
    """`optuna_time` has no time budget: a continued one, as `optuna`, ends at n_trials in all; the kept
    trials' time_to_target_s go back to the study, which minimises it."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    easy = ["task.n_unique=2", "task.n_out=1", "target=0.3", "stop_at=null"]  # reached at the first validation
    result = run_py("hparams_search=optuna_time", "hydra.sweeper.n_trials=2", *easy, *QUICK, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, first = sweep_runs(uri)
    result = run_py("-m", f"resume={parent.info.run_id}", "hydra.sweeper.n_trials=3", cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(3 trials in all): 2 kept, 0 resumed, 1 run" in result.stderr
    again, trials = sweep_runs(uri)
    assert again.info.status == "FINISHED" and len(trials) == 3
    assert {r.info.run_id for r in first} <= {r.info.run_id for r in trials}
    times = [t.data.metrics["time_to_target_s"] for t in trials]
    (results,) = tmp_path.glob("multirun/*/optimization_results.yaml")
    assert yaml.safe_load(results.read_text())["best_value"] == pytest.approx(min(times), rel=1e-9)
    assert again.data.metrics["best/time_to_target_s"] == pytest.approx(min(times), rel=1e-9)


def _fake_parent(uri, status="KILLED", **tags):
    client = MlflowClient(uri)
    experiment = client.create_experiment("echo")
    base = {"echo.sweep_parent": "true", "echo.argv": json.dumps(["-m", "seed=0,1", *QUICK])}
    run = client.create_run(experiment, run_name="sweep", tags={**base, **tags}).info.run_id
    if status != "RUNNING":
        client.set_terminated(run, status)
    return client, run


def _refused(capsys, argv) -> str:
    """The one line `continued_argv(argv)` exits 2 with."""
    from echo.continuation import continued_argv

    with pytest.raises(SystemExit) as exit:
        continued_argv(argv)
    assert exit.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "mlflow.store.db" not in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_run_that_is_not_a_sweep_parent_or_a_sweep_still_running_is_refused_in_one_line(store, capsys):
    here = {"echo.launcher_pid": str(os.getpid()), "echo.launcher_host": socket.gethostname()}
    client, parent = _fake_parent(store, "RUNNING", **here)
    unknown = "0123456789abcdef0123456789abcdef"
    assert "no such MLflow run in" in _refused(capsys, ["run.py", "-m", f"resume={unknown}"])
    child = client.create_run(client.get_run(parent).info.experiment_id, run_name="one run").info.run_id
    line = _refused(capsys, ["run.py", "-m", f"resume={child}"])
    assert line.endswith(f"not a sweep's parent run: continue one run with `python run.py resume={child}` (without -m)")
    line = _refused(capsys, ["run.py", "--multirun", f"resume={parent}", "seed=3"])
    assert f"the sweep is still running (process {os.getpid()} on {socket.gethostname()})" in line
    client.set_tag(parent, "echo.launcher_pid", "999999999")  # its process is gone: the sweep can go on
    from echo.continuation import continued_argv

    argv = continued_argv(["run.py", "--multirun", f"resume={parent}", "seed=3"])
    os.environ.pop("ECHO_CONTINUE_LOOSE")
    assert argv == ["run.py", "-m", "seed=3", *QUICK] and os.environ.pop("ECHO_CONTINUE_SWEEP") == parent
    assert continued_argv(["run.py", f"resume={parent}"]) == ["run.py", f"resume={parent}"]  # one run: run.py's
    assert all(r.info.status in ("RUNNING", "FINISHED") for r in all_runs(store))  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("case", ["without -m", "another experiment"])
def test_a_sweep_parent_given_the_wrong_way_is_refused_in_one_line_with_nothing_written(tmp_path, case):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client, parent = _fake_parent(uri)
    if case == "without -m":
        args = [f"resume={parent}"]
        why = f"is a sweep's parent run: continue its sweep with `python run.py -m resume={parent}`"
    else:
        args, why = ["-m", f"resume={parent}", "logger.experiment=another"], "the sweep's parent run is in experiment"
    before = {(r.info.run_id, r.info.status) for r in all_runs(uri)}
    result = run_py(*args, cwd=tmp_path, uri=uri)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("echo:")]
    assert len(lines) == 1 and why in lines[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert {(r.info.run_id, r.info.status) for r in all_runs(uri)} == before  # nothing written
    assert client.get_experiment_by_name("another") is None


def test_the_recorded_command_line_takes_this_commands_overrides_on_top():
    original = ["-m", "experiment=study_x", "seed=0,1,2,3", "hydra.launcher.n_jobs=4", "+extra=1"]
    extra = ["seed=0,1,2,3,4,5", "hydra.launcher.n_jobs=2", "trainer.max_epochs=9", "--config-name", "config"]
    assert merged(original, extra) == [
        "-m",
        "--config-name",
        "config",
        "experiment=study_x",
        "seed=0,1,2,3,4,5",
        "hydra.launcher.n_jobs=2",
        "+extra=1",
        "trainer.max_epochs=9",
    ]


def test_the_checkpoints_a_continuation_looks_for_are_the_ones_runs_save():
    from echo.checkpoints import FOLDER
    from echo.population import CHECKPOINT

    assert CHECKPOINTS == (FOLDER, ("last.ckpt", CHECKPOINT))
