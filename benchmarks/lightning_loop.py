"""What Lightning's own loop costs per step and per validation, on this machine, with nothing else to do.

    python benchmarks/lightning_loop.py                # 2,000 steps, three times each way
    python benchmarks/lightning_loop.py --steps 500 --repeat 5

An empty LightningModule (manual optimization, one item per epoch, as echo's steps are) is fitted with
the settings echo's Trainers use, once with Lightning's validation loop off and once with one
validation after every step. The first figure is what each of echo's steps pays Lightning (a run's
step trains several epochs, a population's every epoch up to its validation); the difference is what
each validation pays for running in Lightning's loop rather than inside the step.
"""

import argparse
import logging
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch


class Empty(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        pass

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return None

    def train_dataloader(self):
        return [0]

    def val_dataloader(self):
        return [0]


def ms_per_step(steps: int, validate: bool) -> float:
    trainer = pl.Trainer(
        max_epochs=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=1,
        limit_val_batches=None if validate else 0,
    )
    start = time.perf_counter()
    trainer.fit(Empty())
    return (time.perf_counter() - start) * 1000 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    times = {"a step": [], "a step and a validation": []}
    for _ in range(args.repeat):  # alternated, so that the machine's drift falls on both
        times["a step"].append(ms_per_step(args.steps, validate=False))
        times["a step and a validation"].append(ms_per_step(args.steps, validate=True))
    for what, each in times.items():
        print(f"{what}: {statistics.median(each):.2f} ms (each: {', '.join(f'{t:.2f}' for t in each)})")
    medians = [statistics.median(each) for each in times.values()]
    print(f"a validation in Lightning's loop: {medians[1] - medians[0]:.2f} ms")


if __name__ == "__main__":
    main()
