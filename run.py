"""Command line: `python run.py [overrides]`, `python run.py -m <sweep>` (see README)."""

import atexit
import multiprocessing
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import echo.resolvers  # noqa: F401  (registered before Hydra composes and resolves)
from echo.config import ConfigError, resolve_threads, validate
from echo.deferred import defer_unused_imports
from echo.sweeps import job_name_and_tags, objective_value
from echo.tracking import start_tracker

defer_unused_imports()  # scipy.signal and torchmetrics' plots: ~1.5 s of start-up echo never uses


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    defer_unused_imports()  # again in a launcher's job process, which did not run this file's top
    hydra_cfg = HydraConfig.get()
    try:
        if cfg.get("resume"):
            from echo.checkpoints import resumed_config

            cfg = resumed_config(cfg, hydra_cfg.overrides.task)
        validate(cfg)
    except ConfigError as error:
        print(f"echo: bad config: {error}", file=sys.stderr)
        sys.exit(2)
    resolve_threads(cfg)  # in the job's own process: its launcher's thread grant is here
    run_name, tags = job_name_and_tags(hydra_cfg, cfg)
    tracker = None
    if cfg.logger.name == "mlflow" and not cfg.get("resume"):
        # Start tracking before the heavy imports: MLflow loads on the other core meanwhile.
        # (A resumed run is tracked by train() once its checkpoint is found.)
        tracker = start_tracker(cfg, run_name, tags)
    from echo.faults import TrainingError
    from echo.train import train

    try:
        metrics = train(cfg, run_name, tags, tracker=tracker)
    except ConfigError as error:
        print(f"echo: bad config: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"echo: run failed: {error}", file=sys.stderr)
        if hydra_cfg.mode.name == "MULTIRUN":  # one diverged trial scores worst; the sweep goes on
            return objective_value({}, cfg.get("objective", "val/exact_match"))
        sys.exit(1)
    return objective_value(metrics, cfg.get("objective", "val/exact_match"))  # for a sweeper


if __name__ == "__main__":
    main()
    if not multiprocessing.active_children():  # others' workers stop in the normal exit (joblib's stopped)
        # Every run is written (its tracking worker said so): run the exit handlers, then
        # skip the interpreter's slow teardown of torch and Lightning (about 0.8 s).
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
