"""Checkpoints in the run's MLflow artifacts, and `resume=<run id>` from the last one
(docs/faults-and-resume.md). A checkpoint is read weights-only before Lightning unpickles it."""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from echo.compat import count_epochs_in_steps_of, restart_interrupted_epoch
from echo.config import ConfigError, first_line
from echo.continuation import NOT_COMPARED  # settings that are no change of a run's config
from echo.continuation import RESUMED_FROM as RESUMED_FROM  # the tag of a resumed run (echo.train's)
from echo.faults import TrainingError
from echo.population import CHECKPOINT as MEMBER_CHECKPOINT  # what a population's member saves instead
from echo.population import MEMBER_STATE
from echo.tracking import PARENT_TAG, mlflow_client, tracking_uri

FOLDER = "checkpoints"
OPTIMIZER_OF = {"exp_avg": "Adam", "exp_avg_sq": "Adam", "square_avg": "RMSprop"}  # whose moment it is


class Checkpointer(pl.Callback):
    """Saves the trainer's state into the tracker's run: every `every` epochs, on interrupt or error."""

    def __init__(self, tracker, config_yaml: str, every: int | None):
        self.tracker, self.config_yaml, self.every = tracker, config_yaml, every
        self._epoch_done = False  # whether the checkpoint being saved marks its epoch done

    def save(self, trainer: pl.Trainer, epoch_done: bool = False) -> None:
        """Into the run's artifacts, through its tracking worker (which removes the folder)."""
        self._epoch_done = epoch_done
        folder = tempfile.mkdtemp(prefix="echo-checkpoint-")
        trainer.save_checkpoint(Path(folder) / "last.ckpt")
        (Path(folder) / "config.yaml").write_text(self.config_yaml)
        self.tracker.log_artifacts(folder, FOLDER, remove=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        if self.every and module.epochs_at_step_end() % self.every == 0:  # epochs_per_step divides `every`
            self.save(trainer, epoch_done=True)  # its end hooks go on, and record its metrics

    def on_exception(self, trainer, module, exception) -> None:
        if not isinstance(exception, TrainingError):  # a diverged model is not worth resuming
            self.save(trainer)
            print(
                f"echo: stopped after {module.epochs_completed()} complete epochs; checkpoint saved: continue with "
                f"`python run.py resume={self.tracker.run_id}`",
                file=sys.stderr,
            )

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        echo = {"summary": dict(module.summary), "run_id": self.tracker.run_id}
        checkpoint["echo"] = {**echo, "epoch_done": self._epoch_done, "epochs_per_step": module.epochs_per_step}

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        module.summary.update(checkpoint.get("echo", {}).get("summary", {}))
        restart_interrupted_epoch(checkpoint)  # Lightning's fit-loop counters (echo/compat.py)
        count_epochs_in_steps_of(checkpoint, module.epochs_per_step)


def saved_epochs_per_step(path: str) -> int:
    """The tutorial epochs per Lightning epoch of the run that saved the checkpoint at `path`."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # checked by download_checkpoint
    return checkpoint.get("echo", {}).get("epochs_per_step", 1)


def _download(run_id: str, name: str, folder: str) -> str:
    client = mlflow_client()
    try:
        run = client.get_run(run_id)
    except Exception:
        raise ConfigError(
            f"resume={run_id}: no such MLflow run in {tracking_uri()}; copy a run id from `mlflow ui`"
        ) from None
    if run.data.tags.get(PARENT_TAG) == "true":
        raise ConfigError(
            f"resume={run_id} is a sweep's parent run: continue its sweep with `python run.py -m resume={run_id}`"
        )
    try:
        return client.download_artifacts(run_id, f"{FOLDER}/{name}", folder)
    except Exception:
        saved = {f.path for f in client.list_artifacts(run_id, FOLDER)}
        if name == "last.ckpt" and f"{FOLDER}/{MEMBER_CHECKPOINT}" in saved:
            return client.download_artifacts(run_id, f"{FOLDER}/{MEMBER_CHECKPOINT}", folder)
        raise ConfigError(
            f"resume={run_id}: the run has no checkpoint (runs save one when interrupted or failed, or every "
            f"checkpoint_every epochs)"
        ) from None


def download_checkpoint(run_id: str, cfg: DictConfig | None = None) -> str:
    """The local path of run `run_id`'s last checkpoint (`last.ckpt` or a member's `population.pt`);
    ConfigError if it has none, holds more than tensors and plain values, or does not fit `cfg`'s network."""
    from echo.reuse import read_weights_only

    folder = tempfile.mkdtemp(prefix="echo-resume-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a copy: the run keeps its own
    path = _download(str(run_id), "last.ckpt", folder)
    what = f"resume={run_id}: the run's {FOLDER}/{Path(path).name}"
    checkpoint = read_weights_only(path, what)
    needs = MEMBER_STATE if is_member_checkpoint(path) else ("state_dict",)
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in needs):
        raise ConfigError(f"{what} is not a checkpoint, refused")
    if cfg is not None:
        try:
            why = _misfit(checkpoint, cfg, is_member_checkpoint(path))
        except Exception as error:  # a planted structure where tensors belong
            raise ConfigError(
                f"{what} is not a checkpoint of this network, refused ({type(error).__name__}: {first_line(error)})"
            ) from None
        if why:
            raise ConfigError(f"{what} does not fit the network its config builds: {why}, refused")
    return path


