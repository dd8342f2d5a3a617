"""What goes wrong in a run, said clearly: divergence (NaN/inf loss), errors, interrupts."""

from __future__ import annotations

import math


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. its loss diverged); the message says why and what to try."""


def check_finite(rows: list[tuple[str, int, float]], lr: float) -> None:
    """Raise TrainingError for the earliest loss among (name, epoch, value) rows that is not finite
    (at one epoch, the training loss first)."""
    for name, epoch, value in sorted(rows, key=lambda row: (row[1], not row[0].startswith("train"))):
        if name.endswith("loss") and not math.isfinite(value):
            raise TrainingError(
                f"{name} became {value} at epoch {epoch}: training diverged; "
                f"lower the learning rate (model.lr={lr}) or change the seed"
            )


def interrupted(error: BaseException) -> bool:
    """Ctrl-C or SIGTERM, including Lightning's `sys.exit(1)` after a KeyboardInterrupt, or an exit asked
    for mid-run (submitit's `sys.exit(-1)` after it requeued a SLURM job at its time limit)."""
    return isinstance(error, (KeyboardInterrupt, SystemExit))
