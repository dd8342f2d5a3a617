"""train(cfg): check the config, build data and model, fit, test, print, and track one run."""

from __future__ import annotations

import signal
import sys
import traceback
from contextlib import contextmanager, suppress

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from echo.build import in_lightning_epochs, network, quiet_lightning
from echo.checkpoints import (
    RESUMED_FROM,
    Checkpointer,
    download_checkpoint,
    is_member_checkpoint,
    saved_epochs_per_step,
)
from echo.compat import reuse_freed_memory
from echo.config import validate
from echo.data import CopyMemoryData, EchoData, at_length, held_out
from echo.encoding import representation
from echo.faults import interrupted
from echo.lengths import evaluate_lengths, length_rows, length_scores
from echo.logger import Member, MLflowRunLogger, log_text
from echo.memory import N_SYMBOLS, RECALL, memoryless_loss
from echo.models import count_parameters
from echo.module import EchoModule, EpochProgress, log_rows, summary_rows
from echo.policy import epochs_per_step, resolve_threads, windows_per_epoch
from echo.preflight import out_of_memory_as_training_error, preflight
from echo.reuse import EVALUATED_FROM, network_to_evaluate
from echo.steps import StepSettings
from echo.summary import summary_line
from echo.task import is_copy_memory, length_range, trained_lengths
from echo.tracking import Tracker, start_tracker, tracking_uri
from echo.tracking.naming import where_line
from echo.tracking.outbox import TrackingStartError, cannot_write, unreachable


def train(cfg: DictConfig, run_name: str = "default", tags: dict[str, str] | None = None) -> dict[str, float]:
    """Train one echo model as `cfg` says; return its final metrics. ConfigError before anything is built
    or tracked if `cfg` cannot run; with `evaluate=<run id>`, that run's stored network is tested instead."""
    validate(cfg)
    resolve_threads(cfg)
    preflight(cfg)  # Lightning takes the trainer settings, and the run fits in memory
    checkpoint = None
    if (cfg.logger.name == "mlflow" or cfg.get("resume")) and (why := unreachable(tracking_uri())):
        raise TrackingStartError(
            f"the tracking server {tracking_uri()} is unreachable ({why}): start it, or run with logger=none"
        )
    if cfg.logger.name == "mlflow" and (why := cannot_write(tracking_uri())):
        raise TrackingStartError(why)
    if resume := cfg.get("resume"):  # a new run, linked to the one it continues
        checkpoint = download_checkpoint(resume, cfg)  # ConfigError if none, or misfit: before anything is tracked
        tags = {**(tags or {}), RESUMED_FROM: str(resume)}
        if is_member_checkpoint(checkpoint):  # a member goes on in the population's loop
            from echo.population import resume_member

            with _sigterm_as_interrupt():
                try:
                    return resume_member(cfg, run_name, tags, checkpoint)
                except KeyboardInterrupt:  # it ended KILLED with its checkpoint; exit as an interrupted run does
                    sys.exit(1)
    stored_net = None
    if evaluate := cfg.get("evaluate"):  # a new run, testing the network another one stored
        stored_net = network_to_evaluate(cfg)  # ConfigError if missing, unsafe or misfit: before tracking
        tags = {**(tags or {}), EVALUATED_FROM: str(evaluate)}
    tracker = None
    if cfg.logger.name == "mlflow":
        tracker = start_tracker(cfg, run_name, tags)
    status, error = "FAILED", None
    try:
        if tracker:
            tracker.check_started()  # a store that cannot take the run stops it before training
        with _sigterm_as_interrupt(), out_of_memory_as_training_error():
            summary = _fit_and_test(cfg, tracker, checkpoint, stored_net)
        status = "FINISHED"
        page = tracker.page() if tracker else None  # the run's address, once what was sent is written
    except BaseException as exception:
        if interrupted(exception):  # Ctrl-C or SIGTERM (Lightning turns it into sys.exit(1))
            status = "KILLED"
        else:
            error = traceback.format_exc()
        raise
    finally:
        if tracker:
            tracker.end(status, error)  # TrackingFailed if the store refused writes (kept locally)
    if tracker:
        print(where_line("run", tracker.run_name, tracker.run_id, page))
    return summary


