"""The tutorial's extensions: linear representation, masking, topologies, stateless batch 1,
longer echoes. Tiny configs, a few CPU-seconds each."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from helpers import CONF, make_cfg
from hydra import compose, initialize_config_dir

from echo.config import ConfigError, validate
from echo.data import EchoData, to_windows
from echo.encoding import PAD, LinearScale, OneHot
from echo.models import EncoderDecoder, ManyToOne, OneToOne, Seq2Seq, build_net, masked_lstm
from echo.module import EchoModule
from echo.task import windows_per_sequence
from echo.train import train

# Untracked, a small held-out set, a validation every 5 epochs, every epoch trained.
UNTRACKED_SHORT = ["logger=none", "task.eval_windows=84", "trainer.check_val_every_n_epoch=5", "stop_at=null"]
METRICS = {"val/loss", "val/token_acc", "val/exact_match", "test/token_acc", "test/exact_match"}


def assert_ran_every_epoch(metrics: dict, epochs: int) -> None:
    """The run trained `epochs` epochs and reported every metric, all finite."""
    assert metrics["epochs"] == epochs
    assert set(metrics) >= METRICS and all(math.isfinite(metrics[name]) for name in METRICS)


# -- linear representation ------------------------------------------------------------------
def test_linear_representation_scales_to_unit_interval_and_decodes_by_rounding():
    rep = LinearScale(n_unique=100)
    tokens = torch.tensor([[0, 99, 50, PAD]])
    assert rep.encode(tokens).squeeze(-1)[0].tolist() == pytest.approx([0.0, 1.0, 50 / 99, -1.0])
    outputs = torch.tensor([[0.0, 1.0, 50.4 / 99, 50.6 / 99, -0.3, 1.7]]).unsqueeze(-1)
    assert rep.decode(outputs).tolist() == [[0, 99, 50, 51, 0, 99]]


def test_linear_loss_is_squared_error_on_real_targets_only():
    rep = LinearScale(n_unique=11)  # scale 10
    outputs = torch.tensor([[0.5, 0.0, 123.0]]).unsqueeze(-1)
    y = torch.tensor([[3, 0, PAD]])
    assert rep.loss_sum(outputs, y).item() == pytest.approx(0.2**2)


def test_linear_metrics_count_predictions_that_round_to_the_target():
    net = Seq2Seq(1, 3, 1, 2)
    module = EchoModule(net, 100, 1e-3, stateful=False, windows_per_epoch=1, representation=LinearScale(100))
    y = torch.tensor([[10, 20], [PAD, 30]])
    off_by = torch.tensor([[0.4, -0.4], [50.0, 0.6]])  # in integer units: rounds right, right; PAD; wrong
    outputs = ((y.clamp(min=0) + off_by) / 99).unsqueeze(-1)
    _, correct, tokens, exact, rows, _, _ = module._counts(outputs[None], y[None])[0][:, 0]
    assert (correct.item(), tokens.item(), exact.item(), rows.item()) == (2, 3, 1, 2)


def test_linear_representation_learns_a_bit():
    cfg = make_cfg(*UNTRACKED_SHORT, "task.representation=linear", "model.lr=1e-2", "trainer.max_epochs=60")
    metrics = train(cfg)
    assert set(metrics) >= {"val/loss", "val/token_acc", "val/exact_match", "test/token_acc", "test/exact_match"}
    assert metrics["val/loss"] < 0.01  # always predicting the mean (0.5) would score ~0.085
    assert metrics["test/token_acc"] > 0.1  # chance is 0.01


# -- masking ------------------------------------------------------------------------------
def test_masked_framing_keeps_25_rows_per_sequence_the_first_ones_padded():
    x, _ = to_windows(torch.arange(25).unsqueeze(0), 5, 5, "mask")
    assert x.shape[1] == 25
    assert x[0, 0].tolist() == [PAD, PAD, PAD, PAD, 0] and x[0, 4].tolist() == [0, 1, 2, 3, 4]
    cfg = make_cfg("task.framing=mask", "model.batch_size=5")
    assert windows_per_sequence(cfg.task) == 25
    data = EchoData(cfg.task, 5, True, seed=0)
    data.trainer = None
    data.setup("fit")
    assert [x.shape for x, _ in data.fresh_batches()] == [(5, 5)] * 5  # 25 rows in stateful batches of 5


def test_a_masked_run_trains_every_epoch_and_reports_every_metric():
    metrics = train(make_cfg(*UNTRACKED_SHORT, "task.framing=mask", "model.batch_size=5", "trainer.max_epochs=5"))
    assert_ran_every_epoch(metrics, 5)


def test_masked_lstm_state_does_not_change_on_masked_steps():
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    h, (h_n, c_n) = masked_lstm(lstm, x, None, mask)
    # row 0 equals running only its 3 real steps from zeros; row 1 equals the plain LSTM
    h_real, (h_real_n, _) = lstm(x[:1, 2:])
    torch.testing.assert_close(h[0, 2:], h_real[0])
    torch.testing.assert_close(h_n[:, 0], h_real_n[:, 0])
    assert h[0, :2].abs().sum() == 0  # masked steps keep the (zero) state
    h_plain, (h_plain_n, c_plain_n) = lstm(x[1:])
    torch.testing.assert_close(h[1], h_plain[0])
    torch.testing.assert_close(c_n[:, 1], c_plain_n[:, 0])


def test_masked_inputs_do_not_reach_the_network():
    """With masking, what a padded position holds cannot change any real output."""
    torch.manual_seed(0)
    net = EncoderDecoder(n_features=10, hidden_size=8, n_classes=10, n_out=2)
    module = EchoModule(net, n_unique=10, lr=1e-3, stateful=False, windows_per_epoch=1, mask_inputs=True)
    x = torch.tensor([[PAD, PAD, 3, 4, 5]])
    garbage = x.clone()
    garbage[0, :2] = 7
    masked_out, _ = module(x)
    # feed the garbage one-hot codes but keep the same mask: the result must not move
    out_with_garbage, _ = net(module.rep.encode(garbage), None, mask=x != PAD)
    torch.testing.assert_close(masked_out, out_with_garbage)


def test_padded_targets_never_count_in_loss_or_metrics():
    module = EchoModule(Seq2Seq(4, 3, 4, 2), n_unique=4, lr=1e-3, stateful=False, windows_per_epoch=1)
    y = torch.tensor([[PAD, PAD], [PAD, 2], [1, 2]])
    logits = torch.full((3, 2, 4), -10.0)
    logits[2, 0, 1] = logits[2, 1, 2] = logits[1, 1, 2] = 10.0  # real tokens all right
    logits[0, :, 3] = logits[1, 0, 3] = 50.0  # padded positions "wrong" with huge scores
    loss, correct, tokens, exact, rows, before_error, _ = module._counts(logits[None], y[None])[0][:, 0]
    assert (correct.item(), tokens.item()) == (3, 3)
    assert (exact.item(), rows.item()) == (2, 2)  # the all-PAD row is no row
    assert before_error.item() == 3  # padded positions are never an error before the first real one
    assert loss.item() < 1e-3
    lin = LinearScale(4)
    assert (
        lin.loss_sum(torch.full((3, 2, 1), 99.0) * (y == PAD).unsqueeze(-1), y.clamp(min=0) * 0 + (y == PAD) * PAD) == 0
    )


def test_one_to_one_cannot_mask():
    with pytest.raises(ConfigError, match="cannot mask"):
        validate(make_cfg("model=one_to_one", "task.framing=mask"))


def test_unknown_representation_is_one_clear_line():
    with pytest.raises(ConfigError, match="task.representation='words' is unknown"):
        validate(make_cfg("task.representation=words"))


# -- topologies ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["seq2seq", "encdec", "one_to_one", "many_to_one"])
@pytest.mark.parametrize(
    ("n_in", "n_out", "n_features", "n_classes"), [(5, 5, 100, 100), (5, 2, 100, 100), (7, 3, 1, 1)]
)
def test_every_topology_maps_windows_to_n_out_scores(name, n_in, n_out, n_features, n_classes):
    net = build_net(name, n_in=n_in, n_features=n_features, hidden_size=6, n_classes=n_classes, n_out=n_out)
    scores, state = net(torch.randn(4, n_in, n_features))
    assert scores.shape == (4, n_out, n_classes)
    again, _ = net(torch.randn(4, n_in, n_features), state)  # a carried state is accepted back
    assert again.shape == scores.shape


def test_topologies_are_what_they_say():
    one = OneToOne(n_in=5, n_features=100, hidden_size=6, n_classes=100, n_out=2)
    assert one.lstm.input_size == 500 and one.head.out_features == 200  # one step of the whole window
    many = ManyToOne(n_features=100, hidden_size=6, n_classes=100, n_out=2)
    assert many.lstm.input_size == 100 and many.head.out_features == 200  # one vector from the last state


@pytest.mark.parametrize("name", ["one_to_one", "many_to_one"])
def test_alternate_topologies_run_every_epoch_from_the_cli_config(name):
    metrics = train(make_cfg(*UNTRACKED_SHORT, f"model={name}", "trainer.max_epochs=5"))
    assert_ran_every_epoch(metrics, 5)


# -- stateless batch 1 --------------------------------------------------------------------
def test_stateless_batch_1_trains_and_improves():
    base = [*UNTRACKED_SHORT, "model.stateful=false", "model.batch_size=1", "model.lr=1e-2"]
    before = train(make_cfg(*base, "trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"))
    after = train(make_cfg(*base, "trainer.max_epochs=20"))
    assert after["val/loss"] < before["val/loss"] - 1.0
    assert after["test/token_acc"] > 0.25  # chance is 0.01


# -- longer echoes ------------------------------------------------------------------------
@pytest.mark.parametrize("study", ["study_long", "study_capacity"])
def test_long_echo_studies_make_sequences_n_plus_20_long_so_each_gives_21_windows(study):
    for n in (1, 10, 50):
        cfg = make_cfg(f"experiment={study}", f"task.n_in={n}")
        assert (cfg.task.n_out, cfg.task.length, windows_per_sequence(cfg.task)) == (n, n + 20, 21)
        validate(cfg)


def test_a_50_item_echo_trains_every_epoch():
    settings = ["model=encdec", "model.hidden_size=8", "task.n_in=50", "task.n_out=50", "task.length=70"]
    metrics = train(make_cfg(*UNTRACKED_SHORT, *settings, "trainer.max_epochs=5", "task.sequences_per_epoch=1"))
    assert_ran_every_epoch(metrics, 5)


def test_onehot_is_the_tutorial_representation():
    rep = OneHot(5)
    assert rep.encode(torch.tensor([PAD, 2])).tolist() == [[0] * 5, [0, 0, 1, 0, 0]]


def test_stateless_batch_1_updates_after_every_window():
    cfg = make_cfg("model.stateful=false", "model.batch_size=1")
    data = EchoData(cfg.task, 1, False, seed=0)
    data.trainer = None
    data.setup("fit")
    batches = data.fresh_batches()
    assert len(batches) == 21 and all(x.shape == (1, 5) for x, _ in batches)


# -- the study presets ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(p.stem for p in Path(CONF, "experiment").glob("study_*.yaml")))
def test_every_variant_of_every_study_is_a_valid_config(study):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        hydra_cfg = compose("config", overrides=[f"experiment={study}"], return_hydra_config=True)
        sweep = {k: str(v).split(",") for k, v in hydra_cfg.hydra.sweeper.params.items() if k != "seed"}
        assert (
            "seed" in hydra_cfg.hydra.sweeper.params and len(str(hydra_cfg.hydra.sweeper.params.seed).split(",")) >= 3
        )
        for values in itertools.product(*sweep.values()):
            overrides = [f"{k}={v}" for k, v in zip(sweep, values)]
            cfg = compose("config", overrides=[f"experiment={study}", *overrides])
            validate(cfg)
            assert cfg.logger.experiment == study
