"""Checks a composed config before anything is built, with one clear line per mistake."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import echo.resolvers  # noqa: F401  (the presets' ${add:...}, registered with the checks)
from echo.task import LENGTH_SEED_STRIDE, is_copy_memory, windows_per_sequence

# Named here, not read from echo.models and echo.encoding (they import torch, which a sweep's launching
# process need not load); tests/test_sweeps.py keeps these in step with the real ones.
MODEL_NAMES = ("seq2seq", "encdec", "one_to_one", "many_to_one", "attention", "autoregressive", "transformer")
CELLS = ("lstm", "gru")
POSITIONAL = ("sinusoidal", "learned")
CANNOT_MASK = ("one_to_one",)  # read the window in one step
# networks that take windows of any length: task.train_lengths, task.test_lengths
VARIABLE_LENGTH = ("seq2seq", "encdec", "attention", "autoregressive", "transformer")
REPRESENTATION_NAMES = ("onehot", "linear")
OPTIMIZERS = ("adam", "rmsprop")  # model.optimizer: torch.optim.Adam, or RMSprop (alpha 0.9) as Arjovsky et al. train
# Networks that answer at every input step as they read it, which copy memory scores (task=copy_memory)
READS_PER_STEP = ("seq2seq",)


class ConfigError(ValueError):
    """A config that cannot run; the message says what is wrong and how to fix it."""


def first_line(error: BaseException) -> str:
    """What `error` says, in one line (OmegaConf's add the key and the node's type below)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _is_whole(value) -> bool:
    """A whole number (YAML's `true` is not one)."""
    return not isinstance(value, bool) and isinstance(value, int)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _is_pair(value) -> bool:
    """[lo, hi] with 1 <= lo <= hi."""
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    return pair and all(_is_whole(v) and v >= 1 for v in value) and value[0] <= value[1]


def rule(ok, must: str, fix: str):
    """A check of one key: `ok(value)`, else `<path>=<value> must be <must>: <fix>` (`{path}`: the key)."""

    def check(path: str, value) -> None:
        if not ok(value):
            raise ConfigError(f"{path}={value!r} must be {must}: {fix.format(path=path)}")

    check.ok, check.must, check.fix = ok, must, fix
    return check


def optional(check):
    """`check` (a `rule`), or null."""
    head, colon, tail = check.must.partition(": ")
    return rule(lambda v: v is None or check.ok(v), f"{head} or null{colon}{tail}", check.fix)


def at_least(low: int):
    return rule(lambda v: _is_whole(v) and v >= low, f"a whole number >= {low}", "set {path}=<n>")


