"""The decoders beyond the tutorial (attention, autoregressive, transformer; LSTM or GRU cells), the
metrics that explain a failure (accuracy by output position, chance levels, n_params), and the
checks that refuse their bad settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import CONF, TINY, all_runs, artifacts, make_cfg, run_py
from torch import nn

from echo.config import ConfigError, validate
from echo.encoding import PAD
from echo.models import (
    MODELS,
    NET_OPTIONS,
    Attention,
    Autoregressive,
    Transformer,
    build_net,
    count_parameters,
    masked_lstm,
)
from echo.module import EchoModule
from echo.train import train
from echo.windows import Draw

NEW = ["attention", "autoregressive", "transformer"]
RECURRENT = ["seq2seq", "encdec", "one_to_one", "many_to_one", "attention", "autoregressive"]


def small(name: str, n_in: int = 5, n_out: int = 3, n_classes: int = 10, **options) -> nn.Module:
    sizes = dict(hidden_size=16, d_model=16, n_heads=2) if name == "transformer" else dict(hidden_size=12)
    options = {**sizes, **options}
    return build_net(name, n_in=n_in, n_features=n_classes, n_classes=n_classes, n_out=n_out, **options)


def one_hot(tokens: torch.Tensor, n: int = 10) -> torch.Tensor:
    return nn.functional.one_hot(tokens, n).float()


# -- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize(("length", "n_out"), [(5, 3), (9, 7), (2, 2)])
def test_new_networks_take_windows_and_outputs_of_other_lengths(name, length, n_out):
    net = small(name)  # built for windows of 5 and 3 outputs
    x = one_hot(torch.randint(0, 10, (4, length)))
    scores, state = net(x, None, n_out=n_out if n_out != 3 else None)
    assert scores.shape == (4, n_out, 10)
    again, _ = net(x, state, n_out=n_out)  # a carried state is accepted back
    assert again.shape == scores.shape
    assert getattr(type(net), "variable_length", False)


@pytest.mark.parametrize("name", ["attention", "autoregressive"])
def test_gru_networks_have_a_state_of_h_alone(name):
    net = small(name, cell="gru")
    assert any(isinstance(m, nn.GRU) for m in net.modules()) and not any(isinstance(m, nn.LSTM) for m in net.modules())
    scores, state = net(one_hot(torch.randint(0, 10, (4, 5))))
    assert scores.shape == (4, 3, 10) and isinstance(state, torch.Tensor) and state.shape == (1, 4, 12)


@pytest.mark.parametrize("name", RECURRENT)
def test_every_recurrent_network_takes_a_gru_cell(name):
    gru, lstm = small(name, cell="gru"), small(name)
    assert any(isinstance(m, nn.GRU) for m in gru.modules()) and not any(isinstance(m, nn.LSTM) for m in gru.modules())
    assert count_parameters(gru) < count_parameters(lstm)  # three gates instead of four
    scores, _ = gru(one_hot(torch.randint(0, 10, (4, 5))))
    assert scores.shape == (4, 3, 10)


def test_the_tutorial_networks_are_built_as_before_by_default():
    torch.manual_seed(0)
    before = {k: v.clone() for k, v in MODELS["encdec"](100, 150, 100, 2).state_dict().items()}
    torch.manual_seed(0)
    now = build_net("encdec", n_in=5, n_features=100, hidden_size=150, n_classes=100, n_out=2, cell="lstm")
    assert all(torch.equal(before[k], v) for k, v in now.state_dict().items())
    assert count_parameters(now) == 347_500  # listing B


def test_masked_gru_keeps_its_state_on_masked_steps():
    gru = nn.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    _, h_masked = masked_lstm(gru, x, None, mask)
    _, h_real = gru(x[:1, 2:])  # row 0 read only its real items
    torch.testing.assert_close(h_masked[:, :1], h_real)


@pytest.mark.parametrize("name", ["attention", "transformer"])
def test_attention_over_padded_items_is_zero(name):
    net = small(name, n_out=2)
    x, mask = one_hot(torch.randint(0, 10, (3, 5))), torch.ones(3, 5, dtype=torch.bool)
    mask[:, :2] = False
    garbage = x.clone()
    garbage[:, :2] = torch.randn(3, 2, 10)
    torch.testing.assert_close(net(x, mask=mask)[0], net(garbage, mask=mask)[0])


def test_transformer_queries_carry_the_positions_they_echo():
    learned = small("transformer", positional="learned", max_len=8)
    assert learned.positions.num_embeddings == 8
    with pytest.raises(ValueError, match="max_len=8"):
        learned(one_hot(torch.randint(0, 10, (2, 9))))
    sinusoidal = small("transformer")  # any length
    assert sinusoidal(one_hot(torch.randint(0, 10, (2, 70))), n_out=70)[0].shape == (2, 70, 10)


# -- teacher forcing -----------------------------------------------------------------------------
def test_autoregressive_feeds_true_tokens_when_forced_and_its_own_otherwise():
    net = small("autoregressive").eval()
    x = one_hot(torch.randint(0, 10, (4, 5)))
    targets = torch.randint(0, 10, (4, 3))
    forced, _ = net(x, targets=targets)
    free, _ = net(x)
    own = free.argmax(-1)
    assert torch.allclose(net(x, targets=own)[0], free, atol=1e-5)  # free-running = fed its own argmax
    assert torch.allclose(forced[:, 0], free[:, 0], atol=1e-6)  # step 1 sees the start token either way
    if not torch.equal(own[:, :2], targets[:, :2]):
        assert not torch.allclose(forced[:, 1:], free[:, 1:])


def test_scheduled_sampling_at_zero_is_free_running_in_training():
    torch.manual_seed(0)
    net = small("autoregressive", teacher_forcing=0.0).train()
    x = one_hot(torch.randint(0, 10, (4, 5)))
    torch.testing.assert_close(net(x, targets=torch.randint(0, 10, (4, 3)))[0], net(x)[0])


def test_scheduled_sampling_feeds_the_true_token_with_its_probability_and_its_own_otherwise():
    """model.teacher_forcing=0.3 in training: each decoder step after the first is fed the true
    previous token with probability 0.3, else the network's own prediction."""
    torch.manual_seed(0)
    net = small("autoregressive", teacher_forcing=0.3).train()
    fed = []
    net.tokens.register_forward_hook(lambda embedding, inputs, output: fed.append(inputs[0]))
    x, targets = one_hot(torch.randint(0, 10, (4000, 5))), torch.randint(0, 10, (4000, 3))
    with torch.no_grad():
        own = net(x, targets=targets)[0].argmax(-1)
    fed = torch.cat(fed[1:], 1)  # after the start token: the inputs of steps 2 and 3
    true, predicted = targets[:, :2], own[:, :2]
    assert ((fed == true) | (fed == predicted)).all()
    telling = true != predicted  # where the two differ, which was fed tells
    assert abs((fed == true)[telling].float().mean().item() - 0.3) < 0.02


