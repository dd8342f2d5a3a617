"""Checks a composed config before anything is built, with one clear line per mistake."""

from __future__ import annotations

import math
import os

import echo.resolvers  # noqa: F401  (the presets' ${add:...}, registered with the checks)

# What the checks accept, named here rather than read from echo.models and echo.encoding: those
# import torch, and a sweep checks every job in the launching process, which (with a parallel
# launcher) trains nothing. tests/test_sweeps.py keeps these in step with the real ones.
MODEL_NAMES = ("seq2seq", "encdec", "one_to_one", "many_to_one", "attention", "autoregressive", "transformer")
CELLS = ("lstm", "gru")
POSITIONAL = ("sinusoidal", "learned")
CANNOT_MASK = ("one_to_one",)  # read the window in one step
# networks that take windows of any length: task.train_lengths, task.test_lengths
VARIABLE_LENGTH = ("seq2seq", "encdec", "attention", "autoregressive", "transformer")
LENGTH_SEED_STRIDE = 10_000  # a held-out set of length L has seed `seed * stride + L` (echo.config.length_seed)
REPRESENTATION_NAMES = ("onehot", "linear")


class ConfigError(ValueError):
    """A config that cannot run; the message says what is wrong and how to fix it."""


def _is_count(value) -> bool:
    """A whole number >= 1 (YAML's `true` is not one)."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _positive_int(cfg, path: str) -> int:
    value = cfg
    for key in path.split("."):
        value = value[key]
    if not _is_count(value):
        raise ConfigError(f"{path}={value!r} must be a whole number >= 1: set {path}=<n>")
    return value


def _fraction(cfg, key: str, optional: bool = False) -> None:
    value = cfg[key]
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        hint = " or null" if optional else ""
        raise ConfigError(f"{key}={value!r} must be a fraction in (0, 1]{hint}: e.g. {key}=0.99")


# Windows per optimizer step times hidden units from which a second CPU thread pays: measured on
# 2 cores, listing B's 8 sequences per step (168 windows x 150 units) train ~35% faster on two
# threads, 2 sequences per step ~20% faster; the tutorials' steps (7 x 20, 21 x 150) no faster.
WIDE_STEP = 5_000


def cpu_threads(cfg, cores: int | None = None, environ=os.environ) -> int:
    """Torch CPU threads for a run: `threads`, or for `threads=auto` one thread for a narrow step
    (a second gains nothing, and the other core serves the tracking worker or a parallel job) and
    two for a wide one, within the cores this process may use and the threads a parallel launcher
    grants each job (joblib and Ray set OMP_NUM_THREADS; SLURM limits the cores)."""
    if cfg.threads != "auto":
        return cfg.threads
    if cfg.task.sequences_per_epoch * cfg.model.batch_size * cfg.model.hidden_size < WIDE_STEP:
        return 1
    cores = cores or len(os.sched_getaffinity(0))
    granted = int(environ.get("OMP_NUM_THREADS") or cores)
    return max(1, min(2, cores, granted))


def resolve_threads(cfg) -> None:
    """Write the thread count `threads=auto` comes to into `cfg`, so the run records it."""
    if cfg.threads == "auto":
        cfg.threads = cpu_threads(cfg)


def epochs_per_step(cfg, resumed: int | None = None) -> int:
    """Tutorial epochs trained in one Lightning step (and epoch): the largest number that divides
    trainer.max_epochs, trainer.check_val_every_n_epoch and checkpoint_every, so that every
    validation, periodic checkpoint and the run's end falls between two steps, as Lightning's
    hooks need. Lightning costs about half a millisecond per step on a CPU, a tenth of a tutorial
    epoch: paid once per validation instead of once per epoch. `resumed`: the number the run being
    resumed used (its epoch counts, saved in Lightning epochs, must convert)."""
    counts = [cfg.trainer.max_epochs, cfg.trainer.get("check_val_every_n_epoch", 1)]
    counts += [n for n in (cfg.get("checkpoint_every"), resumed) if n]
    return math.gcd(*counts)


def windows_per_sequence(task) -> int:
    """Windows framed from one sequence: rows with missing history are dropped or masked."""
    return task.length if task.framing == "mask" else task.length - task.n_in + 1


def length_range(task, key: str) -> tuple[int, int] | None:
    """`task.<key>` (train_lengths or test_lengths) as (lo, hi), both included; None if unset."""
    value = task.get(key) if hasattr(task, "get") else getattr(task, key, None)
    return None if value is None else (int(value[0]), int(value[1]))


def trained_lengths(task) -> tuple[int, int]:
    """The window lengths a run trains on: task.train_lengths, else the fixed task.n_in."""
    return length_range(task, "train_lengths") or (task.n_in, task.n_in)


def length_seed(seed: int, length: int) -> int:
    """The seed of the held-out windows of one length: its own, derived from the set's seed."""
    return seed * LENGTH_SEED_STRIDE + length


