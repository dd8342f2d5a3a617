"""Children of a sweep that differ only in their seed are one setting: its mean ± std, min–max
and success rate over the finished seeds, in sweep.md and, for a one-setting sweep, on the parent."""

import statistics
from pathlib import Path

import pytest
from helpers import TINY, artifacts, run_py, sweep_runs

from echo.tracking.sweep_summary import summarize_sweep

# Two settings x three seeds (val/exact_match, test/exact_match, test/token_acc, epochs_to_target);
# epochs_to_target only where val/exact_match reached the runs' target (0.5).
KNOWN = {
    "20": [(0.2, 0.1, 0.5, None), (0.5, 0.4, 0.6, 40), (0.8, 0.7, 0.7, 20)],
    "50": [(0.9, 0.9, 0.95, 10), (0.95, 0.9, 0.97, 12), (1.0, 0.9, 0.99, 14)],
}


def _child(client, experiment, parent, name, params, metrics, status="FINISHED"):
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment, run_name=name, tags={"mlflow.parentRunId": parent}).info.run_id
    params = {"target": 0.5, "progress": False, "threads": 1, **params}
    client.log_batch(
        run,
        metrics=[Metric(key, value, 0, 0) for key, value in metrics.items()],
        params=[Param(key, str(value)) for key, value in params.items()],
    )
    client.set_terminated(run, status)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One SQLite store for the tests below (creating its schema takes seconds); each its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('seed_stats')}/mlflow.db"


def _store_with_parent(uri):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    name = f"sweep {len(client.search_experiments())}"
    folder = Path(uri.removeprefix("sqlite:///")).parent / "artifacts" / name.replace(" ", "_")
    experiment = client.create_experiment(name, artifact_location=folder.as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"echo.sweep_parent": "true"}).info.run_id
    return client, experiment, parent


def _known_sweep(uri):
    """KNOWN as finished children, plus a FAILED and a KILLED child whose partial metrics must not count."""
    client, experiment, parent = _store_with_parent(uri)
    for hidden, seeds in KNOWN.items():
        for seed, (val, test, token, epochs) in enumerate(seeds):
            metrics = {"val/exact_match": val, "test/exact_match": test, "test/token_acc": token}
            if epochs is not None:
                metrics.update(epochs_to_target=epochs, time_to_target_s=epochs / 10)
            # threads differs between seeds of one setting without making it another setting
            params = {"model.hidden_size": hidden, "seed": seed, "threads": 1 + seed % 2}
            _child(client, experiment, parent, f"h{hidden} s{seed}", params, metrics)
    _child(
        client, experiment, parent, "h20 s3", {"model.hidden_size": 20, "seed": 3}, {"val/exact_match": 0.0}, "FAILED"
    )
    crashed = {"val/exact_match": 0.0, "epochs_to_target": 1.0}  # would lower the mean and the std if counted
    _child(client, experiment, parent, "h50 s3", {"model.hidden_size": 50, "seed": 3}, crashed, "KILLED")
    return client, parent


def setting_rows(sweep_md: str) -> list[dict[str, str]]:
    """The per-setting table of a sweep.md, as one dict per row (header -> cell)."""
    lines = sweep_md.split("## Per setting", 1)[1].split("## Runs", 1)[0].splitlines()
    table = [line for line in lines if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))) for row in table[2:]]


def _sweep_md(client, parent, tmp_path) -> str:
    return Path(client.download_artifacts(parent, "sweep.md", str(tmp_path))).read_text()


@pytest.mark.slow
def test_two_settings_of_three_seeds_give_known_means_stds_ranges_and_success_rates(shared_store, tmp_path):
    client, parent = _known_sweep(shared_store)
    summary = summarize_sweep(client, parent)
    settings = summary["settings"]
    assert [s["setting"] for s in settings] == [{"model.hidden_size": "50"}, {"model.hidden_size": "20"}]  # best first
    best, other = settings
    assert best["seeds"] == other["seeds"] == ["0", "1", "2"]  # the FAILED and KILLED seed 3 are not among them
    assert (best["not_finished"], other["not_finished"]) == (1, 1)
    assert best["success_rate"] == 1.0 and other["success_rate"] == pytest.approx(2 / 3)

    val = other["stats"]["val/exact_match"]
    assert (val["n"], val["min"], val["max"]) == (3, 0.2, 0.8)
    assert val["mean"] == pytest.approx(0.5) and val["std"] == pytest.approx(0.3)  # sample std (n-1)
    assert other["stats"]["test/token_acc"]["std"] == pytest.approx(0.1)
    epochs = other["stats"]["epochs_to_target"]  # over the two seeds that reached the target
    assert (epochs["n"], epochs["mean"], epochs["min"], epochs["max"]) == (2, 30, 20, 40)
    assert epochs["std"] == pytest.approx(statistics.stdev([20, 40]))
    assert best["stats"]["val/exact_match"]["mean"] == pytest.approx(0.95)
    assert best["stats"]["val/exact_match"]["std"] == pytest.approx(0.05)
    assert best["stats"]["test/exact_match"]["std"] == pytest.approx(0.0)

    rows = setting_rows(_sweep_md(client, parent, tmp_path))
    assert [row["model.hidden_size"] for row in rows] == ["50", "20"]
    first, second = rows
    assert first["seeds"] == second["seeds"] == "3 (0,1,2)"
    assert (first["not finished"], second["not finished"]) == ("1 KILLED", "1 FAILED")
    assert (first["success"], second["success"]) == ("3/3 (1.00)", "2/3 (0.67)")
    assert first["val/exact_match"] == "0.950 ± 0.050 (0.900–1.000)"
    assert second["val/exact_match"] == "0.500 ± 0.300 (0.200–0.800)"
    assert second["test/exact_match"] == "0.400 ± 0.300 (0.100–0.700)"
    assert second["epochs_to_target"] == "30 ± 14 (20–40)"

    run = client.get_run(parent)
    assert run.data.tags["echo.best_run"] == "h50 s2" and run.data.metrics["best/val/exact_match"] == 1.0
    assert not [m for m in run.data.metrics if m.startswith(("mean/", "std/")) or m == "success_rate"]  # table only
    assert "sweep.png" in artifacts(shared_store, parent)