# -- learning on a tiny case ----------------------------------------------------------------------
TINY_TASK = [
    "logger=none",
    "task.n_unique=4",
    "task.n_in=6",
    "task.n_out=6",
    "task.length=12",
    "trainer.max_epochs=60",
    "trainer.check_val_every_n_epoch=20",
    "task.eval_windows=200",
    "stop_at=null",
]


@pytest.mark.parametrize(
    ("model", "options", "token_acc", "exact_match"),
    [
        ("attention", ["model.hidden_size=32"], 0.6, 0.05),
        ("attention", ["model.hidden_size=32", "model.cell=gru"], 0.6, 0.05),
        ("autoregressive", ["model.hidden_size=32"], 0.4, 0.0),  # no attention: slower
        ("transformer", ["model.d_model=32", "model.hidden_size=64", "model.lr=1e-2"], 0.6, 0.05),
    ],
)
@pytest.mark.slow
def test_each_decoder_learns_a_tiny_whole_window_echo(model, options, token_acc, exact_match):
    summary = train(make_cfg(f"model={model}", *TINY_TASK, *options))
    # chance: token 1/4, whole window of 6: 1/4096
    assert summary["test/token_acc"] > token_acc
    assert summary["test/exact_match"] >= exact_match
    if model == "autoregressive":
        # greedy decoding: a row is exact free-running if and only if it is exact teacher-forced
        assert summary["val/exact_match"] == summary["val/exact_match_teacher_forced"]
        assert summary["test/exact_match"] == summary["test/exact_match_teacher_forced"]
        # its tokens after a first mistake are not: fed its own mistakes, it makes more (exposure bias)
        assert summary["test/token_acc_teacher_forced"] > summary["test/token_acc"]


# -- metrics that explain a failure ---------------------------------------------------------------
class Known(nn.Module):
    """Predicts input item 1 right, item 2 as the next integer (always wrong), item 3 right."""

    def forward(self, x, state=None):
        scores = x[:, :3].clone()
        scores[:, 1] = scores[:, 1].roll(1, -1)
        return scores, None


