"""Checks that need torch and Lightning, before anything is built or tracked: Lightning accepts the
trainer settings, and the run fits in memory."""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from echo.config import ConfigError, first_line
from echo.faults import TrainingError
from echo.policy import epochs_per_step
from echo.task import windows_per_sequence

# trainer.* keys echo.config checks in full (CHECKS); with others Lightning builds a Trainer to check them
CHECKED_HERE = {"max_epochs", "check_val_every_n_epoch", "accelerator", "devices", "strategy", "num_nodes"}
CHECKED_HERE |= {"gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches"}  # echo's (echo/steps.py)
SHRINK = "use a smaller model.hidden_size, model.batch_size, task.sequences_per_epoch or task.eval_windows"


def preflight(cfg) -> None:
    """Raise ConfigError if Lightning refuses the trainer settings or the run cannot fit in memory."""
    check_trainer(cfg)
    check_memory(cfg)


def check_trainer(cfg) -> None:
    """Build a Trainer with the run's settings and turn Lightning's refusal into one line."""
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}: torch sees no CUDA GPU on this machine: use trainer.accelerator=cpu "
            f"or trainer.accelerator=auto"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.accelerator=mps: this machine has no Apple GPU: use trainer.accelerator=auto")
    devices = cfg.trainer.get("devices", 1)
    if devices == "auto" and uses_cuda(cfg) and torch.cuda.device_count() > 1:
        raise ConfigError(
            f"trainer.devices=auto would train on all {torch.cuda.device_count()} GPUs, and echo trains on one: "
            f"set trainer.devices=1 or trainer.devices=[<index>]"
        )
    if set(cfg.trainer) <= CHECKED_HERE and devices in (1, "1", "auto"):
        return  # the settings echo.config checks already (building a Trainer costs 30-50 ms; importing Lightning 2 s)
    import pytorch_lightning as pl

    from echo.build import in_lightning_epochs, quiet_lightning

    quiet_lightning()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(
                **in_lightning_epochs(cfg.trainer, epochs_per_step(cfg)),
                logger=False,
                enable_progress_bar=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
    except Exception as error:  # MisconfigurationException, ValueError, TypeError, a missing package (ImportError)
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if isinstance(error, TypeError) and unknown:
            key = unknown.group(1)
            raise ConfigError(
                f"trainer.{key} is not an argument of Lightning's Trainer: remove +trainer.{key}=..."
            ) from None
        raise ConfigError(f"Lightning refuses the trainer settings: {_first_line(error)}: fix trainer.*") from None


def _first_line(error: BaseException) -> str:
    """`first_line`, inside a sentence: at most 300 characters, no closing full stop."""
    return first_line(error)[:300].rstrip(".")


def check_memory(cfg) -> None:
    """Refuse a run whose estimated memory (a rough upper bound) exceeds what its device has free."""
    need = estimate_memory(cfg)
    on_gpu = uses_cuda(cfg)
    free = cuda_free_bytes() if on_gpu else host_free_bytes()
    if free is not None and sum(need.values()) > free:
        parts = ", ".join(f"{part} {_size(n)}" for part, n in need.items())
        where = "GPU memory free" if on_gpu else "memory available on this machine"
        raise ConfigError(
            f"this run needs about {_size(sum(need.values()))} of memory ({parts}), more than the "
            f"{_size(free)} of {where}: {SHRINK}"
        )


def uses_cuda(cfg) -> bool:
    accelerator = cfg.trainer.get("accelerator", "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def estimate_memory(cfg) -> dict[str, int]:
    """Bytes, by part, a run of `cfg` may hold at once: a rough upper bound from the config alone
    (the network's parameters, gradients and Adam's moments; a step's activations, kept for backward;
    the held-out windows and their evaluation)."""
    from echo.build import network
    from echo.encoding import representation

    task, model = cfg.task, cfg.model
    rep = representation(task)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in network(cfg, rep).parameters())
    lengths = [task.n_in, *(task.get("train_lengths") or []), *(task.get("test_lengths") or [])]
    n_in = max(lengths)
    n_out = max(task.n_out, n_in) if len(lengths) > 1 else task.n_out  # variable lengths echo up to all
    steps = n_in + n_out  # recurrent or attention steps of one window
    width = max(model.hidden_size, model.get("d_model") or 0) * (model.get("n_layers") or 1)
    heads = model.get("n_heads") or 0

    def activations(rows: int, stored: int) -> int:
        per_row = steps * stored * width + 2 * n_in * rep.n_features + 4 * n_out * rep.n_outputs
        per_row += 3 * heads * (model.get("n_layers") or 1) * steps * steps  # attention weights
        return rows * per_row * 4  # bytes of a float32

    rows = windows_per_sequence(task)
    sequences = task.get("sequences_per_epoch", model.batch_size)  # copy memory: one batch of batch_size
    step_rows = sequences * (model.batch_size if model.stateful else min(model.batch_size, rows))
    eval_seqs = -(-task.eval_windows // rows)
    eval_rows = eval_seqs * (model.batch_size if model.stateful else rows)
    return {
        "network and Adam": 16 * n_params,
        "a training step": activations(step_rows, stored=16) + sequences * rows * steps * 8,
        "held-out sets": 2 * eval_seqs * rows * steps * 8 + activations(eval_rows, stored=8),
    }


def host_free_bytes() -> int | None:
    """Memory this process may still take: the kernel's MemAvailable, or less under a cgroup limit."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return min((x for x in (free, _cgroup_room()) if x is not None), default=None)


def _cgroup_room() -> int | None:
    """What this process's memory cgroup (v2 or v1) still allows, if it sets a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            folder, files = Path("/sys/fs/cgroup") / path.lstrip("/"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, used = ((folder / name).read_text().strip() for name in files)
        except OSError:
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return int(limit) - int(used)
    return None


def cuda_free_bytes() -> int | None:
    try:
        return torch.cuda.mem_get_info()[0]
    except Exception:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000


@contextmanager
def out_of_memory_as_training_error():
    """An out-of-memory error that still happens (the estimate is rough) becomes a one-line TrainingError."""
    try:
        yield
    except (MemoryError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
        known = isinstance(error, MemoryError | torch.OutOfMemoryError)
        if not known and not re.search("can't allocate memory|out of memory", str(error)):
            raise
        raise TrainingError(f"out of memory ({_first_line(error)}): {SHRINK}") from error
