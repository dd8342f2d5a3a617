"""Command line: `python run.py [overrides]`, `python run.py -m <sweep>` (see README)."""

import multiprocessing
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

import echo.resolvers  # noqa: F401  (registered before Hydra composes and resolves)
from echo.compat import defer_unused_imports, exit_without_teardown
from echo.config import ConfigError, first_line, validate
from echo.continuation import continued_argv, continued_parent, decide
from echo.hydra_errors import one_line_errors
from echo.policy import resolve_threads
from echo.slurm import requeued_from
from echo.sweeps import job_name_and_tags, objective_value
from echo.tracking import tracking_uri, warm_up
from echo.tracking.outbox import TrackingError, TrackingFailed, cannot_write, unreachable

defer_unused_imports()  # what torchmetrics would load for nothing echo uses: 1.5 s here, ~10 s on a GPU machine


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    defer_unused_imports()  # again in a launcher's job process, which did not run this file's top
    hydra_cfg = HydraConfig.get()
    decision = None
    try:
        if cfg.get("resume") and cfg.get("evaluate"):  # before either reads the store
            raise ConfigError(f"resume={cfg.resume} and evaluate={cfg.evaluate}: choose one")
        if hydra_cfg.mode.name == "MULTIRUN" and (parent := continued_parent()):  # a continued sweep's job
            decision = decide(parent, cfg)
            if line := decision.line(f"#{hydra_cfg.job.num}"):
                print(line, file=sys.stderr)
            if decision.action == "keep":  # its objective, for a sweeper, from the run that finished
                return objective_value(decision.run.data.metrics, cfg.get("objective", "val/exact_match"))
            if decision.action == "resume":
                cfg.resume = decision.run_id
        elif cfg.logger.name == "mlflow" and not cfg.get("resume"):  # a requeued SLURM job continues its run
            cfg.resume = requeued_from(cfg.logger.experiment, hydra_cfg.job.override_dirname or "default")
        if cfg.get("resume"):
            from echo.checkpoints import resumed_config

            cfg = resumed_config(cfg, hydra_cfg.overrides.task)
        if cfg.get("evaluate"):
            from echo.reuse import evaluated_config

            cfg = evaluated_config(cfg, hydra_cfg.overrides.task)
        validate(cfg)
        resolve_threads(cfg)  # in the job's own process: its launcher's thread grant and cores are here
    except (ConfigError, OmegaConfBaseException) as error:  # a bad value, or `${typo}` that cannot resolve
        print(f"echo: bad config: {first_line(error)}", file=sys.stderr)
        sys.exit(2)
    if cfg.logger.name == "mlflow" and (why := unreachable(tracking_uri())):
        print(
            f"echo: tracking failed: the tracking server {tracking_uri()} is unreachable ({why}): start it, "
            f"or run with logger=none",
            file=sys.stderr,
        )
        sys.exit(2)
    if cfg.logger.name == "mlflow" and (why := cannot_write(tracking_uri())):
        print(f"echo: tracking failed: {why}", file=sys.stderr)
        sys.exit(2)
    run_name, tags = job_name_and_tags(hydra_cfg, cfg)
    tags |= decision.tags() if decision else {}  # a job run again in the place of one that left no checkpoint
    if cfg.logger.name == "mlflow":
        # Start the tracking worker before the heavy imports: MLflow loads on the other core
        # meanwhile. train() starts the run once the checks that need torch have passed.
        warm_up()
    from echo.faults import TrainingError
    from echo.train import train

    try:
        metrics = train(cfg, run_name, tags)
    except ConfigError as error:
        print(f"echo: bad config: {error}", file=sys.stderr)
        sys.exit(2)
    except (TrainingError, TrackingFailed) as error:
        what = "run failed" if isinstance(error, TrainingError) else "tracking failed"
        print(f"echo: {what}: {error}", file=sys.stderr)
        if hydra_cfg.mode.name == "MULTIRUN":  # it scores worst; the sweep goes on (and fails at its end)
            return objective_value({}, cfg.get("objective", "val/exact_match"))
        sys.exit(1 if isinstance(error, TrainingError) else error.exit_code)
    except TrackingError as error:  # the store could not take the run: nothing was trained
        print(f"echo: tracking failed: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    return objective_value(metrics, cfg.get("objective", "val/exact_match"))  # for a sweeper


if __name__ == "__main__":
    sys.argv = continued_argv(sys.argv)  # `-m resume=<sweep parent run id>`: that sweep's command line, continued
    with one_line_errors(main):  # Hydra's own refusals (an unknown option or key) in one line too
        main()
    if not multiprocessing.active_children():  # others' workers stop in the normal exit (joblib's stopped)
        # Every run is written (its tracking worker said so): run the exit handlers, then
        # skip the interpreter's slow teardown of torch and Lightning.
        exit_without_teardown()