def test_accuracy_by_position_counts_each_output_position():
    module = EchoModule(Known(), n_unique=10, lr=1e-3, stateful=False, windows_per_epoch=1)
    x = torch.randint(0, 10, (8, 5))
    y = x[:, :3].clone()
    y[4:, 2] = (y[4:, 2] + 1) % 10  # half the rows expect something else at position 3
    y[:2, 0] = PAD  # padding counts nowhere
    module._eval_step(Draw(lambda: [(x[:4], y[:4]), (x[4:], y[4:])]), 0)
    module.on_test_epoch_end()
    assert module.by_position == [1.0, 0.0, 0.5]
    assert module.summary["test/token_acc"] == pytest.approx((6 + 0 + 4) / 22)


@pytest.mark.slow
def test_a_run_logs_the_curve_by_position_chance_levels_and_parameter_count(store, tmp_path):
    args = ["model=autoregressive", "task.n_unique=10", "task.n_in=4", "task.n_out=3", "model.hidden_size=8", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = all_runs(store)
    from mlflow import MlflowClient

    history = MlflowClient(store).get_metric_history(run.info.run_id, "test/token_acc_by_position")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.data.metrics["chance/token_acc"] == pytest.approx(0.1)
    assert run.data.metrics["chance/exact_match"] == pytest.approx(0.001)
    net = Autoregressive(n_features=10, hidden_size=8, n_classes=10, n_out=3)
    assert run.data.params["n_params"] == str(count_parameters(net))
    assert {"val/token_acc_teacher_forced", "test/token_acc_teacher_forced"} <= set(run.data.metrics)
    assert "token_acc_by_position.png" in artifacts(store, run.info.run_id)


# -- bad settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=transformer", "model.n_heads=3"], "model.n_heads=3 does not divide model.d_model=128"),
        (["model=encdec", "model.cell=rnn"], "model.cell='rnn' is unknown"),
        (["model=attention", "model.cell=rnn"], "model.cell='rnn' is unknown"),
        (["model=autoregressive", "model.teacher_forcing=1.5"], r"model.teacher_forcing=1.5 must be a probability"),
        (["model=transformer", "model.positional=rotary"], "model.positional='rotary' is unknown"),
        (["model=attention", "task.n_in=70", "task.n_out=70", "task.length=80"], "model.max_len=64 is shorter"),
        (["model=autoregressive", "task.representation=linear"], "needs task.representation=onehot"),
    ],
)
def test_bad_decoder_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(make_cfg(*overrides))


def test_a_bad_setting_stops_with_one_line_before_anything_is_tracked(store, tmp_path):
    result = run_py("model=transformer", "model.n_heads=5", cwd=tmp_path, uri=store)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("echo: bad config: model.n_heads=5 does not divide model.d_model=128: choose n_heads")
    assert all_runs(store) == []


def test_network_classes_are_the_ones_named():
    assert (MODELS["attention"], MODELS["autoregressive"], MODELS["transformer"]) == (
        Attention,
        Autoregressive,
        Transformer,
    )


@pytest.mark.parametrize("model", ["seq2seq", "encdec", "one_to_one", "many_to_one", "autoregressive"])
def test_gru_cells_run_from_the_config(model):
    options = ["model.cell=gru", "model.hidden_size=8", "model.stateful=false", "task.eval_windows=100"]
    summary = train(make_cfg(f"model={model}", "logger=none", *options, *TINY[:2]))
    assert summary["epochs"] == 10 and "test/token_acc" in summary


# -- the study --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(p.stem for p in (Path(CONF) / "zoo").glob("*.yaml")))
def test_study_zoo_variants_match_listing_b_parameter_budget(variant):
    cfg = make_cfg("experiment=study_zoo", f"+zoo={variant}", "task.n_in=50")
    assert cfg.model.name == variant.removesuffix("_gru") and cfg.model.get("cell", "lstm") in variant + "lstm"
    net = build_net(
        cfg.model.name,
        n_in=cfg.task.n_in,
        n_features=100,
        hidden_size=cfg.model.hidden_size,
        n_classes=100,
        n_out=cfg.task.n_out,
        **{key: cfg.model[key] for key in NET_OPTIONS if key in cfg.model},
    )
    assert abs(count_parameters(net) - 347_500) <= 0.05 * 347_500  # listing B's, within 5%
