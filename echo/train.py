"""train(cfg): check the config, build data and model, fit, test, print, and track one run."""

from __future__ import annotations

import logging
import signal
import sys
import time
import warnings
from contextlib import contextmanager

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from echo.checkpoints import RESUMED_FROM, Checkpointer, download_checkpoint
from echo.config import validate
from echo.data import EchoData, held_out, windows_per_sequence
from echo.faults import NonFiniteGuard, interrupted, record_error
from echo.models import MODELS
from echo.module import EchoModule
from echo.tracking import Tracker, TrackingCallback, flatten, tracking_uri


def train(cfg: DictConfig, run_name: str = "default", tags: dict[str, str] | None = None) -> dict[str, float]:
    """Train one echo model as `cfg` says; return its final metrics.

    Raises `echo.config.ConfigError` before anything is built or tracked if `cfg` cannot run.
    """
    validate(cfg)
    resume = cfg.get("resume")
    checkpoint = download_checkpoint(resume) if resume else None  # before anything is tracked
    if resume:
        tags = {**(tags or {}), RESUMED_FROM: str(resume)}
    _quiet_lightning()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task, model = cfg.task, cfg.model

    rows = windows_per_sequence(task)
    net = MODELS[model.name](
        n_features=task.n_unique, hidden_size=model.hidden_size, n_classes=task.n_unique, n_out=task.n_out
    )
    module = EchoModule(
        net,
        task.n_unique,
        model.lr,
        model.stateful,
        windows_per_epoch=task.sequences_per_epoch * rows,
        target=cfg.target,
        stop_at=cfg.stop_at,
    )
    data = EchoData(task, model.batch_size, model.stateful, seed=cfg.seed)

    tracker = Tracker(cfg.logger.experiment, run_name, tags) if cfg.logger.name == "mlflow" else None
    callbacks = [EpochProgress()] if cfg.progress else []
    callbacks += [TrackingCallback(tracker)] if tracker else []
    callbacks += [NonFiniteGuard(model.lr)]
    if tracker:
        callbacks += [Checkpointer(tracker, OmegaConf.to_yaml(cfg, resolve=True), cfg.get("checkpoint_every"))]
    trainer = pl.Trainer(
        **cfg.trainer,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,  # EpochProgress shows one bar over epochs instead
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if tracker:
        tracker.start(flatten(OmegaConf.to_container(cfg, resolve=True)))

    status = "FAILED"
    try:
        with _sigterm_as_interrupt():
            start = time.perf_counter()
            trainer.fit(module, data, ckpt_path=checkpoint)
            train_time = time.perf_counter() - start
            if not trainer.interrupted:
                trainer.test(module, data, verbose=False)
        if trainer.interrupted:
            status = "KILLED"
            return module.summary
        summary = {**module.summary, "train_time_s": train_time, "epochs": trainer.current_epoch}
        table = expected_predicted(module, data, task, seed=cfg.seed)
        print(table)
        print(_summary_line(summary))
        if tracker:
            tracker.log_metrics([(k, trainer.current_epoch, v) for k, v in summary.items()])
            tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            tracker.log_text(table + "\n", "expected_predicted.txt")
            tracker.log_figure(learning_curve(module.history, cfg.target), "learning_curve.png")
            print(f"MLflow run '{run_name}' ({tracker.run_id}) in {tracking_uri()}: see it with `mlflow ui`")
        status = "FINISHED"
        return summary
    except BaseException as error:
        if interrupted(error):
            status = "KILLED"
        elif tracker:
            record_error(tracker, error)
        raise
    finally:
        if tracker:
            tracker.end(status)


def expected_predicted(module: EchoModule, data: EchoData, task, seed: int) -> str:
    """The tutorial's evaluation: one fresh sequence, one `Expected: [...] Predicted [...]` per window."""
    x, y = held_out(task, 1, seed=10_000 + seed, device=module.device)
    pred = module.predict_windows(data.eval_batches(x, y))
    return "\n".join(f"Expected: {e} Predicted {p}" for e, p in zip(y[0].tolist(), pred.tolist()))


def learning_curve(history: list[tuple[str, int, float]], target: float):
    """Loss and accuracy against epochs, as a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, tuple[list, list]] = {}
    for name, epoch, value in history:
        series.setdefault(name, ([], []))
        series[name][0].append(epoch)
        series[name][1].append(value)
    for name, (epochs, values) in sorted(series.items()):
        ax = ax_loss if name.endswith("loss") else ax_acc
        ax.plot(epochs, values, label=name)
    ax_acc.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    ax_loss.set_yscale("log")
    fig.tight_layout()
    return fig


def _summary_line(s: dict[str, float]) -> str:
    line = (
        f"test/token_acc {s['test/token_acc']:.4f}  test/exact_match {s['test/exact_match']:.4f}  "
        f"after {s['epochs']} epochs, {s['train_time_s']:.1f} s training"
    )
    if "time_to_target_s" in s:
        line += f"; target reached at epoch {s['epochs_to_target']} ({s['time_to_target_s']:.1f} s)"
    return line


class EpochProgress(pl.Callback):
    """One progress bar over epochs (the tutorial's epochs are a few steps each)."""

    def on_train_start(self, trainer, module) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=trainer.max_epochs, unit="epoch", mininterval=0.25, dynamic_ncols=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.bar.update(1)

    def on_validation_end(self, trainer, module) -> None:
        if "val/exact_match" in module.summary:
            self.bar.set_postfix({"val/exact_match": f"{module.summary['val/exact_match']:.3f}"}, refresh=False)

    def on_train_end(self, trainer, module) -> None:
        self.bar.close()

    def on_exception(self, trainer, module, exception) -> None:
        if hasattr(self, "bar"):
            self.bar.close()


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a run the way Ctrl-C does (KILLED), in the main thread only."""
    if sys.platform == "win32" or signal.getsignal(signal.SIGTERM) is None:
        yield
        return
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
