"""The layout tells the truth: MLflow is reached through echo/tracking/ alone."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMPORTS_MLFLOW = re.compile(r"^\s*(import mlflow|from mlflow[\s.])", re.MULTILINE)


def test_only_the_tracking_package_imports_mlflow():
    code = [
        ROOT / "run.py",
        *ROOT.glob("echo/**/*.py"),
        *ROOT.glob("experiments/**/*.py"),
        *ROOT.glob("benchmarks/*.py"),
    ]
    importers = {str(p.relative_to(ROOT)) for p in code if IMPORTS_MLFLOW.search(p.read_text())}
    assert importers and all(name.startswith("echo/tracking/") for name in importers), sorted(importers)
