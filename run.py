"""Command line: `python run.py [overrides]`, `python run.py -m <sweep>` (see README)."""

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import echo.resolvers  # noqa: F401  (registered before Hydra composes and resolves)
from echo.config import ConfigError, validate
from echo.tracking import run_name_and_tags, start_tracker


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        validate(cfg)
    except ConfigError as error:
        print(f"echo: bad config: {error}", file=sys.stderr)
        sys.exit(2)
    # Start tracking before the heavy imports: MLflow loads on the other core meanwhile.
    run_name, tags = run_name_and_tags(HydraConfig.get())
    tracker = start_tracker(cfg, run_name, tags) if cfg.logger.name == "mlflow" else None
    from echo.train import train

    metrics = train(cfg, run_name, tags, tracker=tracker)
    return metrics.get("val/exact_match", 0.0)  # what a sweeper maximises


if __name__ == "__main__":
    main()
    # Every run is written (its tracking worker has exited): skip the interpreter's slow
    # teardown of torch and Lightning (about 0.8 s).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
