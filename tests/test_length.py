"""Length generalisation: train on windows of lengths lo..hi, test every length on its own windows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import CONF, TINY, all_runs, artifacts, csv_metrics, make_cfg, run_py
from mlflow import MlflowClient

from echo.config import VARIABLE_LENGTH, ConfigError, validate
from echo.data import EchoData
from echo.lengths import length_rows, length_scores
from echo.models import MODELS, build_net, variable_length
from echo.module import EchoModule
from echo.train import train


def data_for(*overrides: str, seed: int = 0) -> EchoData:
    cfg = make_cfg("logger=none", *overrides)
    data = EchoData(cfg.task, cfg.model.batch_size, cfg.model.stateful, seed=seed)
    data.trainer = None
    data.setup("fit")
    return data


def drawn_lengths(data: EchoData, epochs: int) -> list[int]:
    """The window length of each of `epochs` training epochs; every batch of an epoch has it."""
    lengths = []
    for _ in range(epochs):
        batches = data.fresh_batches()
        (length,) = {x.shape[-1] for x, _ in batches}
        assert all(torch.equal(x, y) for x, y in batches)  # whole-window echo: n_out = L
        assert sum(len(x) for x, _ in batches) == 21  # the task's 21 windows per sequence, at every L
        lengths.append(length)
    return lengths


def test_each_epoch_echoes_whole_windows_of_one_length_drawn_from_the_range():
    lengths = drawn_lengths(data_for("task.train_lengths=[2,6]", "model.stateful=false"), 300)
    assert set(lengths) == {2, 3, 4, 5, 6}  # every length in the range, both ends included, nothing else
    assert max(lengths.count(n) for n in range(2, 7)) < 2 * min(lengths.count(n) for n in range(2, 7))  # uniform


def test_the_drawn_lengths_repeat_with_the_seed():
    assert drawn_lengths(data_for("task.train_lengths=[1,10]"), 40) == drawn_lengths(
        data_for("task.train_lengths=[1,10]"), 40
    )
    assert drawn_lengths(data_for("task.train_lengths=[1,10]"), 40) != drawn_lengths(
        data_for("task.train_lengths=[1,10]", seed=1), 40
    )


def test_stateful_batches_keep_the_tutorial_rows_at_every_length():
    """Stateful (the listings' default): one sequence's windows in order, in batches of 7, at any L."""
    data = data_for("task.train_lengths=[3,8]")  # seq2seq: stateful batches of 7
    for _ in range(5):
        batches = data.fresh_batches()
        assert [len(x) for x, _ in batches] == [7, 7, 7]
        windows = torch.cat([x for x, _ in batches])  # in sequence order: each moves on by one item
        assert torch.equal(windows[1:, :-1], windows[:-1, 1:])


def test_per_length_test_windows_are_fixed_by_their_own_seeds():
    data = data_for("task.train_lengths=[1,4]", "task.eval_windows=500")
    other = data_for("task.train_lengths=[2,3]", "task.eval_windows=500", seed=5)  # another run, another seed
    for n in (1, 7, 30):
        x, y = data.length_test_set(n)
        assert x.shape[-1] == n and torch.equal(x, y) and x.shape[0] * x.shape[1] >= 500
        assert torch.equal(x, other.length_test_set(n)[0])  # whatever the run trained on and its seed
    assert not torch.equal(data.length_test_set(7)[0][..., :3], data.length_test_set(3)[0])  # each L its own
    moved = data_for("task.train_lengths=[1,4]", "task.eval_windows=500", "task.test_seed=7")
    assert not torch.equal(moved.length_test_set(7)[0], data.length_test_set(7)[0])  # the seed decides


def test_validation_holds_every_trained_length_in_equal_shares():
    data = data_for("task.train_lengths=[3,6]", "task.eval_windows=400")
    assert [x.shape[-1] for x, _ in data.val_sets] == [3, 4, 5, 6]
    assert {x.shape[0] * x.shape[1] for x, _ in data.val_sets} == {105}  # 100 asked, 5 sequences of 21
    assert not torch.equal(data.val_sets[0][0], data.test_sets[0][0])
    assert len(data.val_dataloader()) == 4  # one draw per length: the state resets between lengths


def test_the_ood_score_averages_exactly_the_lengths_above_the_trained_range():
    by_length = {n: (1 - n / 100, 1 - n / 10) for n in range(1, 9)}  # token acc, exact match
    scores = length_scores(by_length, trained=(2, 4))
    assert scores["test/ood_exact_match"] == pytest.approx(1 - (5 + 6 + 7 + 8) / 4 / 10)
    assert scores["test/ood_token_acc"] == pytest.approx(1 - (5 + 6 + 7 + 8) / 4 / 100)
    assert scores["test/iid_exact_match"] == pytest.approx(1 - (2 + 3 + 4) / 3 / 10)  # L=1 counts in neither
    assert set(length_scores({1: (1.0, 1.0), 3: (0.5, 0.5)}, trained=(2, 4))) == {"test/iid_exact_match"}
    assert length_rows({2: (0.5, 0.25)}) == [
        ("test/token_acc_by_length", 2, 0.5),
        ("test/exact_match_by_length", 2, 0.25),
    ]
    with_prefix = length_scores({n: (0.5, 0.25, n / 10) for n in (3, 5, 6)}, trained=(2, 4))
    assert with_prefix["test/ood_prefix_acc"] == pytest.approx(0.55)  # fine accuracy, over lengths 5 and 6
    assert length_rows({2: (0.5, 0.25, 0.375)})[-1] == ("test/prefix_acc_by_length", 2, 0.375)


@pytest.mark.parametrize("name", VARIABLE_LENGTH)
def test_a_network_built_for_one_length_echoes_any_length_when_told_n_out(name):
    sizes = dict(d_model=8, n_heads=2) if name == "transformer" else {}
    net = build_net(name, n_in=5, n_features=100, hidden_size=8, n_classes=100, n_out=5, **sizes)
    module = EchoModule(net, 100, 1e-3, stateful=False, windows_per_epoch=21)
    x = torch.randint(0, 100, (3, 9))
    assert module(x)[0].shape[:2] == (3, 5)  # n_out unsaid: the built one
    assert module(x, n_out=9)[0].shape[:2] == (3, 9)
    assert module(x[:, :2], n_out=2)[0].shape[:2] == (3, 2)


def test_the_config_checks_know_which_networks_take_any_length():
    assert set(VARIABLE_LENGTH) == {name for name in MODELS if variable_length(name)}


NETWORKS = sorted(p.stem for p in Path(CONF, "length_network").glob("*.yaml"))


@pytest.mark.parametrize("network", NETWORKS)
def test_every_network_of_the_length_study_composes_into_a_valid_config(network):
    cfg = make_cfg("experiment=study_length", f"length_network={network}")
    validate(cfg)
    assert cfg.model.name in VARIABLE_LENGTH and list(cfg.task.train_lengths) == [1, 10]


def test_the_length_study_sweeps_every_network_preset():
    cfg = make_cfg("experiment=study_length")  # the sweep's settings are in the preset's hydra node
    preset = Path(CONF, "experiment", "study_length.yaml").read_text()
    (line,) = [line for line in preset.splitlines() if line.strip().startswith("length_network:")]
    assert sorted(line.split(":", 1)[1].strip().split(",")) == NETWORKS
    assert cfg.logger.experiment == "study_length"


REFUSED = {
    ("model=many_to_one", "task.train_lengths=[1,10]"): "model=many_to_one is built for one window length",
    ("model=one_to_one", "task.test_lengths=[1,10]"): "model=one_to_one is built for one window length",
    ("task.train_lengths=[0,10]",): "task.train_lengths=[0, 10] must be [lo,hi] with 1 <= lo <= hi or null",
    ("task.train_lengths=[6,3]",): "task.train_lengths=[6, 3] must be [lo,hi] with 1 <= lo <= hi or null",
    ("task.test_lengths=[1,2,3]",): "task.test_lengths=[1, 2, 3] must be [lo,hi] with 1 <= lo <= hi or null",
    ("task.train_lengths=7",): "task.train_lengths=7 must be [lo,hi] with 1 <= lo <= hi or null",
    ("task.framing=mask", "model.batch_size=5", "task.train_lengths=[1,5]"): "task.framing=mask cannot be combined",
    ("task=partial", "task.test_lengths=[1,8]"): "this run trains a partial one (task.n_out=2 < task.n_in=5)",
    ("model=transformer", "model.positional=learned", "task.test_lengths=[1,80]"): (
        "model.max_len=64 is shorter than the longest window (80)"
    ),
    ("model=attention", "task.train_lengths=[1,70]"): "model.max_len=64 is shorter than the longest window (70)",
}


@pytest.mark.parametrize("overrides", list(REFUSED), ids=" ".join)
def test_combinations_that_cannot_work_are_refused_with_one_line(overrides):
    with pytest.raises(ConfigError, match=re.escape(REFUSED[overrides])):
        validate(make_cfg(*overrides))


def test_run_py_refuses_a_fixed_length_network_before_tracking_anything(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py("model=many_to_one", "task.train_lengths=[1,10]", cwd=tmp_path, uri=uri)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("echo: bad config: model=many_to_one is built for one window length")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_a_variable_length_run_logs_every_tested_length_and_the_plot(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lengths = ["task.train_lengths=[1,3]", "task.test_lengths=[2,6]", "task.eval_windows=84"]
    result = run_py(*TINY, "model.hidden_size=8", *lengths, cwd=tmp_path, uri=uri)
    assert result.returncode == 0, result.stderr
    (run,) = all_runs(uri)
    client = MlflowClient(uri)
    for name in ("test/exact_match_by_length", "test/token_acc_by_length"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == [2, 3, 4, 5, 6]
    by_length = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/exact_match_by_length")}
    metrics = run.data.metrics
    assert metrics["test/ood_exact_match"] == pytest.approx((by_length[4] + by_length[5] + by_length[6]) / 3)
    assert metrics["test/iid_exact_match"] == pytest.approx((by_length[2] + by_length[3]) / 2)
    assert {"test/ood_token_acc", "test/exact_match", "val/exact_match"} <= set(metrics)
    assert "length_generalisation.png" in artifacts(uri, run.info.run_id)
    assert "test/ood_exact_match" in result.stdout


@pytest.mark.slow
def test_the_encoder_decoder_trains_on_lengths_and_tests_others(store):
    summary = train(
        make_cfg(
            "model=encdec",
            "model.hidden_size=16",
            "trainer.max_epochs=10",
            "task.sequences_per_epoch=1",
            "task.train_lengths=[2,4]",
            "task.test_lengths=[1,5]",
            "task.eval_windows=42",
        )
    )
    assert {"test/ood_exact_match", "test/ood_token_acc", "test/iid_exact_match"} <= set(summary)
    (run,) = all_runs(store)
    steps = [m.step for m in MlflowClient(store).get_metric_history(run.info.run_id, "test/token_acc_by_length")]
    assert sorted(steps) == [1, 2, 3, 4, 5]


def test_testing_lengths_after_fixed_length_training_counts_the_fixed_length_as_trained():
    summary = train(make_cfg("logger=none", "trainer.max_epochs=10", "task.test_lengths=[4,6]", "task.eval_windows=42"))
    assert {"test/ood_exact_match", "test/iid_exact_match"} <= set(summary)  # trained on 5: 4 is neither


# Recorded with the code before task.train_lengths existed (same machine, threads=1): a run without
# it must train exactly as before.
BEFORE = {
    ("task.sequences_per_epoch=4", "model.lr=1e-2"): (
        [4.598551, 4.587659, 4.580462, 4.560873, 4.557772, 4.516448, 4.474683, 4.511164, 4.452797, 4.397087],
        {"val/token_acc": 0.167262, "test/token_acc": 0.174206},
    ),
    ("model=encdec", "task=partial", "model.hidden_size=30", "task.sequences_per_epoch=2"): (
        [4.603652, 4.598152, 4.605196, 4.602505, 4.600676, 4.609977, 4.587587, 4.608238, 4.608147, 4.614158],
        {"val/token_acc": 0.006944, "test/token_acc": 0.013889},
    ),
}


@pytest.mark.parametrize("overrides", list(BEFORE), ids=" ".join)
def test_runs_without_train_lengths_train_exactly_as_before(overrides, tmp_path):
    settings = ["logger=csv", f"logger.save_dir={tmp_path}", "threads=1", "trainer.max_epochs=10"]
    summary = train(make_cfg(*settings, "trainer.check_val_every_n_epoch=5", *overrides))
    losses = [value for _, value in csv_metrics(tmp_path, "train/loss")]
    expected_losses, expected = BEFORE[overrides]
    assert losses == pytest.approx(expected_losses, abs=2e-6)
    assert {k: summary[k] for k in expected} == pytest.approx(expected, abs=2e-6)


@pytest.mark.slow
def test_the_per_step_network_echoes_lengths_it_never_saw(store):
    """The issue's check: seq2seq trained on 1..10 echoes 11..20 (it only copies its current input)."""
    summary = train(make_cfg("task.train_lengths=[1,10]", "task.test_lengths=[1,20]", "threads=1"))
    assert summary["test/ood_exact_match"] >= 0.95
