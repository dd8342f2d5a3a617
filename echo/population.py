"""A population: K runs whose configs differ only in settings that leave every tensor's shape alone
(seed, learning rate, ...), trained as one stacked model in one process, each member an honest run
with its own network, data, optimizer, stop and MLflow run (docs/populations.md)."""

from __future__ import annotations

import json
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
# What CHECKPOINT holds ("adam": the optimizer's state, Adam's or RMSprop's, under the name it always had)
MEMBER_STATE = ("state_dict", "adam", "generator", "epochs_done", "summary")
# Settings the members of one population may differ in: none changes a shape, the framing or the cadence.
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
    """Runs whose configs have the same key (the config without MEMBER_SETTINGS) form one population."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for path in MEMBER_SETTINGS:
        *parents, leaf = path.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return json.dumps(tree, sort_keys=True, default=repr)


def train_population(
    members: list[Member], population_id: str | None, threads: int, restore: dict | list[dict] | None = None
) -> list[Member]:
    """Train members of one `population_key` as one population; return them with status and summary.
    An interrupt propagates once every member has ended KILLED with a checkpoint. `restore`: each
    member's checkpoint (CHECKPOINT's contents), all saved after the same epoch by one population."""
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
        stopped = interrupted(exception)
        if module is not None:
            module.log_train_metrics()
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
    """The population's Trainer, LightningModule and data, each member's network built as `echo.train`
    builds an independent run's; `restore`: as `train_population`'s."""
    restore = [restore] if isinstance(restore, dict) else restore
    together = restore is None or len({restored_together(state) for state in restore}) == 1
    assert restore is None or (len(restore) == len(members) and together), restore
    cfg = members[0].cfg
    # Set up on one thread: while a sweep starts, its tracking service is busy on the other core, and a
    # second thread's share of each operation would wait for it (0.5-1 s for listing B's eight networks).
    torch.set_num_threads(1)
    reuse_freed_memory()
    quiet_lightning()
    every = cfg.trainer.get("check_val_every_n_epoch", 1) or 1
    done = int(restore[0]["epochs_done"]) if restore else 0
    last = int(cfg.trainer.max_epochs)
    steps = last // every - done // every + (1 if last % every else 0)  # one up to each validation
    args = in_lightning_epochs(cfg.trainer, 1) | {"max_epochs": max(steps, 1), "check_val_every_n_epoch": 1}
    args.pop("min_epochs", None)
    trainer = pl.Trainer(
        **args,
        logger=False,  # each member has its own
        callbacks=[EpochProgress(cfg.trainer.max_epochs)] if cfg.get("progress") else [],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        inference_mode=False,  # members stop and freeze in validation, then train on with what it made
    )
    rep = representation(cfg.task)
    nets = []
    for member in members:
        torch.manual_seed(member.cfg.seed)
        nets.append(trainer.precision_plugin.convert_module(network(member.cfg, rep)))
        if member.tracker:
            member.tracker.log_params({"n_params": count_parameters(nets[-1])})
    for net, state in zip(nets, restore or []):
        net.load_state_dict({name.removeprefix("net."): w for name, w in state["state_dict"].items()})
    device = trainer.strategy.root_device
    module = PopulationModule(members, nets, device, every, wide_step(cfg, len(members)), restore)
    data = PopulationData(cfg.task, [m.cfg.seed for m in members], cfg.model.batch_size, cfg.model.stateful, device)
    for generator, state in zip(data.generators, restore or []):
        generator.set_state(state["generator"])
    return trainer, module, data


def fit_population(trainer: pl.Trainer, module: PopulationModule, data: PopulationData, threads: int) -> None:
    torch.set_num_threads(threads)
    trainer.fit(module, data)


def restored_together(state: dict) -> tuple[int, int]:
    """Members' checkpoints that can continue as one population have the same pair."""
    return int(state["epochs_done"]), int(state["adam"]["step"])


def save_checkpoints(module: PopulationModule, data: PopulationData) -> None:
    """Each member's checkpoint into its run's artifacts: checkpoints/population.pt and config.yaml."""
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
    """`resume=<member run id>`: the member continues alone from its checkpoint, as a new run; returns
    its summary. A member that diverges raises TrainingError, as a run does."""
    from echo.reuse import read_weights_only

    state = read_weights_only(checkpoint, f"resume={cfg.resume}: the run's checkpoints/{CHECKPOINT}")
    member = Member(cfg, run_name, tags)
    train_population([member], None, cpu_threads(cfg), restore=state)
    if member.status == "FAILED":
        raise TrainingError((member.error or "").strip().removeprefix("echo.faults.TrainingError: "))
    return member.summary
