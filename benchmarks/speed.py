"""Speed of the harness against a bare PyTorch loop doing the same work, same machine, same run.

    python benchmarks/speed.py                 # all cases, once each
    python benchmarks/speed.py --repeat 3      # median of 3 (bare and harness runs alternated)
    python benchmarks/speed.py --cases default fast
    python benchmarks/speed.py --device cuda                 # on a GPU (the bare loop runs eagerly there)
    python benchmarks/speed.py --device cuda --set cuda_graph=false   # extra overrides for the harness

Each case runs `python run.py ...` (MLflow on, a SQLite store in a temporary directory) and
`python benchmarks/bare_loop.py ...` with the same network, data, batches, optimizer steps,
validation cadence, stopping rule and CPU threads (those the harness chose), as separate
processes. Whole-process time is measured
from launch to exit (imports, tracking and shutdown included); train time and time to 0.99
val/exact_match come from the run itself (the MLflow store for the harness). Peak RSS is
the training process's (the harness's tracking worker is listed apart).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # echo.tracking, from a checkout

# name: (what it is, harness overrides, bare-loop arguments)
CASES = {
    "tutorial_a": (
        "listing A, tutorial regime (500 epochs, 3 steps of 7 windows each)",
        ["experiment=tutorial_full_echo"],
        "--model seq2seq --hidden 20 --batch-size 7 --sequences 1 --lr 1e-3 --epochs 500 --val-every 10",
    ),
    "tutorial_b": (
        "listing B, tutorial regime (5,000 epochs, 1 step of 21 windows each)",
        ["experiment=tutorial_partial_echo"],
        "--model encdec --hidden 150 --n-out 2 --batch-size 21 --sequences 1 --lr 1e-3 --epochs 5000 --val-every 50",
    ),
    "default": (
        "`python run.py` (listing A, stops at val/exact_match >= 0.995)",
        [],
        "--model seq2seq --hidden 20 --batch-size 7 --sequences 1 --lr 1e-3 --epochs 500 --val-every 10 "
        "--stop-at 0.995",
    ),
    "fast": (
        "`python run.py model=encdec task.n_out=2` (listing B, fast regime, stops at 0.995)",
        ["model=encdec", "task.n_out=2"],
        "--model encdec --hidden 150 --n-out 2 --batch-size 21 --sequences 8 --lr 1e-2 --epochs 1000 "
        "--val-every 10 --stop-at 0.995",
    ),
    "fast_wide": (
        "listing B, 32 sequences per step at lr 1e-2 (a regime for GPUs, where a wider step costs about the same)",
        ["model=encdec", "task.n_out=2", "task.sequences_per_epoch=32"],
        "--model encdec --hidden 150 --n-out 2 --batch-size 21 --sequences 32 --lr 1e-2 --epochs 1000 "
        "--val-every 10 --stop-at 0.995",
    ),
    "bare_best": (
        "reference: the bare loop's best known regime on listing B (8 sequences/step, lr 3e-3), on the "
        "two threads the harness gives so wide a step",
        None,
        "--model encdec --hidden 150 --n-out 2 --batch-size 21 --sequences 8 --lr 3e-3 --epochs 1000 "
        "--val-every 10 --stop-at 0.995 --threads 2",
    ),
}


def timed(cmd: list[str], cwd: str, env: dict) -> tuple[float, int, str]:
    """Wall seconds from launch to exit, peak RSS (MB) and stdout of one process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, to read its peak RSS
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss // 1024, out.read()


def run_harness(overrides: list[str], workdir: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db", "PYTHONWARNINGS": "ignore"}
    wall, rss, _ = timed([sys.executable, str(ROOT / "run.py"), "progress=false", *overrides], workdir, env)
    from echo.tracking import mlflow_client

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    client = mlflow_client()
    run = client.search_runs([client.get_experiment_by_name("echo").experiment_id], order_by=["start_time DESC"])[0]
    m = run.data.metrics
    steps_per_epoch = 21 // int(run.data.params["model.batch_size"])
    return {
        "wall_s": wall,
        "rss_mb": rss,
        "train_s": m["train_time_s"],
        "steps": int(m["epochs"]) * steps_per_epoch,
        "ms_per_epoch": 1000 * m["train_time_s"] / m["epochs"],
        "to_target_s": m.get("time_to_target_s"),
        "test_exact": m["test/exact_match"],
        "threads": int(run.data.params["threads"]),
    }


def run_bare(args: str, workdir: str) -> dict:
    wall, rss, out = timed(
        [sys.executable, str(ROOT / "benchmarks" / "bare_loop.py"), *args.split()], workdir, dict(os.environ)
    )
    r = json.loads(out.strip().splitlines()[-1])
    batch = int(args.split("--batch-size ")[1].split()[0])
    return {
        "wall_s": wall,
        "rss_mb": rss,
        "train_s": r["train_time_s"],
        "steps": r["epochs"] * (21 // batch),
        "ms_per_epoch": 1000 * r["train_time_s"] / r["epochs"],
        "to_target_s": r["time_to_target_s"],
        "test_exact": r["test_exact_match"],
        "threads": r["threads"],
    }


def median(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def fmt(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more overrides for the harness")
    a = p.parse_args()
    accelerator = ["trainer.accelerator=" + ("gpu" if a.device == "cuda" else "cpu"), *a.set]

    from echo.tracking import mlflow_client

    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
        mlflow_client().search_experiments()  # an existing store, as a user has
        for name in a.cases:
            what, overrides, bare_args = CASES[name]
            bare_runs, harness_runs = [], []
            for _ in range(a.repeat):  # alternated: a slower spell of the machine hits both alike
                threads = ""
                if overrides is not None:  # the bare loop gets the CPU threads the harness chose
                    harness_runs.append(run_harness([*overrides, *accelerator], workdir))
                    threads = f" --threads {harness_runs[-1]['threads']}"
                bare_runs.append(run_bare(f"{bare_args}{threads} --device {a.device}", workdir))
            bare, harness = median(bare_runs), median(harness_runs) if harness_runs else None
            rows.append((name, what, bare, harness))
            print(f"{name}: bare {bare}  harness {harness}", file=sys.stderr, flush=True)

    where = f"{os.cpu_count()} CPUs"
    if a.device == "cuda":
        import torch

        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs"
    print(f"\n{os.uname().nodename}: {where}; harness overrides {accelerator}; median of {a.repeat}\n")
    header = ["steps", "threads", "train s", "ms/epoch", "whole process s", "to 0.99 val s", "test exact"]
    header += ["peak RSS MB", "harness/bare train", "harness/bare whole"]
    print("| case | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name, _, bare, harness in rows:
        for who, r in (("bare", bare), ("harness", harness)):
            if r is None:
                continue
            ratios = ["", ""]
            if who == "harness":
                ratios = [f"{r['train_s'] / bare['train_s']:.2f}x", f"{r['wall_s'] / bare['wall_s']:.2f}x"]
            cells = [f"{r['steps']:.0f}", f"{r['threads']:.0f}", fmt(r["train_s"]), fmt(r["ms_per_epoch"])]
            cells += [fmt(r["wall_s"]), fmt(r["to_target_s"])]
            cells += [fmt(r["test_exact"], ".3f"), f"{r['rss_mb']:.0f}", *ratios]
            print(f"| {name} {who} | " + " | ".join(cells) + " |")
    print()
    for name, what, _, _ in rows:
        print(f"- {name}: {what}")


if __name__ == "__main__":
    main()