count = at_least(1)
boolean = rule(lambda v: isinstance(v, bool), "true or false", "set {path}=true or {path}=false")
# Lightning's `max_time` as a command line gives it
duration = rule(
    lambda v: isinstance(v, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", v),
    "a time as days:hours:minutes:seconds",
    "e.g. {path}=00:12:00:00",
)
positive_number = rule(lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a positive number", "e.g. {path}=1e-3")
fraction = rule(lambda v: _is_number(v) and 0 < v <= 1, "a fraction in (0, 1]", "e.g. {path}=0.99")
probability = rule(lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]", "e.g. {path}=1.0")
non_negative = rule(
    lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a number >= 0 (0: no clipping)", "e.g. {path}=1.0"
)
# a seed torch takes (negative ones too)
seed = rule(lambda v: _is_whole(v) and -(2**63) <= v < 2**64, "a whole number (a 64-bit seed)", "e.g. {path}=0")
# an MLflow experiment name
name = rule(
    lambda v: isinstance(v, str) and v.strip() and len(v) <= 500,
    "a name (1 to 500 characters)",
    "e.g. {path}=my_study (a number needs quotes: {path}=\"'2024'\")",
)
run_id = rule(
    lambda v: not isinstance(v, bool) and isinstance(v, (str, int)) and str(v).strip(),
    "an MLflow run id",
    "copy one from `mlflow ui`",
)
auto_or_count = rule(lambda v: v == "auto" or count.ok(v), "auto or a whole number >= 1", "e.g. {path}=1")
lengths_pair = rule(_is_pair, "[lo,hi] with 1 <= lo <= hi", "e.g. {path}=[1,10]")


def one_of(*names: str, hint: str | None = None):
    """One of `names`; `hint` says how to choose (default: `path=<name>` for each)."""

    def check(path: str, value) -> None:
        if not isinstance(value, str) or value not in names:
            choices = hint or " or ".join(f"{path}={name}" for name in names)
            if hint is None and len(names) > 5:
                choices = f"{path}=<name> among {', '.join(names)}"
            raise ConfigError(f"{path}={value!r} is unknown: choose {choices}")

    return check


# pytorch_lightning.Trainer's arguments (2.6), named here so that the checks import no torch
# (tests/test_bad_input.py keeps this in step with the real signature).
LIGHTNING_TRAINER_ARGS = (
    "accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks", "fast_dev_run",
    "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time", "limit_train_batches",
    "limit_val_batches", "limit_test_batches", "limit_predict_batches", "overfit_batches",
    "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps", "log_every_n_steps",
    "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "accumulate_grad_batches",
    "gradient_clip_val", "gradient_clip_algorithm", "deterministic", "benchmark", "inference_mode",
    "use_distributed_sampler", "profiler", "detect_anomaly", "barebones", "plugins", "sync_batchnorm",
    "reload_dataloaders_every_n_epochs", "default_root_dir", "enable_autolog_hparams", "model_registry",
)  # fmt: skip
# The ones echo supports (docs/bad-input.md), each value checked in CHECKS.
TRAINER_SUPPORTED = (
    "max_epochs", "check_val_every_n_epoch", "accelerator", "devices", "precision", "gradient_clip_val",
    "gradient_clip_algorithm", "accumulate_grad_batches", "strategy", "num_nodes", "max_time", "deterministic",
    "detect_anomaly", "benchmark",
)  # fmt: skip
ONE_DEVICE = "a run trains in one process on one device; a sweep runs several runs"
ECHO_SETS = "echo sets it itself"
NO_LIMIT = (
    "each Lightning epoch is one batch of fresh sequences: a limit would train or evaluate nothing, or change "
    "nothing; use trainer.max_epochs, task.sequences_per_epoch or task.eval_windows"
)
TRAINER_REFUSED = {
    "logger": f"{ECHO_SETS}; choose logger=mlflow or logger=none",
    "callbacks": f"{ECHO_SETS}: its callbacks track, checkpoint and stop the run",
    "fast_dev_run": "a quick try is trainer.max_epochs=1 logger=none",
    "min_epochs": "a run stops at stop_at; stop_at=null trains every epoch",
    "max_steps": "echo counts epochs of several optimizer steps each; use trainer.max_epochs",
    "min_steps": "echo counts epochs of several optimizer steps each; use stop_at=null",
    "limit_train_batches": NO_LIMIT,
    "limit_val_batches": NO_LIMIT,
    "limit_test_batches": NO_LIMIT,
    "limit_predict_batches": NO_LIMIT,
    "overfit_batches": "every epoch draws fresh sequences: there is no fixed batch to overfit",
    "val_check_interval": "echo validates between epochs; use trainer.check_val_every_n_epoch",
    "num_sanity_val_steps": f"{ECHO_SETS} (0)",
    "log_every_n_steps": "echo logs every epoch's metrics itself",
    "enable_checkpointing": f"{ECHO_SETS}; use checkpoint_every=<epochs>",
    "enable_progress_bar": f"{ECHO_SETS}; use progress=true or progress=false",
    "enable_model_summary": f"{ECHO_SETS} (off)",
    "inference_mode": "echo evaluates without gradients itself",
    "profiler": "Lightning's profiler reports to its info log, which echo keeps quiet; benchmarks/speed.py times a run",
    "use_distributed_sampler": ONE_DEVICE,
    "sync_batchnorm": ONE_DEVICE,
    "plugins": "echo runs on Lightning's default plugins",
    "barebones": "echo needs Lightning's hooks for validation, checkpoints and stopping",
    "reload_dataloaders_every_n_epochs": "every epoch draws fresh sequences already",
    "default_root_dir": "echo writes nothing there: runs live in the tracking store",
    "enable_autolog_hparams": "echo logs its config to the tracking store itself",
    "model_registry": "echo stores every finished run's network itself",
}
PRECISIONS = ("32", "32-true", "64", "64-true")  # trainer.precision values echo supports
LIGHTNING_PRECISIONS = ("16", "bf16", "16-true", "16-mixed", "bf16-true", "bf16-mixed", "transformer-engine",
                        "transformer-engine-float16")  # fmt: skip
HALF = (
    "echo trains in float32 or float64: half and mixed precision need Lightning's autocast and loss scaling "
    "around each optimizer step, which echo's own steps do not go through"
)


def check_trainer_keys(trainer) -> None:
    """Refuse a trainer.* key echo does not support, in one line saying why."""
    for key in trainer:
        if key in TRAINER_SUPPORTED:
            continue
        if key not in LIGHTNING_TRAINER_ARGS:
            raise ConfigError(f"trainer.{key} is not an argument of Lightning's Trainer: remove +trainer.{key}=...")
        why = TRAINER_REFUSED.get(key, "not tried with echo")
        raise ConfigError(
            f"trainer.{key} is not supported by echo ({why}): remove it; supported: "
            f"{', '.join(f'trainer.{k}' for k in TRAINER_SUPPORTED)} (docs/bad-input.md)"
        )


def precision(path: str, value) -> None:
    if str(value) in PRECISIONS:
        return
    if str(value) in LIGHTNING_PRECISIONS:
        raise ConfigError(f"{path}={value!r} is not supported by echo ({HALF}): set {path}=32 or {path}=64")
    raise ConfigError(f"{path}={value!r} is unknown: choose {path}=32 or {path}=64")


def one_device(path: str, value) -> None:
    """Lightning's single-device settings: 1, auto, or one device's index in a list ([0])."""
    listed = not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == 1
    if listed and _is_whole(value[0]) and value[0] >= 0:
        return
    if not listed and not isinstance(value, bool) and value in (1, "1", "auto"):
        return
    raise ConfigError(
        f"{path}={value!r} is not supported by echo ({ONE_DEVICE}): set {path}=1, {path}=auto or {path}=[<index>]"
    )


def only(allowed, why: str):
    """Exactly `allowed`; `why` the others are refused."""

    def check(path: str, value) -> None:
        if value != allowed or isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} is not supported by echo ({why}): set {path}={allowed} or remove it")

    return check


# The scalar metrics a run returns, which `objective` may name (README.md, What a run records).
OBJECTIVES = (
    "val/loss",
    "val/token_acc",
    "val/exact_match",
    "val/prefix_acc",
    "val/exact_match_teacher_forced",
    "val/token_acc_teacher_forced",
    "test/token_acc",
    "test/exact_match",
    "test/prefix_acc",
    "test/ood_exact_match",
    "test/ood_token_acc",
    "test/ood_prefix_acc",
    "test/iid_exact_match",
    "chance/token_acc",
    "chance/exact_match",
    "chance/loss",
    "time_to_target_s",
    "epochs_to_target",
    "samples_to_target",
    "train_time_s",
)

# Every key a user may set, with its check (keys a config lacks are skipped); `validate` then checks
# the settings that depend on each other.
CHECKS = {
    "seed": seed,
    "threads": auto_or_count,
    "cuda_graph": boolean,
    "target": fraction,
    "stop_at": optional(fraction),
    "progress": boolean,
    "objective": one_of(*OBJECTIVES),
    "checkpoint_every": optional(count),
    "resume": optional(run_id),
    "evaluate": optional(run_id),
    "task.length": count,
    "task.n_unique": at_least(2),
    "task.n_in": count,
    "task.n_out": count,
    "task.representation": one_of(*REPRESENTATION_NAMES),
    "task.framing": one_of("drop", "mask"),
    "task.sequences_per_epoch": count,
    "task.eval_windows": count,
    "task.val_seed": seed,
    "task.test_seed": seed,
    "task.train_lengths": optional(lengths_pair),
    "task.test_lengths": optional(lengths_pair),
    "task.delay": count,
    "task.reverse_input": boolean,
    "task.reverse_target": boolean,
    "model.name": one_of(*MODEL_NAMES, hint=" or ".join(f"model={m}" for m in MODEL_NAMES)),
    "model.hidden_size": count,
    "model.stateful": boolean,
    "model.batch_size": count,
    "model.lr": positive_number,
    "model.cell": one_of(*CELLS),
    "model.num_layers": count,
    "model.optimizer": one_of(*OPTIMIZERS),
    "model.d_model": count,
    "model.n_layers": count,
    "model.n_heads": count,
    "model.positional": one_of(*POSITIONAL),
    "model.max_len": count,
    "model.teacher_forcing": probability,
    "trainer.max_epochs": count,
    "trainer.check_val_every_n_epoch": count,
    "trainer.accelerator": one_of("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.devices": one_device,
    "trainer.num_nodes": only(1, ONE_DEVICE),
    "trainer.strategy": only("auto", ONE_DEVICE),
    "trainer.precision": precision,
    "trainer.gradient_clip_val": optional(non_negative),
    "trainer.gradient_clip_algorithm": one_of("norm", "value"),
    "trainer.accumulate_grad_batches": count,
    "trainer.max_time": optional(duration),
    "trainer.deterministic": boolean,
    "trainer.detect_anomaly": boolean,
    "trainer.benchmark": optional(boolean),
    "logger.name": one_of("mlflow", "csv", "none", hint="logger=mlflow, logger=csv or logger=none"),
    "logger.experiment": name,
    "logger.save_dir": name,
}
_ABSENT = object()


def _validate_lengths(task, model) -> None:
    """Variable-length training and per-length testing: whole-window echoes, by networks that take any length."""
    train, test = task.get("train_lengths"), task.get("test_lengths")
    for key, value in (("train_lengths", train), ("test_lengths", test)):
        if value is not None and value[1] >= LENGTH_SEED_STRIDE:
            raise ConfigError(
                f"task.{key}={list(value)!r} must be null or [lo,hi]: whole numbers with 1 <= lo <= hi < "
                f"{LENGTH_SEED_STRIDE} (both lengths included), e.g. task.{key}=[1,10]"
            )
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
    from omegaconf import OmegaConf

    check_trainer_keys(cfg.trainer)
    for path, check in CHECKS.items():
        value = OmegaConf.select(cfg, path, default=_ABSENT)
        if value is not _ABSENT:
            check(path, value)
    task, model = cfg.task, cfg.model
    if is_copy_memory(task):
        _validate_copy_memory(task, model)
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
    if task.framing == "mask" and model.name in CANNOT_MASK:
        raise ConfigError(
            f"model={model.name} reads the window in one step and cannot mask padded items: "
            f"use task.framing=drop, or a recurrent topology (model=seq2seq, encdec or many_to_one)"
        )
    _check_network_options(task, model)
    _validate_lengths(task, model)
    rows = windows_per_sequence(task)
    if model.stateful and rows % model.batch_size:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0]
        raise ConfigError(
            f"model.batch_size={model.batch_size} does not divide the {rows} windows of a sequence, which a "
            f"stateful model needs: use one of {divisors}, or model.stateful=false"
        )


def _validate_copy_memory(task, model) -> None:
    """Copy memory: a network that answers at every step it reads, one window of T+20 steps per sequence."""
    if model.name not in READS_PER_STEP:
        raise ConfigError(
            f"model={model.name} cannot read task=copy_memory, which scores an answer at every input step as the "
            f"network reads it: use model={' or model='.join(READS_PER_STEP)} (model.cell=lstm or gru)"
        )
    for key in ("reverse_input", "reverse_target"):
        if task.get(key):
            raise ConfigError(
                f"task.{key}=true reverses echo windows; task=copy_memory has none: remove task.{key}, or use task=full"
            )
    if model.stateful:
        raise ConfigError("task=copy_memory trains on independent sequences: set model.stateful=false")
    if task.framing != "drop":
        raise ConfigError("task=copy_memory frames nothing (whole sequences): set task.framing=drop")
    steps = task.delay + 20
    for key in ("length", "n_in", "n_out"):
        if task.get(key) != steps:
            raise ConfigError(
                f"task.{key}={task.get(key)!r} is set by task.delay for task=copy_memory (T+20 = {steps}): "
                f"remove task.{key}=... and set task.delay"
            )
    for key in ("train_lengths", "test_lengths"):
        if task.get(key) is not None:
            raise ConfigError(f"task.{key} varies echo windows; task=copy_memory has none: remove task.{key}")


def _check_network_options(task, model) -> None:
    """The newer networks' settings that depend on others."""
    if "teacher_forcing" in model and task.get("representation", "onehot") != "onehot":
        raise ConfigError("model=autoregressive feeds back predicted tokens, which needs task.representation=onehot")
    if "n_heads" in model and model.d_model % model.n_heads:
        raise ConfigError(
            f"model.n_heads={model.n_heads} does not divide model.d_model={model.d_model}: "
            f"choose n_heads among {[h for h in range(1, model.d_model + 1) if model.d_model % h == 0][:8]}"
        )
    positional = model.get("positional")
    if "max_len" in model:
        longest = task.n_out if positional == "sinusoidal" else max(task.n_out, task.n_in)  # a table of positions
        if longest > model.max_len:
            raise ConfigError(
                f"model.max_len={model.max_len} is shorter than the {longest} positions model={model.name} "
                f"needs here: set model.max_len>={longest}"
            )
