"""Other libraries' private names and internals, fenced in one module. Each function says what it
saves or keeps right, measured; tests/test_compat.py fails when a library changes what it relies on.
Importing this module loads nothing beyond the standard library."""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
import types


class Deferred(types.ModuleType):
    """Stands in `sys.modules` for a module until an attribute is read that it does not hold; then
    it imports the real module and takes on its contents (references to the stand-in keep working)."""

    def __getattr__(self, name: str):
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            real = self._load()
        return getattr(real, name)

    def _load(self) -> types.ModuleType:
        name = self.__name__
        del sys.modules[name]
        real = importlib.import_module(name)
        for key, value in self.__dict__.items():  # what was set on the stand-in meanwhile, unless the real one has it
            if not key.startswith("__") and not hasattr(real, key):
                setattr(real, key, value)
        self.__dict__.update(real.__dict__)
        return real


def _hamming(*args, **kwargs):
    from scipy.signal.windows import hamming

    return hamming(*args, **kwargs)


def defer_scipy_signal() -> None:
    """Defer `scipy.signal`, which torchmetrics imports when Lightning loads and echo never uses:
    saves 1.2 s of CPU per process (`python run.py logger=none trainer.max_epochs=10`, whole
    process, median of 5: 7.1 s with, 8.3 s without). torchmetrics only checks for
    `scipy.signal.hamming`, which the stand-in holds."""
    if "scipy.signal" in sys.modules or importlib.util.find_spec("scipy") is None:
        return
    stand_in = Deferred("scipy.signal")
    # Its file, as the real module's: `inspect` reads every module's `__file__` (torch does, at import).
    stand_in.__dict__.update(hamming=_hamming, __file__=importlib.util.find_spec("scipy.signal").origin)
    sys.modules["scipy.signal"] = stand_in
    importlib.import_module("scipy").signal = stand_in


class AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Calls `then(module)` once module `name` has executed, the first time it is imported."""

    def __init__(self, name: str, then):
        self.name, self.then, self.loader = name, then, None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and the other finders find the real module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.then(module)


# torchmetrics' flags for optional packages: matplotlib.pyplot (Metric.plot, ~0.5 s), torchvision (image
# metrics), transformers (BERTScore, with scikit-learn). A flag a torchmetrics version lacks is skipped.
UNUSED_FLAGS = (
    "_MATPLOTLIB_AVAILABLE",
    "_TORCHVISION_AVAILABLE",
    "_TRANSFORMERS_AVAILABLE",
    "_TRANSFORMERS_GREATER_EQUAL_4_4",
    "_TRANSFORMERS_GREATER_EQUAL_4_10",
)


def _unused_packages_off(imports) -> None:
    for name in UNUSED_FLAGS:
        flag = getattr(imports, name, None)
        if flag is not None:  # a lightning_utilities RequirementCache: checked once, then cached
            flag.available = False
            flag.message = f"{name} is off in an echo process, which never uses it (echo/compat.py)"


def keep_torchmetrics_from_unused_packages() -> None:
    """Set torchmetrics' flags for optional packages echo never uses (UNUSED_FLAGS) to False before
    torchmetrics reads them and imports the packages: saves 0.45 s of CPU per process here (the same
    command: 7.1 s with, 7.6 s without), ~10 s where torchvision and transformers are installed."""
    if "torchmetrics.utilities.imports" not in sys.modules:
        sys.meta_path.insert(0, AfterImport("torchmetrics.utilities.imports", _unused_packages_off))


def defer_unused_imports() -> None:
    """Both, before Lightning is imported: run.py applies it, so importing echo from a notebook or a
    test changes nothing in other libraries."""
    defer_scipy_signal()
    keep_torchmetrics_from_unused_packages()


def exit_without_teardown() -> None:
    """Run the exit handlers (CPython's private `atexit._run_exitfuncs`), flush, and end the process
    without the interpreter's teardown of torch and Lightning: saves 0.8 s of CPU per process (the
    same command: 7.1 s with, 8.0 s without). Only once every run is written and no child is left."""
    import atexit
    import os

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fused_adam_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr: float, beta1: float, beta2: float, eps: float):
    """Adam's update in place by torch's fused kernel (`torch._fused_adam_`, which `Adam(fused=True)`
    runs), with the step counts already counted: the public `adam(..., fused=True)` groups the tensors
    and counts the steps on every call: 0.90 ms against 0.16 ms per step of a listing-A population of
    8 (1 thread, median of 7 x 2,000 steps), about 1.1 s of a 500-epoch population run's 1,500 steps."""
    import torch

    torch._fused_adam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=0.0,
        eps=eps,
        amsgrad=False,
        maximize=False,
    )


