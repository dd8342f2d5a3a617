"""The copy-memory benchmark's data (Hochreiter & Schmidhuber 1997; Arjovsky, Shah & Bengio 2016,
Fig. 1): input 10 data symbols, T-1 blanks, a marker, 10 blanks; target T+10 blanks, the 10 symbols
(docs/memory-benchmarks.md)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

BLANK, MARKER = 0, 9
N_SYMBOLS = 8  # data symbols 1..8
RECALL = 10  # symbols to remember, and the positions scored for accuracy (the last 10)
N_INPUTS = 10  # input categories: blank, 8 symbols, marker
N_CLASSES = 9  # output categories: blank and 8 symbols (the marker is never a target)


def sequence_length(delay: int) -> int:
    return delay + 2 * RECALL


def memoryless_loss(delay: int) -> float:
    """The baseline: cross-entropy per position of the best network that remembers nothing (blanks
    certain, then 1/8 for each symbol)."""
    return RECALL * math.log(N_SYMBOLS) / sequence_length(delay)


def copy_memory(n_seq: int, delay: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """`n_seq` sequences with delay T: inputs and targets (n_seq, T+20), drawn on `generator`'s device."""
    device = generator.device if generator is not None else None
    data = torch.randint(1, N_SYMBOLS + 1, (n_seq, RECALL), generator=generator, device=device)
    x = torch.full((n_seq, sequence_length(delay)), BLANK, dtype=torch.long, device=device)
    y = torch.full_like(x, BLANK)
    x[:, :RECALL] = data
    x[:, RECALL + delay - 1] = MARKER
    y[:, -RECALL:] = data
    return x, y
