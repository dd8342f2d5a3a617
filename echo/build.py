"""What a run builds from its config, for training (echo.train) and for the checks before it
(echo.preflight): the network, the Trainer's arguments, and Lightning's console kept quiet."""

from __future__ import annotations

import logging
import warnings

import torch
from omegaconf import DictConfig, OmegaConf

from echo.models import NET_OPTIONS, build_net
from echo.steps import ECHO_STEPS
from echo.task import length_range


def network(cfg: DictConfig, rep) -> torch.nn.Module:
    """The network `cfg` asks for, its sizes read from the config here (networks never see it).
    With task.train_lengths=[lo,hi] it is built for the longest, and told each batch's n_out."""
    task, model = cfg.task, cfg.model
    variable = length_range(task, "train_lengths")
    return build_net(
        model.name,
        n_in=variable[1] if variable else task.n_in,
        n_features=rep.n_features,
        hidden_size=model.hidden_size,
        n_classes=rep.n_outputs,
        n_out=variable[1] if variable else task.n_out,
        **{key: model[key] for key in NET_OPTIONS if key in model},
    )


def in_lightning_epochs(trainer_cfg, k: int) -> dict:
    """The Trainer's arguments, with the epoch counts in Lightning epochs of `k` tutorial epochs, less
    those echo's own optimizer steps take (echo/steps.py: Lightning refuses them with manual optimization)."""
    args = OmegaConf.to_container(trainer_cfg, resolve=True)
    for key in ECHO_STEPS:
        args.pop(key, None)
    for key in ("max_epochs", "check_val_every_n_epoch", "min_epochs"):
        if args.get(key):
            args[key] = -(-args[key] // k)  # k divides all but min_epochs
    return args


def quiet_lightning() -> None:
    """Lightning's info lines and the warnings that do not apply to echo's runs, off."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
    warnings.filterwarnings("ignore", ".*configure_optimizers` returned `None`.*")  # a population steps its own
    # On a machine with SLURM installed (a login node, a job): echo runs one process per job, no srun needed
    warnings.filterwarnings("ignore", ".*`srun` command is available on your system but is not used.*")
