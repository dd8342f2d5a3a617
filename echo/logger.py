"""The Trainer's logger: `logger=mlflow` (echo's `MLflowRunLogger`), `logger=csv` (Lightning's
`CSVLogger`) or `logger=none`; files of a run go through `log_text`.

Why not Lightning's `MLFlowLogger` (2-core CPU, listing A): a lean Trainer ran ~150 epochs/s, ~75 with
it on SQLite (~4 ms per synchronous call), and importing mlflow costs ~1 s of start-up. echo's `Tracker`
writes from a worker process in batches (0.84 s for 10,000 values instead of 20 s), and ends the run
KILLED even on SIGKILL (docs/performance.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger

from echo.reuse import save_network
from echo.tracking import Tracker, flatten


class MLflowRunLogger(Logger):
    """One MLflow run (a `Tracker`) as a Lightning logger: rows go to the worker at each `save()`, one
    message for many; `history` keeps them all, for the learning curve."""

    def __init__(self, tracker: Tracker):
        super().__init__()
        self.tracker = tracker
        self.history: list[tuple[str, int, float]] = []
        self._unsent = 0

    @property
    def name(self) -> str:
        return self.tracker.experiment

    @property
    def version(self) -> str | None:
        return self.tracker.run_id

    @property
    def experiment(self) -> Tracker:
        return self.tracker

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        params = params if isinstance(params, dict) else vars(params)
        if params:
            self.tracker.log_params(flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history += [(name, int(step or 0), float(value)) for name, value in metrics.items()]

    def save(self) -> None:
        rows, self._unsent = self.history[self._unsent :], len(self.history)
        self.tracker.log_metrics(rows)

    def finalize(self, status: str) -> None:
        self.save()


def log_text(logger: Logger | None, text: str, name: str) -> None:
    """A text file of the run: an MLflow artifact, or a file in the CSV logger's folder."""
    if isinstance(logger, MLflowRunLogger):
        logger.tracker.log_text(text, name)
    elif isinstance(logger, CSVLogger):
        folder = Path(logger.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


@dataclass(eq=False)  # a member is itself alone: finding it in a list compares no configs
class Member:
    """One run, alone or a population's member."""

    cfg: DictConfig
    run_name: str
    tags: dict[str, str]
    tracker: Tracker | None = None
    logger: Logger | None = None
    summary: dict = field(default_factory=dict)
    status: str = "RUNNING"  # RUNNING (training), STOPPED (trained, not yet tested), FINISHED, FAILED, KILLED
    error: str | None = None

    @property
    def loggers(self) -> list:
        return [self.logger] if self.logger is not None else []

    def start_logging(self) -> None:
        """Its logger, and its config among the params (an MLflow run has it already) and as config.yaml."""
        if self.tracker is not None:
            self.logger = MLflowRunLogger(self.tracker)
        elif self.cfg.logger.name == "csv":
            self.logger = CSVLogger(self.cfg.logger.save_dir, name=self.cfg.logger.experiment)
            self.logger.log_hyperparams(OmegaConf.to_container(self.cfg, resolve=True))
        log_text(self.logger, OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")

    def stopped(self, baseline: float | None = None) -> None:
        """Its training is over: the tracking worker draws its curve meanwhile."""
        if isinstance(self.logger, MLflowRunLogger):
            self.tracker.log_learning_curve(self.logger.history, self.cfg.target, baseline)

    def store(self, net: torch.nn.Module, by_position: list[float], chance: float, table: str) -> None:
        """Its test is done: its table, figure and trained network."""
        log_text(self.logger, table + "\n", "expected_predicted.txt")
        if self.tracker:
            self.tracker.log_by_position_plot(by_position, chance)
            save_network(net, OmegaConf.to_yaml(self.cfg, resolve=True), self.tracker)

    def finished(self, net: torch.nn.Module, by_position: list[float], chance: float, table: str) -> None:
        """A member's `store`, then its run ends while the others train."""
        self.store(net, by_position, chance, table)
        if self.tracker:
            self.tracker.end_soon("FINISHED")
