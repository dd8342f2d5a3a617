"""A sweep is one parent MLflow run with a child per job, summarised at the end, whatever
launcher or sweeper runs it."""

import math
from pathlib import Path

import pytest
from helpers import TINY, all_runs, artifacts, make_cfg, run_py, sweep_runs
from mlflow import MlflowClient

from echo.sweeps import MISSED_TARGET, job_name_and_tags, objective_value, parent_of_sweep
from echo.tracking import PARENT_RUN_ENV, SWEEP_TAG
from echo.tracking.sweep_summary import summarize_sweep


def test_objective_is_the_metric_or_the_worst_value():
    assert objective_value({"val/exact_match": 0.5}, "val/exact_match") == 0.5
    assert objective_value({}, "val/exact_match") == 0.0
    assert objective_value({"time_to_target_s": 3.0}, "time_to_target_s") == 3.0
    assert objective_value({}, "time_to_target_s") == MISSED_TARGET
    assert objective_value({"val/exact_match": math.nan}, "val/exact_match") == 0.0


def _fake_sweep(uri: str, results: dict[int, float | None]) -> tuple[object, str]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment("echo")
    parent = client.create_run(experiment, run_name="sweep", tags={"echo.sweep_parent": "true"}).info.run_id
    for hidden, exact in results.items():
        run = client.create_run(experiment, run_name=f"h{hidden}", tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_param(run, "model.hidden_size", hidden)
        client.log_param(run, "seed", 0)
        if exact is not None:
            client.log_metric(run, "val/exact_match", exact)
        client.set_terminated(run, "FINISHED")
    return client, parent


def test_summary_names_the_best_child_and_tables_and_plots_the_swept_values(store):
    client, parent = _fake_sweep(store, {20: 0.4, 50: 0.9, 100: 0.7, 150: None})
    summary = summarize_sweep(client, parent)
    assert summary["swept"] == ["model.hidden_size"]  # seed did not vary
    run = client.get_run(parent)
    assert run.data.tags["echo.best_run"] == "h50" and run.data.tags["echo.best.model.hidden_size"] == "50"
    assert run.data.metrics["best/val/exact_match"] == 0.9
    assert {"sweep.md", "sweep.png"} <= set(artifacts(store, parent))
    table = open(client.download_artifacts(parent, "sweep.md", str(store).split("///")[1].rsplit("/", 1)[0])).read()
    runs = table.split("## Runs", 1)[1].strip().splitlines()  # after the per-setting table
    rows = [line.split(" | ")[0].strip("| ") for line in runs[2:]]
    assert rows == ["h50", "h100", "h20", "h150"]  # best first, the unscored one last


def test_lower_is_better_for_time_to_target(store):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.create_experiment("echo")
    parent = client.create_run(experiment, run_name="sweep").info.run_id
    for name, seconds in (("slow", 9.0), ("fast", 2.0)):
        run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_metric(run, "time_to_target_s", seconds)
    assert summarize_sweep(client, parent, "time_to_target_s")["best_run"] == "fast"


def test_a_job_without_the_parent_in_its_environment_finds_it_by_the_sweep_tag(store, monkeypatch):
    """Ray workers on another machine do not inherit the launcher's environment."""
    from mlflow import MlflowClient

    client = MlflowClient(store)
    experiment = client.create_experiment("echo")
    tags = {SWEEP_TAG: "2026-01-01_00-00-00", "echo.sweep_parent": "true"}
    parent = client.create_run(experiment, run_name="sweep", tags=tags).info.run_id
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    assert parent_of_sweep("2026-01-01_00-00-00", "echo") == parent
    assert parent_of_sweep("another sweep", "echo") is None

    class Job:
        override_dirname = "model.hidden_size=20"
        num = 0

    class HydraCfg:
        job, mode = Job, type("Mode", (), {"name": "MULTIRUN"})
        sweep = type("Sweep", (), {"dir": "multirun/2026-01-01_00-00-00"})

    name, job_tags = job_name_and_tags(HydraCfg, make_cfg())
    assert name == "model.hidden_size=20" and job_tags["mlflow.parentRunId"] == parent


BAD_VALUE = ("model.hidden_size=20,-5", "job #1 (model.hidden_size=-5", "must be a whole number >= 1")
BAD_INTERPOLATION = ("task.n_in=5,${nope}", "job #1 (task.n_in=", "Interpolation key 'nope' not found")
# checked with torch (echo.preflight) before the first job trains: its memory, its Trainer
BAD_MEMORY = ("model.hidden_size=20,100000000", "job #1 (model.hidden_size=100000000", "this run needs about 640 PB")
BAD_TRAINER = ("trainer.devices=1,[0]", "job #1 (trainer.devices=[0]", "Lightning refuses the trainer settings")


@pytest.mark.parametrize(
    "launcher, existing, bad",
    [
        ([], False, BAD_VALUE),
        ([], True, BAD_VALUE),
        (["hydra/launcher=population"], False, BAD_VALUE),
        (["hydra/launcher=population"], True, BAD_VALUE),
        ([], True, BAD_INTERPOLATION),  # fails as it is composed, not in echo's checks
        ([], True, BAD_MEMORY),
        (["hydra/launcher=joblib"], True, BAD_MEMORY),
        (["hydra/launcher=population"], True, BAD_TRAINER),  # (a CPU has no device [0] in Lightning)
    ],
    ids=[
        "basic, new store",
        "basic, existing store",
        "population, new store",
        "population, existing store",
        "interpolation",
        "memory",
        "joblib, memory",
        "population, trainer",
    ],
)
@pytest.mark.slow
def test_a_sweep_with_one_bad_job_stops_before_any_job_runs(tmp_path, launcher, existing, bad):
    # (the sweep's store process, or a population sweep's tracking service, opens the store meanwhile)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if existing:
        MlflowClient(uri).create_experiment("echo")
    sweep, job, why = bad
    result = run_py("-m", *launcher, sweep, *TINY, cwd=tmp_path, uri=uri)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"echo: bad sweep: {job}" in result.stderr and why in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    assert "Expected:" not in result.stdout  # no job trained
    if existing:  # nothing trained, nothing tracked
        assert all_runs(uri) == []
    else:
        assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_sweep_whose_job_diverged_goes_on_and_ends_its_parent_failed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py("-m", "model.lr=1e-3,1e38", "stop_at=null", *TINY, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]  # the diverged job scores worst; the sweep goes on
    parent, children = sweep_runs(uri)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    assert parent.info.status == "FAILED" and "sweep.md" in artifacts(uri, parent.info.run_id)  # summarised
    assert "sweep ended FAILED: best of 2 runs 'model.lr=0.001," in result.stdout


@pytest.mark.slow
def test_a_sweep_whose_job_crashed_ends_its_parent_failed_not_killed(tmp_path):
    """A job that raises stops the sweep (Hydra re-raises its error): the parent ends FAILED; KILLED is
    for an interrupt (tests/test_faults.py)."""
    import os
    import subprocess
    import sys

    from helpers import RUN_PY

    crash = (
        "import runpy, sys; from echo.module import EchoModule\n"
        "def boom(self, batch, batch_idx): raise RuntimeError('the disk is on fire')\n"
        "EchoModule.training_step = boom\n"
        f"sys.argv = [{RUN_PY!r}, '-m', 'seed=0', *{TINY!r}]\n"
        f"runpy.run_path({RUN_PY!r}, run_name='__main__')\n"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(RUN_PY).parent)}
    env.pop("ECHO_PARENT_RUN_ID", None)
    result = subprocess.run([sys.executable, "-c", crash], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "the disk is on fire" in result.stderr, result.stderr[-3000:]
    parent, children = sweep_runs(uri)
    assert [c.info.status for c in children] == ["FAILED"]
    assert parent.info.status == "FAILED"


def test_bad_sweep_syntax_is_one_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py("-m", "model.hidden_size=20,,50", *TINY, cwd=tmp_path, uri=uri)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("echo: bad config: 'model.hidden_size=20,,50' cannot be read"), line


def _sweep_finishes(tmp_path, launcher: list[str], hidden_sizes: list[str]) -> None:
    """`python run.py -m <launcher> model.hidden_size=...` on a fresh store (the sweep creates the
    schema before its jobs start): one finished parent holding the summary, every job a finished child."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["-m", *launcher, f"model.hidden_size={','.join(hidden_sizes)}", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED"
    assert {c.data.params["model.hidden_size"] for c in children} == set(hidden_sizes)
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"val/exact_match", "test/exact_match", "train/loss"} <= set(child.data.metrics)
    assert {"sweep.md", "sweep.png"} & set(artifacts(uri, parent.info.run_id)) == (
        {"sweep.md", "sweep.png"} if len(hidden_sizes) > 1 else {"sweep.md"}  # a plot needs two values
    )
    best = max(children, key=lambda c: (c.data.metrics["val/exact_match"], c.info.run_name))
    assert parent.data.metrics["best/val/exact_match"] == best.data.metrics["val/exact_match"]
    lines = result.stdout.splitlines()  # (Ray forwards its workers' output whenever it comes)
    outcome, where = (next(line for line in lines if line.startswith(s)) for s in ("sweep ended", "MLflow sweep"))
    best = parent.data.tags["echo.best_run"]
    value = parent.data.metrics["best/val/exact_match"]
    assert outcome == f"sweep ended FINISHED: best of {len(children)} runs '{best}', val/exact_match {value:.4f}"
    assert where.startswith(f"MLflow sweep '{parent.info.run_name}' ({parent.info.run_id}) in {uri}: http://")


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_as_children_of_one_sweep(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    _sweep_finishes(tmp_path, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["10", "20"])


@pytest.mark.slow
def test_submitit_local_runs_a_sweep_as_separate_jobs(tmp_path):
    """The same launcher as SLURM (hydra/launcher=slurm), on this machine."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    _sweep_finishes(tmp_path, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"], ["10"])


