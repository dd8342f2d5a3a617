"""echo/compat.py leans on other libraries' private names: each test fails loudly when a library
changes what that reliance assumes (a name gone, a layout or a behaviour changed)."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echo import compat

ROOT = Path(__file__).resolve().parents[1]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_fused_adam_is_torch_adams_update_with_the_step_counted_by_the_caller():
    torch.manual_seed(0)
    weights = [torch.randn(3, 4), torch.randn(5)]
    grads = [torch.randn_like(w) for w in weights]
    reference = [w.clone().requires_grad_() for w in weights]
    adam = torch.optim.Adam(reference, lr=1e-2, fused=True)
    moments, squares = [torch.zeros_like(w) for w in weights], [torch.zeros_like(w) for w in weights]
    step = torch.zeros(())
    for _ in range(3):
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        adam.step()
        step += 1  # the caller counts; the kernel only reads it
        compat.fused_adam_(weights, grads, moments, squares, [step] * 2, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    assert step.item() == 3
    for w, r in zip(weights, reference):
        assert torch.equal(w, r.detach())


SET_FLAGS_THEN_IMPORT = """
import sys
from echo.compat import UNUSED_FLAGS, defer_unused_imports
defer_unused_imports()
import pytorch_lightning, torchmetrics.utilities.imports as flags
found = [name for name in UNUSED_FLAGS if hasattr(flags, name)]
print("_MATPLOTLIB_AVAILABLE" in found, [bool(getattr(flags, name)) for name in found] == [False] * len(found))
print("matplotlib.pyplot" in sys.modules, type(sys.modules["scipy.signal"]).__name__)
"""


def test_torchmetrics_flags_are_requirement_caches_set_as_their_module_executes():
    """torchmetrics' flags are lightning_utilities RequirementCaches that keep a set `available`, in
    torchmetrics.utilities.imports; the one for pyplot, which a run would otherwise import, is there
    (flags for packages a version does not have are skipped), and scipy.signal is left deferred."""
    result = python(SET_FLAGS_THEN_IMPORT)
    assert result.stdout.splitlines() == ["True True", "False Deferred"], result.stderr


def test_torchmetrics_reads_only_hamming_from_scipy_signal_as_it_loads():
    """The stand-in for scipy.signal holds `hamming`, the one name torchmetrics reads as it loads."""
    import torchmetrics

    assert "scipy.signal.hamming" in inspect.getsource(torchmetrics)


def test_exit_without_teardown_runs_the_exit_handlers_and_exits_zero():
    import atexit

    assert callable(atexit._run_exitfuncs)
    code = (
        "import atexit; atexit.register(print, 'handler ran')\n"
        "from echo.compat import exit_without_teardown\n"
        "print('done', flush=False); exit_without_teardown(); print('not reached')"
    )
    result = python(code)
    assert (result.returncode, result.stdout.splitlines()) == (0, ["done", "handler ran"]), result.stderr


def test_lightning_checkpoints_hold_the_fit_loop_counters_echo_rewrites(tmp_path):
    """A checkpoint Lightning saves has `loops.fit_loop` with the progress counters that
    restart_interrupted_epoch and count_epochs_in_steps_of rewrite."""
    import pytorch_lightning as pl
    from pytorch_lightning.demos.boring_classes import BoringModel

    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    fit = checkpoint["loops"]["fit_loop"]
    for counters in (fit["epoch_progress"]["total"], fit["epoch_progress"]["current"]):
        assert set(counters) == {"ready", "started", "processed", "completed"}
    assert fit["epoch_progress"]["total"]["completed"] == 2
    for loop in ("epoch_loop.batch_progress", "epoch_loop.val_loop.batch_progress"):
        assert {"ready", "started", "processed", "completed"} <= set(fit[loop]["current"]) and "is_last_batch" in fit[
            loop
        ]

    fit["epoch_progress"]["total"]["processed"] = 3  # as if interrupted in epoch 3's end hooks
    compat.restart_interrupted_epoch(checkpoint)
    assert fit["epoch_progress"]["total"] == dict(ready=2, started=2, processed=2, completed=2)
    checkpoint["echo"] = {"epochs_per_step": 5}
    compat.count_epochs_in_steps_of(checkpoint, 1)
    assert fit["epoch_progress"]["total"]["completed"] == 10


def test_stop_loky_workers_ends_the_reusable_executors_workers():
    """What the joblib launcher runs its jobs on: loky's reusable executor, in its module's `_executor`,
    whose `_executor_manager_thread` joins the workers once they have exited."""
    import os

    import joblib.externals.loky.reusable_executor as reusable
    from joblib.externals.loky import get_reusable_executor

    executor = get_reusable_executor(max_workers=1)
    pid = executor.submit(os.getpid).result()
    manager = executor._executor_manager_thread
    assert reusable._executor is executor and manager.is_alive()
    compat.stop_loky_workers()()
    assert not manager.is_alive()
    with pytest.raises(ProcessLookupError):  # exited, and reaped
        os.kill(pid, 0)
    assert compat.stop_loky_workers()() is None  # none left: nothing to wait for


def test_hydras_launchers_ask_the_config_loader_for_each_job():
    """answer_sweep_jobs_with replaces `load_sweep_config` on the loader instance that Hydra's sweeper
    (to check a batch) and its in-process launcher (to run each job) call."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher
    from hydra.plugins.sweeper import Sweeper

    assert "config_loader.load_sweep_config(" in inspect.getsource(BasicLauncher.launch)
    assert "config_loader.load_sweep_config(" in inspect.getsource(Sweeper.validate_batch_is_legal)
    assert list(inspect.signature(ConfigLoaderImpl.load_sweep_config).parameters) == [
        "self",
        "master_config",
        "sweep_overrides",
    ]