def _check_lengths(task, key: str) -> tuple[int, int] | None:
    value = task.get(key)
    if value is None:
        return None
    ok = not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == 2
    ok = ok and all(_is_count(v) for v in value) and value[0] <= value[1] < LENGTH_SEED_STRIDE
    if not ok:
        shown = list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else value
        raise ConfigError(
            f"task.{key}={shown!r} must be null or [lo,hi]: whole numbers with 1 <= lo <= hi < {LENGTH_SEED_STRIDE} "
            f"(both lengths included), e.g. task.{key}=[1,10]"
        )
    return int(value[0]), int(value[1])


def _validate_lengths(task, model) -> None:
    """Variable-length training and per-length testing: whole-window echoes, by networks that take any length."""
    train, test = _check_lengths(task, "train_lengths"), _check_lengths(task, "test_lengths")
    if not (train or test):
        return
    key = "task.train_lengths" if train else "task.test_lengths"
    if model.name not in VARIABLE_LENGTH:
        raise ConfigError(
            f"model={model.name} is built for one window length and cannot take {key}: "
            f"use a network that takes any length (model={' or model='.join(VARIABLE_LENGTH)})"
        )
    if task.framing == "mask":
        raise ConfigError(
            f"task.framing=mask cannot be combined with {key}: every window of every length is whole; "
            f"use task.framing=drop"
        )
    longest = max(hi for _, hi in (train or (0, 0), test or (0, 0)))
    if "max_len" in model and longest > model.max_len:
        raise ConfigError(
            f"model.max_len={model.max_len} is shorter than the longest window ({longest}) of "
            f"task.train_lengths and task.test_lengths, which model={model.name} needs positions for: "
            f"set model.max_len>={longest}"
        )
    if test and not train and task.n_out != task.n_in:
        raise ConfigError(
            f"task.test_lengths tests whole-window echoes, but this run trains a partial one "
            f"(task.n_out={task.n_out} < task.n_in={task.n_in}): set task.n_out={task.n_in}, "
            f"or train on lengths with task.train_lengths=[lo,hi]"
        )


