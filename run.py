"""Command line: `python run.py [overrides]`, `python run.py -m <sweep>` (see README)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from echo.checkpoints import resumed_config
    from echo.config import ConfigError
    from echo.faults import TrainingError
    from echo.sweeps import job_name_and_tags, objective_value
    from echo.train import train

    try:
        if cfg.get("resume"):
            cfg = resumed_config(cfg, HydraConfig.get().overrides.task)
        metrics = train(cfg, *job_name_and_tags(HydraConfig.get(), cfg))
    except ConfigError as error:
        print(f"echo: bad config: {error}", file=sys.stderr)
        sys.exit(2)
    except TrainingError as error:
        print(f"echo: run failed: {error}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":  # one diverged trial scores worst; the sweep goes on
            return objective_value({}, cfg.get("objective", "val/exact_match"))
        sys.exit(1)
    return objective_value(metrics, cfg.get("objective", "val/exact_match"))  # what a sweeper optimises


if __name__ == "__main__":
    main()
