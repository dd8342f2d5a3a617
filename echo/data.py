"""The echo problem's data modules, generated on the training device: each Lightning step draws its
tutorial epochs (several in a row: `echo.policy.epochs_per_step`) itself."""

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
    return Draw(lambda: batches)


class Epochs:
    """A data loader of `Draw`s: one per Lightning epoch, or per window length of a held-out set."""

    def __init__(self, *draws: Draw):
        self.draws = draws

    def __len__(self) -> int:
        return len(self.draws)

    def __iter__(self):
        yield from self.draws


def held_out(task, n_seq: int, seed: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Fixed windows from `n_seq` sequences drawn with their own seed (on the CPU, then moved)."""
    seqs = generate_sequences(n_seq, task.length, task.n_unique, torch.Generator().manual_seed(seed))
    return frame(task, seqs.to(device), task.n_in, task.n_out)


def frame(task, seqs: Tensor, n_in: int, n_out: int) -> tuple[Tensor, Tensor]:
    """`to_windows` as the task frames them."""
    options = {key: bool(getattr(task, key, None)) for key in ("reverse_input", "reverse_target")}
    return to_windows(seqs, n_in, n_out, task.framing, **options)


def at_length(task, n: int) -> SimpleNamespace:
    """The task with whole windows of length `n`, from sequences giving as many windows as the task's
    own, so a stateful batch size divides every length's windows."""
    plain = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else vars(task)
    return SimpleNamespace(**{**plain, "n_in": n, "n_out": n, "length": n + windows_per_sequence(task) - 1})


def held_out_at_length(task, n: int, windows: int, seed: int, device: torch.device | str = "cpu"):
    """At least `windows` fixed windows of length `n`, seeded by `seed` and `n`."""
    return held_out(at_length(task, n), sequences_for(task, windows), length_seed(seed, n), device)


def sequences_for(task, windows: int) -> int:
    return -(-windows // windows_per_sequence(task))


class EchoData(pl.LightningDataModule):
    """Fresh training sequences every tutorial epoch; fixed validation and test windows. With
    `task.train_lengths`, each epoch draws a window length, and the held-out sets hold equal shares of
    every length (docs/length-generalisation.md)."""

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
        """One epoch: `sequences_per_epoch` fresh sequences, framed and batched."""
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
        """The fixed test windows of length `n` (task.test_lengths), whatever the run's seed."""
        return held_out_at_length(self.task, n, self.task.eval_windows, self.task.test_seed, self.eval_device)

    def eval_batches(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Stateful models are evaluated batch by batch, as trained; stateless ones on every window at once."""
        return to_batches(x, y, self.batch_size if self.stateful else x.shape[-2], self.stateful)


class CopyMemoryData(pl.LightningDataModule):
    """Copy memory (echo/memory.py): one batch of fresh sequences every epoch; fixed held-out sets, one
    batch each."""

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
        """`n` (default task.eval_windows) fixed sequences drawn with their own seed."""
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
        return [(x, y)]


class PopulationData(pl.LightningDataModule):
    """A population's data: member k's on member axis k, as its `EchoData`'s would be; the held-out
    sets are every member's. Built at once, so a member's generator can be restored before training."""

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

    def val_dataloader(self) -> Epochs:
        return Epochs(_fixed(self.val))

    def held_out(self, n_seq: int, seeds: list[int]) -> tuple[Tensor, Tensor]:
        """`held_out` for each member, member k's drawn with seeds[k]."""
        xs, ys = zip(*(held_out(self.task, n_seq, seed, self.device) for seed in seeds))
        return torch.stack(xs), torch.stack(ys)

    eval_batches = EchoData.eval_batches

    def fresh_batches(self) -> list[tuple[Tensor, Tensor]]:
        """One epoch: each member's fresh sequences from its own generator."""
        t = self.task
        seqs = [generate_sequences(t.sequences_per_epoch, t.length, t.n_unique, g) for g in self.generators]
        x, y = frame(t, torch.cat(seqs), t.n_in, t.n_out)
        members = len(seqs), t.sequences_per_epoch
        return to_batches(x.unflatten(0, members), y.unflatten(0, members), self.batch_size, self.stateful)
