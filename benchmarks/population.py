"""A seed sweep trained as one population against the same sweep run job after job, same machine, same run.

    python benchmarks/population.py                    # all cases, 8 seeds
    python benchmarks/population.py --cases listing_a --seeds 4
    python benchmarks/population.py --repeat 3              # each pair of sweeps 3 times, one after the other
    python benchmarks/population.py --device cuda --members 64    # on a GPU: also 64 members against one

For each case it times, as whole processes from launch to exit, `python run.py -m seed=0,...,7 <case>`
(the basic launcher: one run after another in one process) and
`python run.py -m hydra/launcher=population seed=0,...,7 <case>`, each with MLflow on and its own
SQLite store in a temporary directory (created before the clock starts: making a store's tables
costs about a second, once per store), and prints their ratio and every member's test exact match
(read back from the store). The issue's targets: listing A at most 1/3 of the sequential time,
listing B's fast regime at least 1.3x faster, the tutorial's listing B (1,000 epochs) at least 2x.
A shared 2-core machine's speed drifts by a third within the hour: `--repeat N` times each pair N
times, the two sweeps of a pair one right after the other, and prints every pair's row, the
median ratio (the verdict), and the ratio of the two sweeps' fastest times (the least disturbed by
other work).

With `--members N` it also times, by the runs' own `train_time_s`, N members of listing B's fast
regime trained as one population against one member trained alone (seed 0): to their stop at
0.995, and for a fixed 300 epochs (no stop). The issue's target on a GPU: 64 members in at most
twice one member's training time.
"""

import argparse
import os
import resource
import statistics
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
    launcher = ["hydra/launcher=population"] if population else []
    wall, cpu, runs = timed(["-m", *launcher, f"seed={','.join(map(str, range(seeds)))}", *overrides])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return wall, cpu, sorted(r.data.metrics.get("test/exact_match", float("nan")) for r in children)


def timed(args: list[str]) -> tuple[float, float, list]:
    """Wall and CPU seconds of `python run.py <args>` (its processes, tracking included) and the
    runs it tracked."""
    with tempfile.TemporaryDirectory(prefix="echo-bench-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": path}
        env.pop("ECHO_PARENT_RUN_ID", None)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        from echo.tracking import mlflow_client

        mlflow_client().search_experiments()  # the store exists, as a researcher's does after a first run
        cmd = [sys.executable, str(ROOT / "run.py"), *args, "progress=false"]
        start, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime
        if proc.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        client = mlflow_client()
        experiment = client.get_experiment_by_name("echo")
        return wall, cpu, client.search_runs([experiment.experiment_id], max_results=1000)


def members_vs_one(members: int, device: list[str]) -> None:
    """N members of listing B's fast regime as one population against one member alone, by their
    runs' train_time_s: to their stop, and for 300 epochs."""
    print(f"\n{members} members against one, listing B's fast regime (model=encdec task.n_out=2), train_time_s\n")
    print("| training | one member: s (epochs) | population: s (epochs, slowest) | ratio | every member >= 0.99 |")
    print("|---|---|---|---|---|")
    for what, extra in (("to the stop at 0.995", []), ("300 epochs", ["stop_at=null", "trainer.max_epochs=300"])):
        overrides = ["model=encdec", "task.n_out=2", *device, *extra]
        _, _, (alone,) = timed([*overrides, "seed=0"])
        seeds = ",".join(map(str, range(members)))
        _, _, runs = timed(["-m", "hydra/launcher=population", f"seed={seeds}", *overrides])
        runs = [r.data.metrics for r in runs if r.data.tags.get("mlflow.parentRunId")]
        one, together = alone.data.metrics["train_time_s"], max(m["train_time_s"] for m in runs)
        epochs = max(m["epochs"] for m in runs)
        reached = min(m["test/exact_match"] for m in runs) >= 0.99
        print(
            f"| {what} | {one:.2f} ({alone.data.metrics['epochs']:.0f}) | {together:.2f} ({epochs:.0f}) "
            f"| {together / one:.2f}x | {'yes' if reached else 'no'} |"
        )
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--members", type=int, default=0, help="also N members against one (0: not)")
    parser.add_argument("--repeat", type=int, default=1, help="time each pair of sweeps N times")
    args = parser.parse_args()
    device = ["trainer.accelerator=gpu"] if args.device == "cuda" else []
    print(f"{args.seeds} seeds per sweep; wall time of whole processes (launch to exit), MLflow on\n")
    print(
        "| case | sequential: wall s (CPU s) | population: wall s (CPU s) | speed-up, wall (CPU) | target "
        "| every member >= 0.99 test exact match |"
    )
    print("|---|---|---|---|---|---|")
    medians = []
    for name in args.cases:
        what, overrides, target = CASES[name]
        walls = []  # (sequential, population) wall seconds, pair by pair
        for _ in range(args.repeat):
            alone, alone_cpu, alone_exact = sweep([*overrides, *device], population=False, seeds=args.seeds)
            together, together_cpu, exact = sweep([*overrides, *device], population=True, seeds=args.seeds)
            walls.append((alone, together))
            ratio = alone / together
            reached = "yes" if min(exact) >= 0.99 else f"no (min {min(exact):.3f}; sequential {min(alone_exact):.3f})"
            verdict = "met" if ratio >= target else "missed"
            print(
                f"| {what} | {alone:.1f} ({alone_cpu:.1f}) | {together:.1f} ({together_cpu:.1f}) | {ratio:.2f}x "
                f"({alone_cpu / together_cpu:.2f}x) | >= {target}x ({verdict}) | {reached} |"
            )
            sys.stdout.flush()
        ratios = [a / t for a, t in walls]
        fastest = min(a for a, _ in walls) / min(t for _, t in walls)
        medians.append((what, statistics.median(ratios), target, ratios, fastest))
    if args.repeat > 1:
        print("\n| case | median speed-up, wall | target | every pair | fastest sequential / fastest population |")
        print("|---|---|---|---|---|")
        for what, median, target, ratios, fastest in medians:
            verdict = "met" if median >= target else "missed"
            pairs = ", ".join(f"{r:.2f}x" for r in ratios)
            print(f"| {what} | {median:.2f}x | >= {target}x ({verdict}) | {pairs} | {fastest:.2f}x |")
    if args.members:
        members_vs_one(args.members, device)


if __name__ == "__main__":
    main()