def test_answer_sweep_jobs_with_copies_of_the_composed_configs():
    from omegaconf import OmegaConf

    class Loader:
        def load_sweep_config(self, master_config, sweep_overrides):
            return OmegaConf.create({"composed": list(sweep_overrides)})

    master, job = OmegaConf.create({"a": 1}), OmegaConf.create({"seed": 1})
    loader = Loader()
    compat.answer_sweep_jobs_with(loader, master, {("seed=1",): job})
    answer = loader.load_sweep_config(master, sweep_overrides=["seed=1"])
    assert answer == job and answer is not job
    assert loader.load_sweep_config(master, ["seed=2"]) == {"composed": ["seed=2"]}  # not checked: composed
    assert loader.load_sweep_config(OmegaConf.create({}), ["seed=1"]) == {"composed": ["seed=1"]}  # another sweep


def test_the_grid_is_the_jobs_hydras_basic_sweeper_makes():
    """echo.sweeps.grid, plain code over Hydra's public override parser, makes the jobs that Hydra's
    BasicSweeper (a private module) makes, in its order."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from echo.sweeps import grid

    arguments = ["seed=0,1,2", "model=seq2seq,encdec", "trainer.max_epochs=5", "seed=3,4", "+x=range(0,3)", "lr=1e-3"]
    overrides = OverridesParser.create().parse_overrides(arguments)
    assert grid(overrides) == BasicSweeper.split_arguments(overrides, None)[0]
    assert len(grid(overrides)) == 2 * 2 * 3


def test_submitits_slurm_watcher_asks_sacct_and_reads_what_squeue_prints_too(monkeypatch):
    """end_slurm_jobs_without_a_result extends the private `_make_command` of submitit's SLURM watcher
    (sacct with `-j <job>` per job) to fall back on squeue, whose lines (as it printed them on the tests'
    cluster) the watcher reads as sacct's, and catches the UncompletedJobError of `SlurmJob.results`."""
    submitit = pytest.importorskip("submitit")
    from submitit.slurm import slurm

    assert "UncompletedJobError" in inspect.getsource(submitit.core.core.Job._get_outcome_and_result)
    monkeypatch.setattr(slurm.SlurmJob, "watcher", slurm.SlurmJob.watcher)
    monkeypatch.setattr(slurm.SlurmJob, "results", slurm.SlurmJob.results)
    compat.end_slurm_jobs_without_a_result(lambda job: "ended")
    watcher = slurm.SlurmJob.watcher
    for job in ("12_1", "13"):
        watcher.register_job(job)
    command = watcher._make_command()
    assert command[:2] == ["sh", "-c"] and command[2].startswith("sacct -o JobID,State,NodeList --parsable2 -j ")
    assert "squeue -h -t all -o '%i|%T|%N' -j 12,13" in command[2] or "-j 13,12" in command[2]
    info = watcher.read_info("JobID|State|NodeList\n12_[0,2-3%1]|PENDING|\n12_1|CANCELLED|vm\n")
    assert [info[f"12_{i}"]["State"] for i in range(4)] == ["PENDING", "CANCELLED", "PENDING", "PENDING"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_glibc_takes_the_malloc_settings():
    """mallopt answers 1 for a setting it took (0 for a parameter it does not know)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(compat.M_MMAP_THRESHOLD, compat.MMAP_THRESHOLD) == 1
    assert libc.mallopt(compat.M_TRIM_THRESHOLD, compat.TRIM_THRESHOLD) == 1
    compat.reuse_freed_memory()  # and the function itself, once per process
