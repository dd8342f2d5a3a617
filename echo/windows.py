"""The tutorial's framing in plain torch (no Lightning): random sequences, supervised windows,
one epoch's batches, and the `Draw` that makes them. echo/data.py builds the training loaders on
them, and echo/stacked.py a population's."""

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
    """Frame sequences as the tutorial's `to_supervised` does.

    Row t is `X = seq[t-n_in+1 .. t]` (oldest first) and `y = X[:n_out]`, the oldest `n_out`
    items of the window. `framing="drop"` drops the rows with missing history
    (`length - n_in + 1` rows); `framing="mask"` keeps them, left-padded with PAD (`length` rows).
    `reverse_input`: the network reads the window newest item first (Sutskever et al. 2014), the
    target unchanged; `reverse_target`: the target is the oldest `n_out` items newest first
    (with n_out = n_in, the whole window reversed). `[86, 81, 88, 1, 23]`, n_out 3: the target
    `[86, 81, 88]`; reversed input `[23, 1, 88, 81, 86]`; reversed target `[88, 81, 86]`.
    `seqs` is (n_seq, length); returns X (n_seq, rows, n_in) and y (n_seq, rows, n_out).
    """
    if framing == "mask":
        seqs = torch.nn.functional.pad(seqs, (n_in - 1, 0), value=PAD)
    x = seqs.unfold(1, n_in, 1)
    y = x[..., :n_out]
    if reverse_target:
        y = y.flip(-1)
    return (x.flip(-1) if reverse_input else x), y


def to_batches(x: Tensor, y: Tensor, batch_size: int, stateful: bool) -> list[tuple[Tensor, Tensor]]:
    """Split windows of shape (..., n_seq, rows, items) into the optimizer steps of one epoch; leading
    axes (a population's member axis) are kept, member k's batch b being exactly its own batch b.

    Each step holds `batch_size` windows of every sequence. Stateful: in sequence order, so
    row i of batch b+1 is the window that follows row i of batch b (Keras `stateful=True`
    with `shuffle=False`); `batch_size` must divide `rows`. Stateless: consecutive chunks of
    all windows, the last one possibly smaller.
    """
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
    """Real (non-PAD) tokens before each window's first wrong real token, (...,) over windows
    (..., n_out): Grefenstette et al.'s fine accuracy times the window's real tokens."""
    wrong = real & ~correct
    return ((~wrong).long().cumprod(-1).bool() & real).sum(-1)


class Draw:
    """The data of one training step (a Lightning step, or a population's epoch): each call gives
    the batches of one tutorial epoch, fresh sequences every call in training (the step calls it
    once per epoch it trains).

    The step draws the batches itself, so that on a GPU drawing them can be captured in the
    epoch's CUDA graph; `generators` are the random generators such a graph must register.
    (A plain object, not a collection: Lightning passes it through untouched.)
    """

    def __init__(self, make_batches: Callable[[], list[tuple[Tensor, Tensor]]], generators: tuple = ()):
        self.make_batches, self.generators = make_batches, generators

    def __call__(self) -> list[tuple[Tensor, Tensor]]:
        return self.make_batches()
