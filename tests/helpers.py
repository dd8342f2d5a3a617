"""What the tests share: the real configs, composed; `python run.py ...` run as a user runs it;
what a run left in MLflow. (Fixtures live in conftest.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
RUN_PY = str(ROOT / "run.py")
# A few epochs with two validations: enough to produce every metric, quick on 2 cores.
TINY = ["trainer.max_epochs=10", "trainer.check_val_every_n_epoch=5", "progress=false"]


def make_cfg(*overrides: str):
    """The project's real config with `overrides`, as `python run.py <overrides>` composes it."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=["progress=false", *overrides])


def run_py(*args: str, cwd, uri: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """`python run.py <args>` in `cwd`, tracking to `uri`."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("ECHO_PARENT_RUN_ID", None)
    return subprocess.run(
        [sys.executable, RUN_PY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **popen
    )


def start_run_py(*args: str, cwd, uri: str) -> subprocess.Popen:
    """`run.py *args` started, for a test that signals it. Ctrl-C (SIGINT) reaches it even where the
    tests run with SIGINT ignored (in a shell's background job), which Python would keep ignoring."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    env.pop("ECHO_PARENT_RUN_ID", None)
    return subprocess.Popen(
        [sys.executable, RUN_PY, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def store_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def all_runs(uri: str, experiment: str | None = "echo") -> list:
    """The runs of `experiment` in the store; None: of every experiment."""
    store = store_client(uri)
    if experiment is None:
        return store.search_runs([e.experiment_id for e in store.search_experiments()], max_results=1000)
    found = store.get_experiment_by_name(experiment)
    return store.search_runs([found.experiment_id], max_results=1000) if found else []


def train_in_new_store(folder: Path, *overrides: str) -> tuple[str, object]:
    """Train one run of `overrides` in this process, in a new SQLite store in `folder`: (store uri, run)."""
    from echo.train import train

    uri = f"sqlite:///{folder}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        train(make_cfg(*overrides))
    (run,) = all_runs(uri, None)
    return uri, run


def sweep_runs(uri: str, experiment: str = "echo") -> tuple[object, list]:
    """The one sweep parent in the experiment and its children."""
    runs = all_runs(uri, experiment)
    parents = [r for r in runs if r.data.tags.get("echo.sweep_parent") == "true"]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    parent = parents[0]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    return [a.path for a in store_client(uri).list_artifacts(run_id, path)]


def metric_history(uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of `metric`, by step."""
    return sorted((m.step, m.value) for m in store_client(uri).get_metric_history(run_id, metric))


def tracking_workers(pid: int) -> dict[int, bytes]:
    """The tracking worker processes running under process `pid` now, with their command lines."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
    below = {pid}
    for _ in range(5):  # the tree is shallow: launcher, its workers, theirs
        below |= {child for child, parent in parents.items() if parent in below}
    return {p: commands[p] for p in below if b"tracking/worker.py" in commands.get(p, b"")}


def csv_metrics(folder, name: str) -> list[tuple[int, float]]:
    """(step, value) rows of metric `name` in the one Lightning CSVLogger `metrics.csv` under `folder`, by step."""
    import csv

    (path,) = Path(folder).rglob("metrics.csv")
    with open(path, newline="") as file:
        rows = [(int(row["step"]), float(row[name])) for row in csv.DictReader(file) if row.get(name)]
    return sorted(rows)
