"""Lightning's gradient clipping and accumulation, in echo's own optimizer steps.

Echo steps its optimizers itself (manual optimization; a population's loop has no Trainer), and
Lightning refuses `gradient_clip_val` and `accumulate_grad_batches` there. So echo reads them from
`cfg.trainer` (`StepSettings.from_trainer`), keeps them from the Trainer (`ECHO_STEPS`), and single
runs and populations apply them here, as Lightning documents them: every N batches one step on the
sum of the N batches' gradients, each loss divided by N (a remainder at the end of an epoch steps
too); before the step, the gradients clipped to a total 2-norm (`torch.nn.utils.clip_grad_norm_`)
or element-wise to a value (`clip_grad_value_`). A population clips each member on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

ECHO_STEPS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")  # not for pl.Trainer


@dataclass(frozen=True)
class StepSettings:
    """How each optimizer step is taken: Lightning's clipping and accumulation settings."""

    clip_val: float | None = None  # None or 0: no clipping
    clip_algorithm: str = "norm"  # norm | value
    accumulate: int = 1  # batches per optimizer step

    @classmethod
    def from_trainer(cls, trainer_cfg) -> StepSettings:
        """The settings `trainer_cfg` (cfg.trainer, checked by echo.config) asks for."""
        clip = trainer_cfg.get("gradient_clip_val")
        return cls(
            clip_val=float(clip) if clip else None,
            clip_algorithm=str(trainer_cfg.get("gradient_clip_algorithm") or "norm"),
            accumulate=int(trainer_cfg.get("accumulate_grad_batches") or 1),
        )

    def loss_scale(self) -> float:
        """What each batch's loss is multiplied by before backward: 1/N, as Lightning divides it."""
        return 1.0 / self.accumulate

    def zero_before(self, batch: int) -> bool:
        """Whether the gradients are cleared before batch `batch` (0-based) of an epoch."""
        return batch % self.accumulate == 0

    def step_after(self, batch: int, n_batches: int) -> bool:
        """Whether the optimizer steps after batch `batch` of an epoch of `n_batches`."""
        return (batch + 1) % self.accumulate == 0 or batch + 1 == n_batches

    def clip(self, params: Iterable[Tensor], members: bool = False) -> None:
        """Clip the gradients of `params` in place; `members`: each parameter's leading axis is a
        population's member, each member clipped on its own (as it would be alone)."""
        if not self.clip_val:
            return
        if self.clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.clip_val)  # element-wise: the same with members
        elif members:
            clip_member_norms(params, self.clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.clip_val)


@torch.no_grad()
def clip_member_norms(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` for each member of stacked parameters (leading axis: the
    member): member k's gradients are scaled by min(1, max_norm / (norm_k + 1e-6)), norm_k being the
    2-norm of all its gradients (the norm of its per-parameter norms, as torch computes it). Returns
    the norms before clipping (K,). No value is read back to the host: a CUDA graph can capture it."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (params, K)
    total = torch.linalg.vector_norm(norms, dim=0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return total
