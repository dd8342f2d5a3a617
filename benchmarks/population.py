"""A seed sweep trained as one population against the same sweep run job after job, same machine, same run.

    python benchmarks/population.py                    # all cases, 8 seeds
    python benchmarks/population.py --cases listing_a --seeds 4

For each case it times, as whole processes from launch to exit, `python run.py -m seed=0,...,7 <case>`
(the basic launcher: one run after another in one process) and
`python run.py -m hydra/launcher=population seed=0,...,7 <case>`, each with MLflow on and its own
SQLite store in a temporary directory (created before the clock starts: making a store's tables
costs about a second, once per store), and prints their ratio and every member's test exact match
(read back from the store). The issue's targets: listing A at most 1/3 of the sequential time,
listing B's fast regime at least 1.3x faster, the tutorial's listing B (1,000 epochs) at least 2x.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # echo.tracking, from a checkout

# name: (what it is, overrides, speed-up the issue asks for)
CASES = {
    "listing_a": ("listing A: `python run.py` (stops at 0.995)", [], 3.0),
    "fast_b": ("listing B, fast regime: model=encdec task.n_out=2", ["model=encdec", "task.n_out=2"], 1.3),
    "tutorial_b": (
        "listing B, tutorial regime, 1,000 epochs of one sequence",
        ["experiment=tutorial_partial_echo", "trainer.max_epochs=1000"],
        2.0,
    ),
}


def sweep(overrides: list[str], population: bool, seeds: int) -> tuple[float, float, list[float]]:
    """Wall and CPU seconds of one sweep (its processes, tracking included) and its children's
    test/exact_match. CPU seconds say more than wall time on a machine other work shares."""
    with tempfile.TemporaryDirectory(prefix="echo-bench-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
        env.pop("ECHO_PARENT_RUN_ID", None)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from echo.tracking import mlflow_client

        mlflow_client().search_experiments()  # the store exists, as a researcher's does after a first run
        launcher = ["hydra/launcher=population"] if population else []
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", *launcher, f"seed={','.join(map(str, range(seeds)))}"]
        cmd += [*overrides, "progress=false"]
        start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        client = mlflow_client()
        experiment = client.get_experiment_by_name("echo")
        runs = client.search_runs([experiment.experiment_id], "tags.`mlflow.parentRunId` != ''", max_results=1000)
        exact = [r.data.metrics.get("test/exact_match", float("nan")) for r in runs]
        return wall, cpu, sorted(exact)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    print(f"{args.seeds} seeds per sweep; wall time of whole processes (launch to exit), MLflow on\n")
    print(
        "| case | sequential: wall s (CPU s) | population: wall s (CPU s) | speed-up, wall (CPU) | target "
        "| every member >= 0.99 test exact match |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.cases:
        what, overrides, target = CASES[name]
        alone, alone_cpu, alone_exact = sweep(overrides, population=False, seeds=args.seeds)
        together, together_cpu, exact = sweep(overrides, population=True, seeds=args.seeds)
        ratio = alone / together
        reached = "yes" if min(exact) >= 0.99 else f"no (min {min(exact):.3f}; sequential min {min(alone_exact):.3f})"
        verdict = "met" if ratio >= target else "missed"
        print(
            f"| {what} | {alone:.1f} ({alone_cpu:.1f}) | {together:.1f} ({together_cpu:.1f}) | {ratio:.2f}x "
            f"({alone_cpu / together_cpu:.2f}x) | >= {target}x ({verdict}) | {reached} |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
