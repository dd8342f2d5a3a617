"""The echo problem's data: random sequences, supervised windows, batches, and the loaders that
hand one Lightning step its tutorial epochs (several in a row: `echo.policy.epochs_per_step`).

Everything is vectorised in torch and can be generated directly on the training device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from echo.memory import copy_memory
from echo.task import length_range, length_seed, windows_per_sequence
from echo.windows import Draw, generate_sequences, to_batches, to_windows


def _fixed(batches: list[tuple[Tensor, Tensor]]) -> Draw:
    """A draw that always gives the same (held-out) batches."""
    return Draw(lambda: batches)


class Epochs:
    """A data loader with one item per Lightning epoch: a `Draw`, the step's source of batches.

    The tutorial's epoch is one `fit()` on one fresh sequence: a few batches, an update after
    each, LSTM state carried between them. The LightningModule trains `epochs_per_step` such
    epochs in one step (`echo.policy.epochs_per_step`: every tutorial epoch up to the next
    validation, checkpoint or the run's end), calling the `Draw` once for each, so Lightning's
    per-step bookkeeping is paid once per several epochs, not once per batch.
    A held-out set of several window lengths is one `Draw` per length (state reset between them).
    """

    def __init__(self, *draws: Draw):
        self.draws = draws

    def __len__(self) -> int:
        return len(self.draws)

    def __iter__(self):
        yield from self.draws


def held_out(task, n_seq: int, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """A fixed set of windows from `n_seq` fresh sequences drawn with their own seed (on the CPU, then moved)."""
    seqs = generate_sequences(n_seq, task.length, task.n_unique, torch.Generator().manual_seed(seed))
    return frame(task, seqs.to(device), task.n_in, task.n_out)


def frame(task, seqs: Tensor, n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
    """`to_windows` as the task frames them (task.framing, task.reverse_input, task.reverse_target)."""
    options = {key: bool(_get(task, key)) for key in ("reverse_input", "reverse_target")}
    return to_windows(seqs, n_in, n_out, task.framing, **options)


def _get(task, key: str):
    return task.get(key) if hasattr(task, "get") else getattr(task, key, None)


def at_length(task, n: int) -> SimpleNamespace:
    """The task with whole windows of length `n` (n_in = n_out = n) framed from sequences just long
    enough to give as many windows each as the task's own (`n` + task.length - task.n_in items), so
    that every length trains in the same batches and a stateful batch size divides every length's windows."""
    plain = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else vars(task)
    return SimpleNamespace(**{**plain, "n_in": n, "n_out": n, "length": n + windows_per_sequence(task) - 1})


def held_out_at_length(task, n: int, windows: int, seed: int, device: torch.device | str = "cpu"):
    """At least `windows` fixed windows of length `n` (whole-window echoes), seeded by `seed` and `n`."""
    return held_out(at_length(task, n), sequences_for(task, windows), length_seed(seed, n), device)


def sequences_for(task, windows: int) -> int:
    """Sequences enough for at least `windows` windows."""
    return -(-windows // windows_per_sequence(task))


def eval_batches(x: Tensor, y: Tensor, batch_size: int, stateful: bool) -> list[tuple[Tensor, Tensor]]:
    """Stateful models are evaluated as they were trained, batch by batch with state carried;
    stateless ones see every window at once."""
    return to_batches(x, y, batch_size if stateful else x.shape[-2], stateful)


class EchoData(pl.LightningDataModule):
    """Fresh training sequences every tutorial epoch; fixed validation and test windows.

    `task` holds length, n_unique, n_in, n_out, framing, sequences_per_epoch, and the
    held-out sets' size (eval_windows) and seeds. Data is generated on the trainer's device.

    With `task.train_lengths=[lo,hi]` each epoch draws one window length L from lo..hi (from a
    generator of its own, seeded with `seed`) and echoes whole windows of L (`at_length`); the
    validation and test sets then hold equal shares of windows of every trained length, each
    length its own fixed windows (seeds from val_seed and test_seed and L), one `Draw` per length.
    """

    def __init__(self, task, batch_size: int, stateful: bool, seed: int):
        super().__init__()
        if isinstance(task, DictConfig):  # plain attributes: read every epoch, and DictConfig is slow
            task = SimpleNamespace(**OmegaConf.to_container(task, resolve=True))
        self.task, self.batch_size, self.stateful, self.seed = task, batch_size, stateful, seed

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.eval_device = device
        self.train_generator = torch.Generator(device).manual_seed(self.seed)
        self.train_lengths = length_range(self.task, "train_lengths")
        if self.train_lengths is None:
            n_seq = sequences_for(self.task, self.task.eval_windows)
            self.val = held_out(self.task, n_seq, self.task.val_seed, device)
            self.test = held_out(self.task, n_seq, self.task.test_seed, device)
            self.val_sets, self.test_sets = [self.val], [self.test]
            return
        self.length_generator = torch.Generator().manual_seed(self.seed)  # on the host: L sets shapes
        lo, hi = self.train_lengths
        share = -(-self.task.eval_windows // (hi - lo + 1))
        lengths = range(lo, hi + 1)
        self.val_sets = [held_out_at_length(self.task, n, share, self.task.val_seed, device) for n in lengths]
        self.test_sets = [held_out_at_length(self.task, n, share, self.task.test_seed, device) for n in lengths]

    def train_dataloader(self) -> Epochs:
        return Epochs(Draw(self.fresh_batches, generators=(self.train_generator,)))

    def fresh_batches(self) -> list[tuple[Tensor, Tensor]]:
        """One epoch: `sequences_per_epoch` fresh sequences, framed and batched; with train_lengths,
        whole windows of one length drawn for the epoch."""
        t = self.task
        if self.train_lengths is None:
            length, n_in, n_out = t.length, t.n_in, t.n_out
        else:
            lo, hi = self.train_lengths
            n_in = n_out = int(torch.randint(lo, hi + 1, (1,), generator=self.length_generator))
            length = n_in + windows_per_sequence(t) - 1
        seqs = generate_sequences(t.sequences_per_epoch, length, t.n_unique, self.train_generator)
        x, y = frame(t, seqs, n_in, n_out)
        return to_batches(x, y, self.batch_size, self.stateful)

    def val_dataloader(self) -> Epochs:
        return self._held_out_loader(self.val_sets)

    def test_dataloader(self) -> Epochs:
        return self._held_out_loader(self.test_sets)

    def _held_out_loader(self, sets: list[tuple[Tensor, Tensor]]) -> Epochs:
        return Epochs(*(_fixed(self.eval_batches(x, y)) for x, y in sets))

    def length_test_set(self, n: int) -> tuple[Tensor, Tensor]:
        """The fixed test windows of length `n` (task.test_lengths): at least task.eval_windows of
        them, seeded by task.test_seed and `n`, whatever the run's own seed."""
        return held_out_at_length(self.task, n, self.task.eval_windows, self.task.test_seed, self.eval_device)

    def eval_batches(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        return eval_batches(x, y, self.batch_size, self.stateful)


class CopyMemoryData(pl.LightningDataModule):
    """Copy memory (echo/memory.py): every epoch one batch of `batch_size` fresh sequences from the
    run's generator (seeded with `seed`, as EchoData's); fixed validation and test sets of
    task.eval_windows sequences each, from task.val_seed and task.test_seed. Generated on the
    trainer's device; a held-out set is one batch."""

    def __init__(self, task, batch_size: int, seed: int):
        super().__init__()
        self.delay, self.eval_windows = int(task.delay), int(task.eval_windows)
        self.val_seed, self.test_seed = int(task.val_seed), int(task.test_seed)
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
        self.train_generator = torch.Generator(device).manual_seed(self.seed)
        self.val, self.test = (self.held_out(seed, device) for seed in (self.val_seed, self.test_seed))

    def held_out(self, seed: int, device: torch.device | str = "cpu", n: int | None = None) -> tuple[Tensor, Tensor]:
        """`n` (default task.eval_windows) fixed sequences drawn with their own seed (on the CPU, then moved)."""
        x, y = copy_memory(n or self.eval_windows, self.delay, torch.Generator().manual_seed(seed))
        return x.to(device), y.to(device)

    def fresh_batches(self) -> list[tuple[Tensor, Tensor]]:
        return [copy_memory(self.batch_size, self.delay, self.train_generator)]

    def train_dataloader(self) -> Epochs:
        return Epochs(Draw(self.fresh_batches, generators=(self.train_generator,)))

    def val_dataloader(self) -> Epochs:
        return Epochs(_fixed(self.eval_batches(*self.val)))

    def test_dataloader(self) -> Epochs:
        return Epochs(_fixed(self.eval_batches(*self.test)))

    def eval_batches(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every held-out sequence at once (stateless)."""
        return [(x, y)]


class PopulationData(pl.LightningDataModule):
    """A population's data (echo/population.py): each member's as its `EchoData` would be, member k's
    on the member axis k. Its training sequences come from its own generator, seeded with its seed;
    the held-out sets are the same for every member (task.val_seed, task.test_seed). Built on
    `device` at once, so that a member's generator can be restored before training."""

    def __init__(self, task, seeds: list[int], batch_size: int, stateful: bool, device: torch.device):
        super().__init__()
        if isinstance(task, DictConfig):  # plain attributes: read every epoch, and DictConfig is slow
            task = SimpleNamespace(**OmegaConf.to_container(task, resolve=True))
        self.task, self.batch_size, self.stateful, self.device = task, batch_size, stateful, device
        self.generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
        self.draw = Draw(self.fresh_batches, tuple(self.generators))
        n_seq = sequences_for(task, task.eval_windows)
        self.val, self.test = (  # the same sets for every member: drawn once
            self.eval_batches(*(t.expand(len(seeds), *t.shape) for t in held_out(task, n_seq, seed, device)))
            for seed in (task.val_seed, task.test_seed)
        )

    def train_dataloader(self) -> Epochs:
        return Epochs(self.draw)

    def held_out(self, n_seq: int, seeds: list[int]) -> tuple[Tensor, Tensor]:
        """`held_out` for each member, member k's drawn with seeds[k]."""
        xs, ys = zip(*(held_out(self.task, n_seq, seed, self.device) for seed in seeds))
        return torch.stack(xs), torch.stack(ys)

    def eval_batches(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        return eval_batches(x, y, self.batch_size, self.stateful)

    def fresh_batches(self) -> list[tuple[Tensor, Tensor]]:
        """One epoch: each member's `sequences_per_epoch` fresh sequences from its own generator,
        framed and batched as `EchoData.fresh_batches` does."""
        t = self.task
        seqs = [generate_sequences(t.sequences_per_epoch, t.length, t.n_unique, g) for g in self.generators]
        x, y = frame(t, torch.cat(seqs), t.n_in, t.n_out)
        members = len(seqs), t.sequences_per_epoch
        return to_batches(x.unflatten(0, members), y.unflatten(0, members), self.batch_size, self.stateful)