def restart_interrupted_epoch(checkpoint: dict) -> None:
    """Make a checkpoint taken mid-epoch (an interrupt) resume at the start of that epoch, by rewriting
    the progress counters of Lightning's fit loop (`loops.fit_loop`, no public API). Not a speed-up:
    without it a resumed run skips the end of the interrupted epoch, where its training metrics are
    recorded. A checkpoint saved in the epoch's end hooks resumes at the next epoch."""
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or checkpoint.get("echo", {}).get("epoch_done"):
        return  # Lightning resumes at the next epoch
    done = fit["epoch_progress"]["total"]["completed"]
    for counters in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
        counters.update(ready=done, started=done, processed=done, completed=done)
    for loop in ("epoch_loop.batch_progress", "epoch_loop.val_loop.batch_progress"):
        if loop in fit:
            fit[loop]["current"].update(ready=0, started=0, processed=0, completed=0)
            fit[loop]["is_last_batch"] = False


def count_epochs_in_steps_of(checkpoint: dict, k: int) -> None:
    """Convert the checkpoint's fit-loop epoch counts from the saving run's tutorial epochs per step
    into this run's `k`, which divides it. Not a speed-up: a resumed run that takes other steps needs it."""
    saved = checkpoint.get("echo", {}).get("epochs_per_step", 1)
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or saved == k:
        return
    for counters in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
        counters.update({name: count * saved // k for name, count in counters.items()})


def stop_loky_workers():
    """Tell the joblib launcher's worker processes (loky's private `_executor` and its
    `_executor_manager_thread`) to exit now; returns a function that waits until they have. Left
    alone, they stop after the launching process's own teardown: a joblib sweep of 2 jobs
    (`python run.py -m hydra/launcher=joblib seed=0,1 trainer.max_epochs=5`, MLflow on SQLite) took
    33 s from the start of its summary to the process's exit instead of 3.7 s (median of 4)."""
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    manager = getattr(executor, "_executor_manager_thread", None)  # it joins the workers
    if manager is None:
        return lambda: None
    executor.shutdown(wait=False)
    return manager.join


def answer_sweep_jobs_with(loader, master, composed: dict) -> None:
    """Replace `loader.load_sweep_config`: the sweep's jobs get copies of the configs in `composed` (by
    their overrides; about 5 ms each) instead of being composed again (about 0.1 s each) by Hydra's
    sweeper and an in-process launcher. Saves 4.2 s of CPU in a 20-job sweep (`python run.py -m
    seed=0,...,19 logger=none trainer.max_epochs=5`, whole process, median of 3: 12.9 s with, 17.1 s
    without). Only for in-process launchers: others pickle the loader."""
    import copy

    from omegaconf import OmegaConf

    compose = loader.load_sweep_config

    def load_sweep_config(master_config, sweep_overrides):
        job = composed.get(tuple(sweep_overrides)) if master_config is master else None
        if job is None:
            return compose(master_config, sweep_overrides)
        job = copy.deepcopy(job)
        # As Hydra's own does: the values resolved once for the sweep since (its ${now:} folder) are the job's.
        OmegaConf.copy_cache(from_config=master_config, to_config=job)
        return job

    loader.load_sweep_config = load_sweep_config


def end_slurm_jobs_without_a_result(ended) -> None:
    """Let a sweep through submitit on SLURM end when one of its jobs ends without a result (`scancel`,
    a node lost). submitit learns a job's state from `sacct` alone (its watcher's private
    `_make_command`), and without accounting waits for such a job forever (in CI a sweep whose job was
    cancelled had not exited 600 s later). States now come from `squeue` where `sacct` fails (slurmctld
    keeps an ended job for MinJobAge, 300 s by default), checked every minute at most (submitit: every
    10), and such a job's `results()` returns `ended(job)` instead of raising (the same sweep stopped
    34 s after `scancel`)."""
    import shlex

    from submitit.core.utils import UncompletedJobError
    from submitit.slurm import slurm

    class Watcher(slurm.SlurmInfoWatcher):
        def _make_command(self):
            command = super()._make_command()  # sacct -o JobID,State,NodeList --parsable2 -j <id> ...
            if command is None:
                return None
            ids = ",".join(command[command.index("-j") + 1 :: 2])
            squeue = f"echo 'JobID|State|NodeList'; squeue -h -t all -o '%i|%T|%N' -j {ids}"
            return ["sh", "-c", f"{shlex.join(command)} 2>/dev/null || {{ {squeue}; }}"]

    def results(job):
        try:
            return submitit_results(job)
        except UncompletedJobError:
            return [ended(job)]

    submitit_results = getattr(slurm.SlurmJob.results, "submitit", slurm.SlurmJob.results)  # once per launch
    results.submitit = submitit_results
    slurm.SlurmJob.watcher = Watcher(delay_s=60)
    slurm.SlurmJob.results = results


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 512 * 2**20


@functools.cache  # a setting of the process: every run of an in-process sweep asks for it
def reuse_freed_memory() -> None:
    """Make glibc's malloc hand memory that tensors free to the next ones (a no-op but on glibc): by
    default a block over 128 KiB may get fresh pages, each a page fault at first touch. Now blocks up
    to 32 MiB come from the heap, and up to 512 MiB of freed heap stays with the process. Saves about
    11 ms per validation of a listing-A population of 8 (`EchoModule.eval_sums`, median of 60, three
    processes each: 46.5 ms with, 57.9 ms without), about 0.5 s of its 50 validations."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl)
        return
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
