"""Length generalisation: test every window length of `task.test_lengths` on its own held-out windows,
scored as the Chomsky-hierarchy suite does (docs/length-generalisation.md)."""

from __future__ import annotations

from statistics import mean

import torch

BY_LENGTH = (  # MLflow step = window length
    "test/token_acc_by_length",
    "test/exact_match_by_length",
    "test/prefix_acc_by_length",
)


@torch.no_grad()
def evaluate_lengths(module, data, lengths: tuple[int, int]) -> dict[int, tuple[float, float, float]]:
    """{L: (token accuracy, exact match, prefix accuracy)} for every L in `lengths` (both included), each
    on the data's fixed test windows of that length, evaluated as the model was trained."""
    module.eval()
    scores = {}
    for n in range(lengths[0], lengths[1] + 1):
        sums = module.eval_sums(data.eval_batches(*data.length_test_set(n)))[0][:, 0].tolist()
        _, correct, tokens, exact, rows, before_error, _ = sums
        scores[n] = (correct / tokens, exact / rows, before_error / tokens)
    return scores


def length_scores(by_length: dict[int, tuple[float, ...]], trained: tuple[int, int]) -> dict[str, float]:
    """`test/ood_*`: the means over the tested lengths above the `trained` range (none if none is), and
    `test/iid_exact_match`: the mean over those inside it. Lengths below it count in neither."""
    lo, hi = trained
    ood = [by_length[n] for n in sorted(by_length) if n > hi]
    iid = [by_length[n] for n in sorted(by_length) if lo <= n <= hi]
    summary = {}
    if ood:
        summary["test/ood_exact_match"] = mean(scores[1] for scores in ood)
        summary["test/ood_token_acc"] = mean(scores[0] for scores in ood)
        if all(len(scores) > 2 for scores in ood):
            summary["test/ood_prefix_acc"] = mean(scores[2] for scores in ood)
    if iid:
        summary["test/iid_exact_match"] = mean(scores[1] for scores in iid)
    return summary


def length_rows(by_length: dict[int, tuple[float, ...]]) -> list[tuple[str, int, float]]:
    """(metric, step = length, value) rows of the BY_LENGTH metrics."""
    return [(name, n, value) for n, values in sorted(by_length.items()) for name, value in zip(BY_LENGTH, values)]
