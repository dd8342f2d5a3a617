"""The study report: a study sweep stores its table and plot in the sweep's parent MLflow run;
files in the checkout change only with `python experiments/report.py`."""

import ast
import hashlib

import pytest
from helpers import ROOT, artifacts, run_py, sweep_runs

REPORT = ROOT / "experiments" / "report.py"


def checkout_state() -> dict[str, str]:
    """A digest of every file `python experiments/report.py` may write."""
    files = [ROOT / "experiments" / "README.md", *sorted((ROOT / "experiments" / "results").glob("*"))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.mark.slow
def test_a_study_sweep_reports_into_its_parent_run_and_the_report_script_into_the_files(store, tmp_path):
    before = checkout_state()
    short = ["trainer.max_epochs=10", "trainer.check_val_every_n_epoch=5"]
    sweep = ["model.stateful=true", "model.batch_size=7", "seed=0,1"]  # 2 of the study's 12 jobs: one population
    result = run_py("-m", "experiment=study_stateless", *sweep, *short, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkout_state() == before  # the sweep wrote no file in the checkout

    parent, children = sweep_runs(store, experiment="study_stateless")
    assert len(children) == 2
    assert {"study_stateless.md", "study_stateless.png", "sweep.md"} <= set(artifacts(store, parent.info.run_id))
    from echo.tracking import mlflow_client

    stored = mlflow_client().download_artifacts(parent.info.run_id, "study_stateless.md", str(tmp_path))
    table = open(stored).read()
    assert "2 runs (" in table and " min as 1 population)" in table
    assert table.count("| True | 7 | 0,1 |") == 1 and "| False |" not in table

    from experiments.report import regenerate

    readme = tmp_path / "README.md"
    readme.write_text("# Studies\n<!-- study_stateless -->\nold table\n<!-- /study_stateless -->\nafter\n")
    regenerate(["study_stateless"], results=tmp_path / "results", readme=readme)
    assert (tmp_path / "results" / "study_stateless.md").read_text() == table
    assert (tmp_path / "results" / "study_stateless.png").stat().st_size > 0
    assert readme.read_text() == f"# Studies\n<!-- study_stateless -->\n{table}<!-- /study_stateless -->\nafter\n"


def test_the_report_reads_mlflow_only_through_echo_tracking():
    imported = set()
    for node in ast.walk(ast.parse(REPORT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "mlflow" not in imported and "echo" in imported


def test_the_study_tables_show_spread_as_the_sweep_summary_does():
    """Each cell over seeds is mean ± std (min–max) as in sweep.md, a single seed its value, none `–`."""
    from experiments.report import table

    task = {"task.n_unique": "10", "task.n_in": "2", "task.n_out": "2", "task.length": "10", "task.framing": "drop"}
    model = {"model.name": "seq2seq", "model.hidden_size": "4", "model.batch_size": "3", "model.stateful": "True"}
    runs = [
        {**task, **model, "seed": str(seed), "test/exact_match": exact, "test/token_acc": 0.9, "epochs": 10.0}
        | {"train_time_s": 1.0, **({"epochs_to_target": 8.0} if seed == 0 else {})}
        for seed, exact in enumerate([0.2, 0.5, 0.8])
    ]

    def cells(runs: list[dict]) -> list[str]:
        (row,) = [line for line in table(runs, ["model.hidden_size"]).splitlines() if line.startswith("| 4 |")]
        return [cell.strip() for cell in row.strip("|").split("|")][3:]

    exact, token, reached, epochs, steps, run, seconds = cells(runs)
    assert (exact, token) == ("0.500 ± 0.300 (0.200–0.800)", "0.900 ± 0.000 (0.900–0.900)")
    assert (reached, epochs, steps) == ("1/3", "8", "24")  # one seed reached 0.99: its value; 3 steps an epoch
    assert (run, seconds) == ("10 ± 0 (10–10)", "1.0 ± 0.0 (1.0–1.0)")
    assert cells(runs[1:2]) == ["0.500", "0.900", "0/1", "–", "–", "10", "1.0"]
