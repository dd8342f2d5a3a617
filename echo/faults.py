"""What goes wrong in a run, said clearly: divergence (NaN/inf loss), errors, interrupts."""

from __future__ import annotations

import math

import pytorch_lightning as pl


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. its loss diverged); the message says why and what to try."""


class NonFiniteGuard(pl.Callback):
    """Stops a run whose loss became NaN or infinite, checked at each validation and at the end.

    It reads the metrics the module already brings back to the host at validation time, so it
    costs no device-to-host sync per step.
    """

    def __init__(self, lr: float):
        self.lr, self._checked = lr, 0

    def check(self, module) -> None:
        module.flush_train_metrics()
        new = sorted(module.history[self._checked :], key=lambda row: (row[1], not row[0].startswith("train")))
        for name, epoch, value in new:  # the earliest epoch first, and there the training loss
            if name.endswith("loss") and not math.isfinite(value):
                raise TrainingError(
                    f"{name} became {value} at epoch {epoch}: training diverged; "
                    f"lower the learning rate (model.lr={self.lr}) or change the seed"
                )
        self._checked = len(module.history)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self.check(module)

    def on_train_end(self, trainer, module) -> None:
        self.check(module)


def interrupted(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, including Lightning's `sys.exit(1)` after a KeyboardInterrupt, or an exit asked
    for mid-run (submitit's `sys.exit(-1)` after it requeued a SLURM job at its time limit)."""
    return isinstance(error, (KeyboardInterrupt, SystemExit))
