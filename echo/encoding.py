"""How integers are shown to a network and read back: one-hot (the tutorial) or linear. Imports torch
only, so a config can be checked without loading Lightning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from echo.task import is_copy_memory

PAD = -1  # token id of a missing observation (masked framing); never a target


def one_hot_encode(tokens: Tensor, n_unique: int) -> Tensor:
    """One-hot float codes, `n_unique` wide; a PAD token becomes the all-zero vector."""
    return F.one_hot(tokens + 1, n_unique + 1)[..., 1:].float()


def one_hot_decode(codes: Tensor) -> Tensor:
    return codes.argmax(-1)


class OneHot:
    """The tutorial's: one-hot inputs, class scores, cross-entropy loss, argmax decode."""

    def __init__(self, n_unique: int):
        self.n_unique = self.n_features = self.n_outputs = n_unique

    def encode(self, tokens: Tensor) -> Tensor:
        return one_hot_encode(tokens, self.n_unique)

    def loss_sum(self, outputs: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum")

    def decode(self, outputs: Tensor) -> Tensor:
        return one_hot_decode(outputs)


class LinearScale:
    """Extension 1: each integer scaled to [0, 1] (PAD: -1), one output per item, squared-error loss,
    decoded by rounding to the nearest integer in range."""

    n_features = n_outputs = 1

    def __init__(self, n_unique: int):
        self.n_unique, self.scale = n_unique, float(max(n_unique - 1, 1))

    def encode(self, tokens: Tensor) -> Tensor:
        return torch.where(tokens >= 0, tokens / self.scale, -1.0).unsqueeze(-1)

    def loss_sum(self, outputs: Tensor, y: Tensor) -> Tensor:
        error = outputs.squeeze(-1) - y / self.scale
        return (error.square() * (y != PAD)).sum()

    def decode(self, outputs: Tensor) -> Tensor:
        return (outputs.squeeze(-1) * self.scale).round().clamp(0, self.n_unique - 1).long()


REPRESENTATIONS = {"onehot": OneHot, "linear": LinearScale}


def representation(task) -> OneHot | LinearScale:
    """The representation `task` asks for; copy memory's: one-hot inputs of its 10 categories, scores for
    the 9 a target can be (never the marker)."""
    if is_copy_memory(task):
        from echo.memory import N_CLASSES, N_INPUTS

        rep = OneHot(N_INPUTS)
        rep.n_outputs = N_CLASSES
        return rep
    return REPRESENTATIONS[task.get("representation", "onehot")](task.n_unique)