def _misfit(checkpoint: dict, cfg: DictConfig, member: bool) -> str | None:
    """How the checkpoint's weights and moments first differ from `cfg`'s network's (on torch's meta
    device); None if they fit."""
    import torch

    from echo.build import network
    from echo.encoding import representation
    from echo.reuse import misfit

    rep = representation(cfg.task)
    with torch.device("meta"):
        net = network(cfg, rep)
    if why := misfit(checkpoint["state_dict"], {f"net.{k}": v for k, v in net.state_dict().items()}):
        return why
    params = dict(net.named_parameters())
    if member:  # echo.population's own Adam or RMSprop: moments by parameter name
        for moment, values in checkpoint["adam"].items():
            if moment != "step" and (why := misfit(values, params)):
                return f"{OPTIMIZER_OF[moment]}'s {moment}: {why}"
        return None
    names = list(params)
    for optimizer in checkpoint.get("optimizer_states") or []:  # Lightning's: torch's Adam, by parameter index
        counted = sum(len(group["params"]) for group in optimizer["param_groups"])
        if counted != len(names) or any(index not in range(len(names)) for index in optimizer["state"]):
            return f"its optimizer state is for {counted} parameters, the network has {len(names)}"
        for index, state in optimizer["state"].items():
            for moment in (moment for moment in OPTIMIZER_OF if moment in state):
                shape, expected = tuple(state[moment].shape), tuple(params[names[index]].shape)
                if shape != expected:
                    return (
                        f"{OPTIMIZER_OF[moment]}'s {moment} of net.{names[index]} has shape {shape}, "
                        f"the network's is {expected}"
                    )
    return None


def is_member_checkpoint(path: str) -> bool:
    """Whether the checkpoint at `path` is a population member's (echo.population), not Lightning's."""
    return Path(path).name == MEMBER_CHECKPOINT


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The resumed run's stored config with this command's plain overrides on top. A group on the command
    line that composes the run's config (a requeued SLURM job's) is no change; one that changes it is refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from echo.reuse import CONF, GROUPS, read_stored_config

    run_id = str(cfg.resume)
    with tempfile.TemporaryDirectory() as folder:
        saved = read_stored_config(_download(run_id, "config.yaml", folder), f"resume={run_id}", cfg)
    groups, plain = [], []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key == "resume" or key.startswith("hydra"):
            continue
        if key in GROUPS or (CONF / key).is_dir():
            groups.append(override)
        else:
            plain.append(key)
            OmegaConf.update(saved, key, override.value(), force_add=False)
    if groups and (change := _changed_setting(cfg, saved, plain)):
        key, here, there = change
        raise ConfigError(
            f"{groups[0].input_line}: a resumed run keeps its config, and this command's sets {key}={here!r} where "
            f"the run has {there!r}: only settings like trainer.max_epochs=... can change (start a new run to change "
            f"{key})"
        )
    saved.resume = run_id
    return saved


def _changed_setting(cfg: DictConfig, saved: DictConfig, plain: list[str]) -> tuple[str, object, object] | None:
    """(key, here, there) of the first setting this command's config changes, but for plain overrides."""
    from echo.tracking import flatten

    here = flatten(OmegaConf.to_container(cfg, resolve=True))
    there = flatten(OmegaConf.to_container(saved, resolve=False))
    for key, value in here.items():
        top = key.split(".")[0]
        if key not in there or top in NOT_COMPARED or any(key == p or key.startswith(f"{p}.") for p in plain):
            continue
        if value != there[key]:
            return key, value, there[key]
    return None
