"""The copy-memory benchmark's data in plain torch (Hochreiter & Schmidhuber 1997; Arjovsky, Shah &
Bengio 2016, Fig. 1): remember 10 symbols over a delay of T blanks, recall them after a marker.

Ten categories: blank 0, data symbols 1-8, marker 9. The input (T+20 steps) is 10 data symbols
drawn uniformly from 1-8, T-1 blanks, the marker, 10 blanks; the target is T+10 blanks, then the
10 data symbols. A network that remembers nothing predicts blanks and then guesses uniformly among
the 8 symbols: its cross-entropy over all T+20 positions is 10 ln 8 / (T+20), the baseline.
"""

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
    """Steps of one sequence, input and target alike: T + 20."""
    return delay + 2 * RECALL


def memoryless_loss(delay: int) -> float:
    """The baseline: the cross-entropy per position, over all T+20 positions, of the best network
    that remembers nothing (blanks certain, then 1/8 for each symbol): 10 ln 8 / (T+20)."""
    return RECALL * math.log(N_SYMBOLS) / sequence_length(delay)


def copy_memory(n_seq: int, delay: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """`n_seq` copy-memory sequences with delay T: inputs and targets, both (n_seq, T+20) token ids,
    the data symbols drawn from `generator` (on its device)."""
    device = generator.device if generator is not None else None
    data = torch.randint(1, N_SYMBOLS + 1, (n_seq, RECALL), generator=generator, device=device)
    x = torch.full((n_seq, sequence_length(delay)), BLANK, dtype=torch.long, device=device)
    y = torch.full_like(x, BLANK)
    x[:, :RECALL] = data
    x[:, RECALL + delay - 1] = MARKER
    y[:, -RECALL:] = data
    return x, y
