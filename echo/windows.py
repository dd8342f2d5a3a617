"""The tutorial's framing in plain torch: random sequences, supervised windows, one epoch's batches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from echo.encoding import PAD


def generate_sequences(n_seq: int, length: int, n_unique: int, generator: torch.Generator | None = None) -> Tensor:
    """`n_seq` sequences of `length` integers drawn uniformly from [0, n_unique-1]."""
    device = generator.device if generator is not None else None
    return torch.randint(0, n_unique, (n_seq, length), generator=generator, device=device)


def to_windows(
    seqs: Tensor,
    n_in: int,
    n_out: int,
    framing: str = "drop",
    reverse_input: bool = False,
    reverse_target: bool = False,
) -> tuple[Tensor, Tensor]:
    """Frame sequences (n_seq, length) as the tutorial's `to_supervised`: row t is `X = seq[t-n_in+1 .. t]`
    and `y = X[:n_out]`. "drop" drops rows with missing history, "mask" left-pads them with PAD.
    `[86, 81, 88, 1, 23]`, n_out 3: target `[86, 81, 88]`; reverse_input `[23, 1, 88, 81, 86]`
    (Sutskever et al. 2014); reverse_target `[88, 81, 86]`."""
    if framing == "mask":
        seqs = torch.nn.functional.pad(seqs, (n_in - 1, 0), value=PAD)
    x = seqs.unfold(1, n_in, 1)
    y = x[..., :n_out]
    if reverse_target:
        y = y.flip(-1)
    return (x.flip(-1) if reverse_input else x), y


def to_batches(x: Tensor, y: Tensor, batch_size: int, stateful: bool) -> list[tuple[Tensor, Tensor]]:
    """Windows (..., n_seq, rows, items) as one epoch's steps of `batch_size` windows of every sequence
    (leading axes kept). Stateful: row i of batch b+1 follows row i of batch b (Keras `stateful=True`,
    `shuffle=False`; `batch_size` divides `rows`). Stateless: consecutive chunks of all windows."""
    *lead, n_seq, rows = x.shape[:-1]
    axis = len(lead)
    if not stateful:
        flat_x, flat_y = x.reshape(*lead, n_seq * rows, -1), y.reshape(*lead, n_seq * rows, -1)
        return list(zip(flat_x.split(n_seq * batch_size, axis), flat_y.split(n_seq * batch_size, axis)))

    def interleave(t: Tensor) -> Tensor:
        steps = rows // batch_size
        t = t.reshape(*lead, n_seq, steps, batch_size, -1).transpose(axis, axis + 1)
        return t.reshape(*lead, steps, n_seq * batch_size, -1)

    return list(zip(interleave(x).unbind(axis), interleave(y).unbind(axis)))


def before_first_error(correct: Tensor, real: Tensor) -> Tensor:
    """Real tokens before each window's first wrong one: Grefenstette et al.'s fine accuracy times
    the window's real tokens."""
    wrong = real & ~correct
    return ((~wrong).long().cumprod(-1).bool() & real).sum(-1)


class Draw:
    """A training step's data: each call gives one tutorial epoch's batches. The step draws them, so a
    CUDA graph can capture the drawing (`generators`: those it must register). Not a collection:
    Lightning passes it through untouched."""

    def __init__(self, make_batches: Callable[[], list[tuple[Tensor, Tensor]]], generators: tuple = ()):
        self.make_batches, self.generators = make_batches, generators

    def __call__(self) -> list[tuple[Tensor, Tensor]]:
        return self.make_batches()