def test_a_sweep_over_seeds_alone_logs_its_statistics_on_the_parent(shared_store, tmp_path):
    client, experiment, parent = _store_with_parent(shared_store)
    for seed, (val, test, _, epochs) in enumerate(KNOWN["20"]):
        metrics = {"val/exact_match": val, "test/exact_match": test}
        if epochs is not None:
            metrics["epochs_to_target"] = epochs
        _child(client, experiment, parent, f"s{seed}", {"seed": seed}, metrics)
    _child(client, experiment, parent, "s3", {"seed": 3}, {"val/exact_match": 0.0}, "FAILED")
    summarize_sweep(client, parent)
    metrics = client.get_run(parent).data.metrics
    assert metrics["mean/val/exact_match"] == pytest.approx(0.5) and metrics["std/val/exact_match"] == pytest.approx(
        0.3
    )
    assert metrics["mean/test/exact_match"] == pytest.approx(0.4)
    assert metrics["std/test/exact_match"] == pytest.approx(0.3)
    assert metrics["max/test/exact_match"] == max(test for _, test, _, _ in KNOWN["20"])  # the best seed
    assert metrics["max/val/exact_match"] == max(val for val, _, _, _ in KNOWN["20"])
    assert metrics["success_rate"] == pytest.approx(2 / 3)
    (row,) = setting_rows(_sweep_md(client, parent, tmp_path))
    assert row["setting"] == "all runs" and row["not finished"] == "1 FAILED"
    assert row["max val/exact_match"] == format(max(val for val, _, _, _ in KNOWN["20"]), ".3f")


def test_settings_ranked_by_time_to_target_put_the_one_that_always_reaches_it_first(shared_store):
    """time_to_target_s exists only for seeds that reached the target: a fast lucky seed must not win."""
    client, experiment, parent = _store_with_parent(shared_store)
    for hidden, times in {"20": [1.0, None, None], "50": [3.0, 3.0, 3.0]}.items():
        for seed, seconds in enumerate(times):
            metrics = (
                {"val/exact_match": 0.4} if seconds is None else {"time_to_target_s": seconds, "epochs_to_target": 9}
            )
            _child(
                client, experiment, parent, f"h{hidden} s{seed}", {"model.hidden_size": hidden, "seed": seed}, metrics
            )
    settings = summarize_sweep(client, parent, "time_to_target_s")["settings"]
    assert [(s["setting"]["model.hidden_size"], s["success_rate"]) for s in settings] == [("50", 1.0), ("20", 1 / 3)]


def test_one_run_has_a_mean_but_no_std(shared_store):
    client, experiment, parent = _store_with_parent(shared_store)
    _child(client, experiment, parent, "only", {"seed": 0}, {"val/exact_match": 0.7, "test/exact_match": 0.6})
    summarize_sweep(client, parent)
    metrics = client.get_run(parent).data.metrics
    assert metrics["mean/test/exact_match"] == 0.6 and metrics["success_rate"] == 0.0
    assert "std/test/exact_match" not in metrics
    assert "sweep.png" not in artifacts(shared_store, parent)  # nothing to spread


@pytest.mark.slow
def test_run_py_over_three_seeds_leaves_their_statistics_on_the_parent(tmp_path):
    """`python run.py -m seed=0,1,2`: a two-symbol echo, so that the tiny runs score above zero and differ."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    task = ["task.n_unique=2", "task.n_out=2", "target=0.75"]
    result = run_py("-m", "seed=0,1,2", *task, *TINY, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr[-3000:]
    parent, children = sweep_runs(uri)
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    tests = [c.data.metrics["test/exact_match"] for c in children]
    metrics = parent.data.metrics
    assert metrics["mean/test/exact_match"] == pytest.approx(statistics.fmean(tests))
    assert metrics["std/test/exact_match"] == pytest.approx(statistics.stdev(tests))
    vals = [c.data.metrics["val/exact_match"] for c in children]
    assert metrics["mean/val/exact_match"] == pytest.approx(statistics.fmean(vals))
    reached = [c for c in children if "epochs_to_target" in c.data.metrics]
    assert metrics["success_rate"] == pytest.approx(len(reached) / 3)

    from mlflow import MlflowClient

    (row,) = setting_rows(_sweep_md(MlflowClient(uri), parent.info.run_id, tmp_path))
    assert row["seeds"] == "3 (0,1,2)" and row["success"] == f"{len(reached)}/3 ({len(reached) / 3:.2f})"
    assert {"sweep.md", "sweep.png"} <= set(artifacts(uri, parent.info.run_id))
