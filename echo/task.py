"""The task's geometry, read from its config node: what a sequence frames into, the window lengths a
run trains and tests, and their held-out seeds. Plain Python, for the data and the checks alike."""

from __future__ import annotations

LENGTH_SEED_STRIDE = 10_000  # a held-out set of length L has seed `seed * stride + L` (length_seed)


def is_copy_memory(task) -> bool:
    """Whether `task` (a config node or a plain namespace) is task=copy_memory."""
    name = task.get("name") if hasattr(task, "get") else getattr(task, "name", None)
    return name == "copy_memory"


def windows_per_sequence(task) -> int:
    """Windows framed from one sequence: rows with missing history are dropped or masked."""
    return task.length if task.framing == "mask" else task.length - task.n_in + 1


def length_range(task, key: str) -> tuple[int, int] | None:
    """`task.<key>` (train_lengths or test_lengths) as (lo, hi), both included; None if unset."""
    value = task.get(key) if hasattr(task, "get") else getattr(task, key, None)
    return None if value is None else (int(value[0]), int(value[1]))


def trained_lengths(task) -> tuple[int, int]:
    """The window lengths a run trains on: task.train_lengths, else the fixed task.n_in."""
    return length_range(task, "train_lengths") or (task.n_in, task.n_in)


def length_seed(seed: int, length: int) -> int:
    """The seed of the held-out windows of one length: its own, derived from the set's seed."""
    return seed * LENGTH_SEED_STRIDE + length
