"""A population: K runs whose configs differ only in settings that leave every tensor's shape
alone (seed, learning rate, ...), trained as one stacked model in one process (docs/populations.md).

Each member is an honest run: its own network, built under its own seed exactly as
`echo.train` builds it, its own training data (its own generator, seeded as `echo.data.EchoData`
seeds it), its own Adam or RMSprop (`echo.stacked.MemberAdam`, `MemberRMSprop`: element-wise, so one over the
stacked weights is K independent ones), its own validation, stopping, metrics and MLflow run. The loss is the sum
of the members' mean losses, so each member's gradient is the one it would have alone. A member
that reaches `stop_at` is frozen (its updates masked) while the others go on; one whose loss
becomes NaN or infinite ends FAILED and the others go on; an interrupt (Ctrl-C, SIGTERM) ends
every member KILLED with a checkpoint. The population trains through Lightning's Trainer, as a run
does: `echo.module.PopulationModule` on `echo.data.PopulationData`; a member's step is the same
computation as an independent run's, batch for batch.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from echo.build import in_lightning_epochs, network, quiet_lightning
from echo.compat import reuse_freed_memory
from echo.data import PopulationData
from echo.encoding import representation
from echo.faults import TrainingError, interrupted
from echo.logger import Member
from echo.models import count_parameters
from echo.module import EpochProgress, PopulationModule
from echo.policy import cpu_threads, wide_step
from echo.stacked import STACKABLE
from echo.tracking import mlflow_client, start_tracker

POPULATION_TAG = "echo.population"
CHECKPOINT = "population.pt"  # in each member's artifacts, under checkpoints/
MEMBER_STATE = ("state_dict", "adam", "generator", "epochs_done", "summary")  # what CHECKPOINT holds ("adam":
# the member's optimizer state, Adam's or RMSprop's moments, under the name it always had)
# Settings that may differ between the members of one population: none changes a tensor's shape,
# the data's framing or the training's cadence. (progress and objective change nothing trained.)
MEMBER_SETTINGS = ("seed", "model.lr", "target", "stop_at", "objective", "progress")


def why_not_stackable(cfg: DictConfig) -> str | None:
    """Why a run of `cfg` cannot be a population member (None if it can)."""
    model, task = cfg.model, cfg.task
    if model.name not in STACKABLE:
        return f"model={model.name} has no stacked form"
    if model.get("cell", "lstm") != "lstm":
        return f"model.cell={model.cell} has no stacked form (lstm only)"
    if model.get("num_layers", 1) != 1:
        return f"model.num_layers={model.num_layers} has no stacked form (one layer only)"
    if task.get("name") == "copy_memory":
        return "task=copy_memory has no stacked form"
    for key in ("resume", "evaluate"):
        if cfg.get(key):
            return f"{key}={cfg.get(key)} continues or reads one run"
    for key in ("train_lengths", "test_lengths"):
        if task.get(key) is not None:
            return f"task.{key} varies tensor shapes"
    return None


def population_key(cfg: DictConfig) -> str:
    """Runs whose configs have the same key can train as one population: the config without
    MEMBER_SETTINGS."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for path in MEMBER_SETTINGS:
        *parents, leaf = path.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return repr(sorted(_flat_items(tree)))


