"""The tutorial's data: random sequences, one-hot codes, and its `to_supervised` framing."""

import pytest
import torch

from echo.data import generate_sequences, to_batches, to_windows
from echo.encoding import PAD, one_hot_decode, one_hot_encode

TUTORIAL_SEQUENCE = [86, 81, 88, 1, 23, 78, 64, 7, 99, 23, 2, 36, 73, 26, 27, 33, 24, 51, 73, 64, 13, 13, 53, 40, 64]


def tutorial_to_supervised(sequence: list[int], n_in: int, n_out: int) -> tuple[list, list]:
    """The tutorial's pandas framing (shift, concat, dropna), on integers instead of codes."""
    pandas = pytest.importorskip("pandas")
    df = pandas.DataFrame(sequence)
    df = pandas.concat([df.shift(n_in - i - 1) for i in range(n_in)], axis=1).dropna()
    values = df.values.astype(int)
    return values.tolist(), values[:, :n_out].tolist()


def test_windows_keep_the_oldest_n_out_items():
    x, y = to_windows(torch.tensor([TUTORIAL_SEQUENCE]), n_in=5, n_out=3)
    assert x.shape == (1, 21, 5) and y.shape == (1, 21, 3)
    assert x[0, 0].tolist() == [86, 81, 88, 1, 23]
    assert y[0, 0].tolist() == [86, 81, 88]
    assert (x[0, -1].tolist(), y[0, -1].tolist()) == ([13, 13, 53, 40, 64], [13, 13, 53])


@pytest.mark.parametrize(("n_in", "n_out"), [(5, 5), (5, 3), (5, 2), (5, 1), (1, 1), (25, 10), (8, 4)])
def test_windows_equal_the_tutorials_pandas_framing(n_in, n_out):
    seqs = generate_sequences(3, 25, 100, torch.Generator().manual_seed(n_in * 10 + n_out))
    x, y = to_windows(seqs, n_in, n_out)
    for i, seq in enumerate(seqs.tolist()):
        want_x, want_y = tutorial_to_supervised(seq, n_in, n_out)
        assert x[i].tolist() == want_x
        assert y[i].tolist() == want_y


def test_masked_framing_keeps_rows_with_missing_history_padded():
    x, y = to_windows(torch.tensor([TUTORIAL_SEQUENCE]), n_in=5, n_out=2, framing="mask")
    assert x.shape == (1, 25, 5)
    assert x[0, 0].tolist() == [PAD, PAD, PAD, PAD, 86]
    assert y[0, 0].tolist() == [PAD, PAD]
    assert y[0, 3].tolist() == [PAD, 86]
    assert x[0, 4:].tolist() == to_windows(torch.tensor([TUTORIAL_SEQUENCE]), 5, 2)[0][0].tolist()


def test_one_hot_round_trip():
    seqs = generate_sequences(4, 25, 100, torch.Generator().manual_seed(0))
    codes = one_hot_encode(seqs, 100)
    assert codes.shape == (4, 25, 100)
    assert codes.sum(-1).eq(1).all()
    assert one_hot_decode(codes).equal(seqs)
    assert one_hot_encode(torch.tensor([PAD, 3]), 5).tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]


def test_sequences_are_uniform_over_the_range():
    seqs = generate_sequences(400, 25, 100, torch.Generator().manual_seed(1))
    assert seqs.min() == 0 and seqs.max() == 99
    counts = torch.bincount(seqs.flatten(), minlength=100).float()
    assert counts.std() / counts.mean() < 0.15  # 100 draws per value on average


def test_stateful_batches_continue_each_row_from_the_previous_batch():
    seqs = generate_sequences(2, 25, 100, torch.Generator().manual_seed(2))
    x, y = to_windows(seqs, 5, 5)
    batches = to_batches(x, y, batch_size=7, stateful=True)
    assert len(batches) == 3 and batches[0][0].shape == (14, 5)
    # row i of batch b is window 7*b + i of sequence 0 (rows 0..6) or 1 (rows 7..13)
    for b, (bx, _) in enumerate(batches):
        assert bx[:7].tolist() == x[0, 7 * b : 7 * b + 7].tolist()
        assert bx[7:].tolist() == x[1, 7 * b : 7 * b + 7].tolist()