@pytest.mark.slow
def test_optuna_search_runs_from_one_command_and_reports_its_best_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # token accuracy separates tiny runs that all have exact match 0
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", "objective=val/token_acc", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=uri)  # no -m: the preset sets hydra.mode=MULTIRUN
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = sweep_runs(uri)
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    assert len({c.data.params["model.lr"] for c in children}) == 3  # Optuna chose the values
    best = max(children, key=lambda c: c.data.metrics["val/token_acc"])
    assert parent.data.tags["echo.best_run_id"] == best.info.run_id
    (results,) = tmp_path.glob("multirun/*/optimization_results.yaml")
    assert yaml.safe_load(results.read_text())["best_value"] == pytest.approx(best.data.metrics["val/token_acc"])


@pytest.mark.slow
@pytest.mark.ray  # in the Ray environment only (.ci/run: pytest -m ray)
def test_ray_runs_a_sweep_on_a_local_ray(tmp_path):
    """Only in the Ray environment (pip install -e ".[dev,ray]"): it cannot share one with joblib."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    _sweep_finishes(tmp_path, ["hydra/launcher=ray_local", "hydra.launcher.ray.init.num_cpus=2"], ["10", "20"])


def test_the_slurm_preset_asks_for_one_cpu_per_job():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from helpers import CONF
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.cpus_per_task == 1 and cfg.threads == "auto"  # auto: one thread on one core


def test_checking_configs_imports_no_torch_and_knows_every_model_and_representation():
    """A sweep checks every job in the launching process, which with a parallel launcher trains nothing."""
    import os
    import subprocess
    import sys

    from echo.config import CANNOT_MASK, MODEL_NAMES, REPRESENTATION_NAMES
    from echo.encoding import REPRESENTATIONS
    from echo.models import MODELS, can_mask

    assert set(MODEL_NAMES) == set(MODELS) and set(REPRESENTATION_NAMES) == set(REPRESENTATIONS)
    assert set(CANNOT_MASK) == {name for name in MODELS if not can_mask(name)}
    check = "import sys; from helpers import make_cfg; from echo.config import validate; validate(make_cfg()); "
    check += "print(sorted(m for m in ('torch', 'pytorch_lightning', 'mlflow') if m in sys.modules))"
    tests = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tests,
        env={**os.environ, "PYTHONPATH": str(Path(tests).parent)},  # this checkout's echo, installed or not
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


@pytest.mark.parametrize("launcher", ["basic", "population", "joblib"])
def test_a_checked_sweeps_jobs_are_not_composed_again_in_its_process(launcher, monkeypatch):
    """Hydra composes each job of a sweep again to check it, and an in-process launcher again to
    run it: they get copies of what `check_sweep` composed. Jobs run elsewhere compose their own."""
    if launcher == "joblib":
        pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from helpers import CONF
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from echo.sweeps import check_sweep

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        sweep = loader.load_configuration(
            "config", [f"hydra/launcher={launcher}", "seed=0,1", "model.hidden_size=7"], RunMode.MULTIRUN
        )
        check_sweep(sweep)
        folder = sweep.hydra.sweep.dir  # resolved ${now:}, as Hydra's sweeper resolves it before the jobs
        fresh = type(loader).load_sweep_config(loader, sweep, ["seed=1", "model.hidden_size=7"])
        composed = []
        monkeypatch.setattr(loader, "load_configuration", lambda *a, **k: composed.append(a) or fresh)
        job = loader.load_sweep_config(sweep, ["seed=1", "model.hidden_size=7"])
        assert job.seed == 1 and job.model.hidden_size == 7
        assert OmegaConf.to_container(job) == OmegaConf.to_container(fresh)
        assert job.hydra.sweep.dir == folder
        if launcher == "joblib":
            assert len(composed) == 1
            return
        assert composed == []
        job.seed = 5  # each job is a copy of its own
        assert loader.load_sweep_config(sweep, ["seed=1", "model.hidden_size=7"]).seed == 1
