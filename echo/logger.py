"""The Trainer's logger: `logger=mlflow` (echo's `MLflowRunLogger`, writing through a tracking
worker), `logger=csv` (Lightning's own `CSVLogger`) or `logger=none`.

Everything a run logs reaches the Trainer's loggers through Lightning's `Logger` interface
(`log_metrics(metrics, step)`, `log_hyperparams`, `save`, `finalize`): the module with
`self.log_dict` and `echo.module.log_rows`, the run's end in echo/train.py. Files (the resolved
config, the Expected/Predicted table) go through `log_text`: into the MLflow run's artifacts, or
beside a CSV logger's `metrics.csv`.

Why echo's own MLflow logger and not Lightning's `MLFlowLogger`, measured on a 2-core CPU (listing
A, 500 epochs): a lean Trainer ran ~150 epochs/s, ~75 with `MLFlowLogger` on SQLite (~4 ms per
synchronous call; ~55 ms over HTTP), and importing mlflow costs ~1 s of the training process's
start-up. echo's `Tracker` hands rows to a worker process that imports mlflow and writes on the
other core in batches (0.84 s for 10,000 values instead of 20 s), and ends the run KILLED even when
the training process dies by SIGKILL (docs/performance.md, echo/tracking/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger

from echo.reuse import save_network
from echo.tracking import Tracker, flatten


class MLflowRunLogger(Logger):
    """One MLflow run (a `Tracker`) as a Lightning logger. Metrics are buffered and handed to the
    tracking worker at each `save()` (Lightning calls it after each logging round), one message
    for many rows. `history` keeps every row, for the learning curve drawn at the run's end."""

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


def make_logger(cfg, tracker: Tracker | None) -> Logger | None:
    """The Trainer's logger for `cfg.logger`: the run's tracker as a logger, Lightning's CSVLogger
    (`<logger.save_dir>/<logger.experiment>/version_<n>/metrics.csv`), or None."""
    if tracker is not None:
        return MLflowRunLogger(tracker)
    if cfg.logger.name == "csv":
        return CSVLogger(cfg.logger.save_dir, name=cfg.logger.experiment)
    return None


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
    """One run, alone or a population's member: its config (resolved and checked, as run.py leaves it),
    run name and tags, its tracker and Lightning logger, and what it has done so far."""

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
        """Its logger (`make_logger`), its config among the params (an MLflow run has it already) and
        as config.yaml: there while it runs."""
        self.logger = make_logger(self.cfg, self.tracker)
        if self.logger is not None and self.tracker is None:
            self.logger.log_hyperparams(OmegaConf.to_container(self.cfg, resolve=True))
        log_text(self.logger, OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")

    def stopped(self, baseline: float | None = None) -> None:
        """Its training is over: the tracking worker draws its curve meanwhile (`baseline`: chance/loss)."""
        if isinstance(self.logger, MLflowRunLogger):
            self.tracker.log_learning_curve(self.logger.history, self.cfg.target, baseline)

    def store(self, net: torch.nn.Module, by_position: list[float], chance: float, table: str) -> None:
        """Its test is done (its metrics logged): its table, figure and trained network."""
        log_text(self.logger, table + "\n", "expected_predicted.txt")
        if self.tracker:
            self.tracker.log_by_position_plot(by_position, chance)
            save_network(net, OmegaConf.to_yaml(self.cfg, resolve=True), self.tracker)

    def finished(self, net: torch.nn.Module, by_position: list[float], chance: float, table: str) -> None:
        """A member's `store`, then its run ends while the others train."""
        self.store(net, by_position, chance, table)
        if self.tracker:
            self.tracker.end_soon("FINISHED")
