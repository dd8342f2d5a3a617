"""How a run is run on this machine, decided from its config: torch's CPU threads, the tutorial
epochs in one Lightning step, the windows of an epoch. Plain Python (no torch)."""

from __future__ import annotations

import math
import os

from echo.config import ConfigError
from echo.task import is_copy_memory, windows_per_sequence

# Windows per optimizer step times hidden units from which a second CPU thread pays: measured on
# 2 cores, listing B's 8 sequences per step (168 windows x 150 units) train ~35% faster on two
# threads, 2 sequences per step ~20% faster; the tutorials' steps (7 x 20, 21 x 150) no faster.
WIDE_STEP = 5_000


def wide_step(cfg, members: int = 1) -> bool:
    """Whether a step of `members` runs of `cfg` together is wide: arithmetic-bound on a CPU."""
    sequences = cfg.task.get("sequences_per_epoch", 1)  # copy memory: one batch of batch_size sequences
    return sequences * members * cfg.model.batch_size * cfg.model.hidden_size >= WIDE_STEP


def cpu_threads(cfg, cores: int | None = None, environ=os.environ, members: int = 1) -> int:
    """Torch CPU threads for a run (or a population of `members` runs): for `threads=auto` one for a
    narrow step (the other core serves the tracking worker or a parallel job) and two for a wide one,
    within the cores this process may use and the threads a launcher grants (OMP_NUM_THREADS)."""
    if cfg.threads != "auto":
        return cfg.threads
    if not wide_step(cfg, members):
        return 1
    cores = cores or len(os.sched_getaffinity(0))
    granted = int(environ.get("OMP_NUM_THREADS") or cores)
    return max(1, min(2, cores, granted))


def resolve_threads(cfg) -> None:
    """Write the thread count `threads=auto` comes to into `cfg`, so the run records it."""
    check_threads(cfg)
    if cfg.threads == "auto":
        cfg.threads = cpu_threads(cfg)


def epochs_per_step(cfg, resumed: int | None = None) -> int:
    """Tutorial epochs trained in one Lightning step (and epoch): the largest number that divides
    trainer.max_epochs, trainer.check_val_every_n_epoch and checkpoint_every (and `resumed`, the
    resumed run's), so that Lightning's hooks fall between steps. Lightning costs about half a
    millisecond per step on a CPU, a tenth of a tutorial epoch: paid once per validation instead."""
    counts = [cfg.trainer.max_epochs, cfg.trainer.get("check_val_every_n_epoch", 1)]
    counts += [n for n in (cfg.get("checkpoint_every"), resumed) if n]
    return math.gcd(*counts)


def windows_per_epoch(cfg) -> int:
    """Windows trained on per epoch (copy memory: one batch of model.batch_size one-window sequences)."""
    if is_copy_memory(cfg.task):
        return cfg.model.batch_size
    return cfg.task.sequences_per_epoch * windows_per_sequence(cfg.task)


def check_threads(cfg, cores: int | None = None) -> None:
    """Refuse more torch threads than the cores this process may use (999 threads on 2 cores trained
    about a hundred times slower)."""
    cores = cores or len(os.sched_getaffinity(0))
    if cfg.threads != "auto" and cfg.threads > cores:
        raise ConfigError(
            f"threads={cfg.threads} is more than the {cores} cores this process may use: "
            f"set threads=auto or threads<={cores}"
        )