def _flat_items(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", repr(value)


def train_population(
    members: list[Member], population_id: str | None, threads: int, restore: dict | list[dict] | None = None
) -> list[Member]:
    """Train the members as one population; return them with their status and summary.

    Every member's config must have the same `population_key`. Each starts an MLflow run (tagged
    `echo.population=<population_id>`, if given) if its logger is mlflow. KeyboardInterrupt (Ctrl-C,
    or SIGTERM as the sweep turns it) propagates after every member has ended KILLED with a
    checkpoint. `restore`: each member's checkpoint (CHECKPOINT's contents; one for a population of one),
    for members that continue, all saved after the same epoch by one population (`can_restore_together`).
    """
    for member in members:
        if population_id is not None:
            member.tags = {**member.tags, POPULATION_TAG: population_id}
        if member.cfg.logger.name == "mlflow":
            member.tracker = start_tracker(member.cfg, member.run_name, member.tags)
        member.start_logging()
    module = data = None
    try:
        trainer, module, data = build_population(members, restore)
        fit_population(trainer, module, data, threads)
    except BaseException as exception:
        stopped = interrupted(exception)  # Ctrl-C or SIGTERM: Lightning turns it into sys.exit(1)
        if module is not None:
            module.log_train_metrics()  # the metrics so far are kept, as an independent run keeps them
            if stopped:
                save_checkpoints(module, data)
        error = None if stopped else traceback.format_exc()
        for member in members:
            if member.status in ("RUNNING", "STOPPED"):
                member.status, member.error = ("KILLED", None) if stopped else ("FAILED", error)
        if stopped:
            raise KeyboardInterrupt from exception
        raise
    finally:
        for member in members:
            if member.tracker:
                member.tracker.end(member.status, member.error)
    return members


def build_population(members: list[Member], restore: dict | list[dict] | None = None):
    """The population's Trainer, LightningModule and data: each member's network built under its own seed
    as `echo.train` builds an independent run's, brought to the Trainer's device and precision, and
    stacked; `restore`: as `train_population`'s."""
    restore = [restore] if isinstance(restore, dict) else restore
    assert restore is None or (len(restore) == len(members) and can_restore_together(restore)), restore
    cfg = members[0].cfg
    # The set-up (weights, held-out data) on one thread, the training on the population's threads: while
    # the sweep starts, its tracking service is busy on the other core, and a second thread's share of
    # each operation would wait for it (0.5-1 s for listing B's eight networks).
    torch.set_num_threads(1)
    reuse_freed_memory()
    every = cfg.trainer.get("check_val_every_n_epoch", 1) or 1
    trainer = _trainer(cfg, int(restore[0]["epochs_done"]) if restore else 0, every)
    rep = representation(cfg.task)
    nets = []
    for member in members:  # as echo.train builds an independent run's network, which Lightning converts
        torch.manual_seed(member.cfg.seed)
        nets.append(trainer.precision_plugin.convert_module(network(member.cfg, rep)))
        if member.tracker:  # as an independent run logs it
            member.tracker.log_params({"n_params": count_parameters(nets[-1])})
    for net, state in zip(nets, restore or []):
        net.load_state_dict({name.removeprefix("net."): w for name, w in state["state_dict"].items()})
    device = trainer.strategy.root_device
    module = PopulationModule(members, nets, device, every, wide_step(cfg, len(members)), restore)
    data = PopulationData(cfg.task, [m.cfg.seed for m in members], cfg.model.batch_size, cfg.model.stateful, device)
    for generator, state in zip(data.generators, restore or []):
        generator.set_state(state["generator"])
    return trainer, module, data


def _trainer(cfg: DictConfig, done: int, every: int) -> pl.Trainer:
    """The population's Trainer: one step for the epochs up to each validation, from epoch `done` on."""
    quiet_lightning()
    last = int(cfg.trainer.max_epochs)
    steps = last // every - done // every + (1 if last % every else 0)
    args = in_lightning_epochs(cfg.trainer, 1) | {"max_epochs": max(steps, 1), "check_val_every_n_epoch": 1}
    args.pop("min_epochs", None)
    return pl.Trainer(
        **args,
        logger=False,  # each member has its own logger (Member.logger)
        callbacks=[EpochProgress(cfg.trainer.max_epochs)] if cfg.get("progress") else [],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def fit_population(trainer: pl.Trainer, module: PopulationModule, data: PopulationData, threads: int) -> None:
    """Train the population with its Trainer (`build_population`'s) on `threads` CPU threads."""
    torch.set_num_threads(threads)
    trainer.fit(module, data)


def restored_together(state: dict) -> tuple[int, int]:
    """Checkpoints (CHECKPOINT's contents) of members that can continue as one population have the same
    epoch count and Adam step count (one for all of a population's members): this pair."""
    return int(state["epochs_done"]), int(state["adam"]["step"])


def can_restore_together(states: list[dict]) -> bool:
    return len({restored_together(state) for state in states}) == 1


def save_checkpoints(module: PopulationModule, data: PopulationData) -> None:
    """Each member's weights (its own network's layout), optimizer moments, data generator and epoch
    count into its run's artifacts: checkpoints/population.pt and checkpoints/config.yaml."""
    saved = 0
    for k, member in enumerate(module.members):
        if member.tracker is None or member.status not in ("RUNNING", "STOPPED"):
            continue
        try:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(module.member_state(k, data.generators[k]), Path(folder) / CHECKPOINT)
                (Path(folder) / "config.yaml").write_text(OmegaConf.to_yaml(member.cfg, resolve=True))
                mlflow_client().log_artifacts(member.tracker.run_id, folder, "checkpoints")
            saved += 1
        except Exception:  # the others are still worth saving
            traceback.print_exc()
    print(
        f"echo: population stopped after {module.epochs_done} complete epochs; "
        f"checkpoints saved for {saved} of {len(module.members)} members (checkpoints/{CHECKPOINT} in each run): "
        "continue one with `python run.py resume=<its run id>`",
        file=sys.stderr,
    )


def resume_member(cfg: DictConfig, run_name: str, tags: dict[str, str], checkpoint: str) -> dict[str, float]:
    """`resume=<member run id>`: the member continues alone from its checkpoint (CHECKPOINT, read
    with weights only and checked by `echo.checkpoints.download_checkpoint`), in the population's
    loop, as a new run; returns its summary. A member that diverges raises TrainingError, as a run does."""
    from echo.reuse import read_weights_only

    state = read_weights_only(checkpoint, f"resume={cfg.resume}: the run's checkpoints/{CHECKPOINT}")
    member = Member(cfg, run_name, tags)
    train_population([member], None, cpu_threads(cfg), restore=state)
    if member.status == "FAILED":
        raise TrainingError((member.error or "").strip().removeprefix("echo.faults.TrainingError: "))
    return member.summary