def _fit_and_test(cfg: DictConfig, tracker: Tracker | None, checkpoint: str | None, stored_net) -> dict[str, float]:
    """Build, fit (or, with `stored_net`, only test), test and report; returns the summary."""
    quiet_lightning()
    torch.set_num_threads(cfg.threads)
    reuse_freed_memory()
    torch.manual_seed(cfg.seed)
    task, model = cfg.task, cfg.model
    rep = representation(task)
    variable = length_range(task, "train_lengths")  # (lo, hi), or None: one length
    copy = is_copy_memory(task)
    baseline = memoryless_loss(task.delay) if copy else None  # chance/loss
    net = stored_net if stored_net is not None else network(cfg, rep)
    if tracker:
        tracker.log_params({"n_params": count_parameters(net)})
    k = epochs_per_step(cfg, resumed=saved_epochs_per_step(checkpoint) if checkpoint else None)
    module = EchoModule(
        net,
        task.n_unique,
        model.lr,
        model.stateful,
        windows_per_epoch=windows_per_epoch(cfg),
        target=cfg.target,
        stop_at=cfg.stop_at,
        representation=rep,
        mask_inputs=task.framing == "mask",
        cuda_graph=cfg.get("cuda_graph", True) and not variable,  # a graph replays one shape only
        epochs_per_step=k,
        steps=StepSettings.from_trainer(cfg.trainer),  # clipping, accumulation: echo's steps, not the Trainer's
        optimizer=model.get("optimizer", "adam"),
        recall=RECALL if copy else None,  # copy memory: accuracy over the recalled symbols
    )
    if copy:
        data = CopyMemoryData(task, model.batch_size, seed=cfg.seed)
    else:
        data = EchoData(task, model.batch_size, model.stateful, seed=cfg.seed)
    run = Member(cfg, "", {}, tracker)
    run.start_logging()
    logger = run.logger
    callbacks = [EpochProgress(cfg.trainer.max_epochs)] if cfg.progress else []
    if tracker and stored_net is None:
        callbacks += [Checkpointer(tracker, OmegaConf.to_yaml(cfg, resolve=True), cfg.get("checkpoint_every"))]
    trainer = pl.Trainer(
        **{"log_every_n_steps": 1, **in_lightning_epochs(cfg.trainer, k)},  # (the module logs per validation)
        logger=logger or False,
        callbacks=callbacks,
        enable_progress_bar=False,  # EpochProgress shows one bar over epochs instead
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if tracker:  # what it trained on (the CPU's name is the tracking worker's to find)
        device = trainer.strategy.root_device
        tags = {"echo.device": str(device), "echo.device.threads": str(torch.get_num_threads())}
        if device.type == "cuda":
            tags["echo.device.gpu"] = torch.cuda.get_device_name(device)
        tracker.log_tags(tags)
    if stored_net is not None:
        return _test_stored(cfg, logger, trainer, module, data)
    trainer.fit(module, data, ckpt_path=checkpoint, weights_only=True)  # download_checkpoint checked it
    train_time = module.train_time_s()  # (a resumed run's: its time before included)
    run.stopped(baseline)  # its history is complete: the worker draws the curve meanwhile
    trainer.test(module, data, verbose=False)

    epochs = module.epochs_completed()
    chance = 1 / (N_SYMBOLS if copy else task.n_unique)  # a uniform guess per token (copy memory: per symbol)
    summary = {**module.summary, "train_time_s": train_time, "epochs": epochs}
    # a whole window by chance (with train_lengths: the held-out sets hold every trained length equally)
    lengths = range(variable[0], variable[1] + 1) if variable else [RECALL if copy else task.n_out]
    summary |= {"chance/token_acc": chance, "chance/exact_match": sum(chance**n for n in lengths) / len(lengths)}
    if copy:
        summary["chance/loss"] = baseline
    if tested := length_range(task, "test_lengths"):
        by_length = evaluate_lengths(module, data, tested)
        summary.update(length_scores(by_length, trained_lengths(task)))
        log_rows(run.loggers, length_rows(by_length))
        if tracker:
            tracker.log_length_generalisation(by_length, trained_lengths(task), chance)
    table = expected_predicted(module, data, task, seed=cfg.seed)
    print(table)
    print(summary_line(summary))
    log_rows(run.loggers, summary_rows(summary, epochs, module.by_position))
    run.store(net, module.by_position, chance, table)
    if logger is not None and not isinstance(logger, MLflowRunLogger):
        print(f"Logged to {logger.log_dir}")
    return summary


def _test_stored(cfg: DictConfig, logger, trainer, module: EchoModule, data: EchoData) -> dict:
    """evaluate=: test the stored network; print and log the table and the test metrics."""
    trainer.test(module, data, verbose=False)
    summary = dict(module.summary)
    table = expected_predicted(module, data, cfg.task, seed=cfg.seed)
    print(table)
    scores = f"test/token_acc {summary['test/token_acc']:.4f}  test/exact_match {summary['test/exact_match']:.4f}"
    print(f"{scores}  of the network of run {cfg.evaluate}")
    log_rows(trainer.loggers, [(name, 0, value) for name, value in summary.items()])
    log_text(logger, table + "\n", "expected_predicted.txt")
    return summary


def expected_predicted(module: EchoModule, data: EchoData | CopyMemoryData, task, seed: int) -> str:
    """The tutorial's `Expected: [...] Predicted [...]` per window of one fresh sequence (of the longest
    trained length); copy memory: the recalled symbols of ten."""
    if is_copy_memory(task):
        x, y = data.held_out(10_000 + seed, module.device, n=10)
        pred = module.predict_windows(data.eval_batches(x, y))[:, -RECALL:]
        return "\n".join(f"Expected: {e} Predicted {p}" for e, p in zip(y[:, -RECALL:].tolist(), pred.tolist()))
    if lengths := length_range(task, "train_lengths"):
        task = at_length(task, lengths[1])
    x, y = held_out(task, 1, seed=10_000 + seed, device=module.device)
    pred = module.predict_windows(data.eval_batches(x, y))
    return "\n".join(f"Expected: {e} Predicted {p}" for e, p in zip(y[0].tolist(), pred.tolist()))


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends a run the way Ctrl-C does (KILLED), in the main thread only."""
    previous = None
    if sys.platform != "win32" and signal.getsignal(signal.SIGTERM) is not None:
        with suppress(ValueError):  # not the main thread
            previous = signal.signal(signal.SIGTERM, _interrupt_unless_ending)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt_unless_ending(signum, frame) -> None:
    """Ctrl-C's KeyboardInterrupt, unless the run is already ending on an exception: SLURM's SIGTERM after
    submitit's SIGUSR2 at a time limit must not cut short the checkpoint being saved."""
    if sys.exc_info()[1] is None:
        signal.default_int_handler(signal.SIGINT, frame)
