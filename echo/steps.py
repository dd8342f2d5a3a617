"""Lightning's gradient clipping and accumulation, as Lightning documents them, in echo's own
optimizer steps: Lightning refuses them under manual optimization, so echo reads them from
`cfg.trainer` and keeps them from the Trainer (`ECHO_STEPS`). A population clips each member alone."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

ECHO_STEPS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")  # not for pl.Trainer


@dataclass(frozen=True)
class StepSettings:
    clip_val: float | None = None  # None or 0: no clipping
    clip_algorithm: str = "norm"  # norm | value
    accumulate: int = 1  # batches per optimizer step

    @classmethod
    def from_trainer(cls, trainer_cfg) -> StepSettings:
        clip = trainer_cfg.get("gradient_clip_val")
        return cls(
            clip_val=float(clip) if clip else None,
            clip_algorithm=str(trainer_cfg.get("gradient_clip_algorithm") or "norm"),
            accumulate=int(trainer_cfg.get("accumulate_grad_batches") or 1),
        )

    def loss_scale(self) -> float:
        return 1.0 / self.accumulate

    def zero_before(self, batch: int) -> bool:
        return batch % self.accumulate == 0

    def step_after(self, batch: int, n_batches: int) -> bool:
        """A remainder at the end of an epoch steps too."""
        return (batch + 1) % self.accumulate == 0 or batch + 1 == n_batches

    def clip(self, params: Iterable[Tensor], members: bool = False) -> None:
        """Clip the gradients of `params`; `members`: the leading axis is the member, each clipped alone."""
        if not self.clip_val:
            return
        if self.clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, self.clip_val)  # element-wise: the same with members
        elif members:
            clip_member_norms(params, self.clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, self.clip_val)


@torch.no_grad()
def clip_member_norms(params: Iterable[Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` for each member of stacked parameters, reading nothing back to
    the host (a CUDA graph can capture it)."""
    grads = [p.grad for p in params if p.grad is not None]
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])  # (params, K)
    total = torch.linalg.vector_norm(norms, dim=0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