def validate(cfg) -> None:
    """Raise ConfigError for the first setting that cannot work."""
    for path in (
        "task.length",
        "task.n_unique",
        "task.n_in",
        "task.n_out",
        "task.sequences_per_epoch",
        "task.eval_windows",
        "model.hidden_size",
        "model.batch_size",
        "trainer.max_epochs",
    ):
        _positive_int(cfg, path)
    threads = cfg.threads
    if threads != "auto" and not _is_count(threads):
        raise ConfigError(f"threads={threads!r} must be auto or a whole number >= 1: e.g. threads=1")
    task, model = cfg.task, cfg.model
    if task.n_out > task.n_in:
        raise ConfigError(
            f"task.n_out={task.n_out} is larger than task.n_in={task.n_in}: the echo is the oldest n_out "
            f"items of the input window, so set task.n_out <= task.n_in"
        )
    if task.n_in > task.length:
        raise ConfigError(
            f"task.n_in={task.n_in} is longer than the sequence (task.length={task.length}): "
            f"set task.length >= task.n_in"
        )
    if task.framing not in ("drop", "mask"):
        raise ConfigError(f"task.framing={task.framing!r} is unknown: use task.framing=drop or task.framing=mask")
    if model.name not in MODEL_NAMES:
        raise ConfigError(f"model.name={model.name!r} is unknown: choose model={' or model='.join(MODEL_NAMES)}")
    representation = task.get("representation", "onehot")
    if representation not in REPRESENTATION_NAMES:
        choices = " or ".join(f"task.representation={r}" for r in REPRESENTATION_NAMES)
        raise ConfigError(f"task.representation={representation!r} is unknown: use {choices}")
    if task.framing == "mask" and model.name in CANNOT_MASK:
        raise ConfigError(
            f"model={model.name} reads the window in one step and cannot mask padded items: "
            f"use task.framing=drop, or a recurrent topology (model=seq2seq, encdec or many_to_one)"
        )
    _check_network_options(cfg)
    _validate_lengths(task, model)
    if not (isinstance(model.lr, (int, float)) and model.lr > 0):
        raise ConfigError(f"model.lr={model.lr!r} must be a positive number: e.g. model.lr=1e-3")
    rows = windows_per_sequence(task)
    if model.stateful and rows % model.batch_size:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0]
        raise ConfigError(
            f"model.batch_size={model.batch_size} does not divide the {rows} windows of a sequence, which a "
            f"stateful model needs: use one of {divisors}, or model.stateful=false"
        )
    _fraction(cfg, "target")
    _fraction(cfg, "stop_at", optional=True)
    check_val = cfg.trainer.get("check_val_every_n_epoch", 1)
    if not _is_count(check_val):
        raise ConfigError(f"trainer.check_val_every_n_epoch={check_val!r} must be a whole number >= 1")
    every = cfg.get("checkpoint_every")
    if every is not None and not _is_count(every):
        raise ConfigError(f"checkpoint_every={every!r} must be a whole number >= 1 or null: e.g. checkpoint_every=100")


def _check_network_options(cfg) -> None:
    """The keys of the newer networks (model.cell, teacher_forcing, d_model, n_heads, ...), where set."""
    task, model = cfg.task, cfg.model
    cell = model.get("cell", "lstm")
    if cell not in CELLS:
        raise ConfigError(f"model.cell={cell!r} is unknown: use model.cell=lstm or model.cell=gru")
    if "teacher_forcing" in model:
        p = model.teacher_forcing
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ConfigError(
                f"model.teacher_forcing={p!r} must be a probability in [0, 1]: e.g. model.teacher_forcing=1.0"
            )
        if task.get("representation", "onehot") != "onehot":
            raise ConfigError(
                "model=autoregressive feeds back predicted tokens, which needs task.representation=onehot"
            )
    for key in ("d_model", "n_layers", "n_heads", "max_len"):
        if key in model:
            _positive_int(cfg, f"model.{key}")
    if "n_heads" in model and model.d_model % model.n_heads:
        raise ConfigError(
            f"model.n_heads={model.n_heads} does not divide model.d_model={model.d_model}: "
            f"choose n_heads among {[h for h in range(1, model.d_model + 1) if model.d_model % h == 0][:8]}"
        )
    positional = model.get("positional")
    if positional is not None and positional not in POSITIONAL:
        raise ConfigError(f"model.positional={positional!r} is unknown: use model.positional=sinusoidal or learned")
    if "max_len" in model:
        longest = task.n_out if positional == "sinusoidal" else max(task.n_out, task.n_in)  # a table of positions
        if longest > model.max_len:
            raise ConfigError(
                f"model.max_len={model.max_len} is shorter than the {longest} positions model={model.name} "
                f"needs here: set model.max_len>={longest}"
            )
