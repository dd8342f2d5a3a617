"""Command line: `python run.py [overrides]`, `python run.py -m <sweep>` (see README)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import echo.resolvers  # noqa: F401  (registered before Hydra composes and resolves)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from echo.config import ConfigError
    from echo.tracking import run_name_and_tags
    from echo.train import train

    try:
        metrics = train(cfg, *run_name_and_tags(HydraConfig.get()))
    except ConfigError as error:
        print(f"echo: bad config: {error}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/exact_match", 0.0)  # what a sweeper maximises


if __name__ == "__main__":
    main()
