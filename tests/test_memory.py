"""The memory benchmarks: copy memory against its memoryless baseline, reversed windows, the
accuracy before the first error, stacked recurrent layers, RMSProp, and their bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import all_runs, make_cfg, run_py

from echo.config import ConfigError, validate
from echo.memory import BLANK, MARKER, RECALL, copy_memory, memoryless_loss
from echo.models import build_net
from echo.module import EchoModule, window_counts
from echo.windows import before_first_error, to_windows

COPY = ["experiment=copy_memory", "logger=none", "threads=1"]


def test_copy_memory_sequences_hold_the_symbols_the_marker_and_blanks_where_the_paper_puts_them():
    delay = 7
    x, y = copy_memory(4, delay, torch.Generator().manual_seed(0))
    again, _ = copy_memory(4, delay, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # the generator's draw, nothing else
    assert x.shape == y.shape == (4, delay + 20)
    data = x[:, :RECALL]
    assert ((data >= 1) & (data <= 8)).all()
    assert (x[:, RECALL : RECALL + delay - 1] == BLANK).all()  # T-1 blanks
    assert (x[:, RECALL + delay - 1] == MARKER).all()  # then the marker
    assert (x[:, -RECALL:] == BLANK).all()  # then 10 blanks
    assert (y[:, : delay + 10] == BLANK).all()  # T+10 blanks, then the symbols
    assert torch.equal(y[:, -RECALL:], data)
    assert (x == MARKER).sum() == 4


def test_the_memoryless_baseline_is_10_ln8_over_t_plus_20():
    assert memoryless_loss(200) == pytest.approx(10 * math.log(8) / 220)
    assert memoryless_loss(200) == pytest.approx(0.0945, abs=1e-4)


def test_copy_memory_loss_is_averaged_over_all_positions_and_accuracy_over_the_recalled_symbols():
    delay, n = 3, 5
    net = build_net("seq2seq", n_in=delay + 20, n_features=10, hidden_size=4, n_classes=9, n_out=delay + 20)
    module = EchoModule(net, 10, 1e-3, stateful=False, windows_per_epoch=n, recall=RECALL)
    module.rep.n_outputs = 9
    x, y = copy_memory(n, delay, torch.Generator().manual_seed(1))
    scores = torch.zeros(n, delay + 20, 9)
    scores[..., BLANK] = 5.0  # blanks everywhere: right on the T+10 first positions, wrong on the symbols
    loss, correct, tokens, exact, rows, before_error, loss_tokens = module._counts(scores[None], y[None])[0][:, 0]
    expected = torch.nn.functional.cross_entropy(scores.flatten(0, 1), y.flatten(), reduction="mean")
    assert (loss / loss_tokens).item() == pytest.approx(expected.item())
    assert loss_tokens == n * (delay + 20)
    assert (correct, tokens, exact, rows, before_error) == (0, n * RECALL, 0, n, 0)


def test_reversed_input_and_target_frame_the_tutorials_example():
    seq = torch.tensor([[86, 81, 88, 1, 23]])
    x, y = to_windows(seq, 5, 3)
    assert (x.tolist(), y.tolist()) == ([[[86, 81, 88, 1, 23]]], [[[86, 81, 88]]])
    x, y = to_windows(seq, 5, 3, reverse_input=True)
    assert (x.tolist(), y.tolist()) == ([[[23, 1, 88, 81, 86]]], [[[86, 81, 88]]])
    x, y = to_windows(seq, 5, 3, reverse_target=True)
    assert (x.tolist(), y.tolist()) == ([[[86, 81, 88, 1, 23]]], [[[88, 81, 86]]])
    _, y = to_windows(seq, 5, 5, reverse_target=True)
    assert y.tolist() == [[[23, 1, 88, 81, 86]]]  # n_out = n_in: the whole window reversed


def test_prefix_accuracy_counts_the_tokens_before_the_first_error_and_never_exceeds_token_accuracy():
    y = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [-1, 2, 3, 4]])  # -1: PAD
    predicted = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [9, 2, 3, 4], [7, 2, 9, 4]])
    correct, real = predicted == y, y != -1
    assert before_first_error(correct, real).tolist() == [4, 1, 0, 1]  # padding never counts
    right, tokens, exact, rows, before = (v.item() for v in window_counts(correct, real))
    assert (right, tokens, exact, rows, before) == (4 + 3 + 3 + 2, 15, 1, 4, 6)
    assert before / tokens <= right / tokens
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):  # on random predictions, windows of mixed real lengths
        y = torch.randint(0, 3, (8, 6), generator=generator)
        y[:4, :2] = -1
        predicted = torch.randint(0, 3, (8, 6), generator=generator)
        right, tokens, _, _, before = window_counts(predicted == y, y != -1)
        assert before <= right


def test_num_layers_builds_stacked_recurrent_layers():
    for name in ("seq2seq", "encdec", "many_to_one", "attention", "autoregressive"):
        net = build_net(name, n_in=5, n_features=10, hidden_size=8, n_classes=10, n_out=5, num_layers=3)
        layers = [m for m in net.modules() if isinstance(m, torch.nn.LSTM)]
        assert layers and all(m.num_layers == 3 for m in layers), name
        scores, _ = net(torch.zeros(2, 5, 10))
        assert scores.shape == (2, 5, 10)
    net = build_net("one_to_one", n_in=5, n_features=10, hidden_size=8, n_classes=10, n_out=5, num_layers=2, cell="gru")
    assert net.lstm.num_layers == 2 and isinstance(net.lstm, torch.nn.GRU)


def test_model_optimizer_chooses_rmsprop_with_the_papers_decay():
    net = build_net("seq2seq", n_in=5, n_features=10, hidden_size=4, n_classes=10, n_out=5)
    optimizer = EchoModule(net, 10, 1e-3, False, 21, optimizer="rmsprop").configure_optimizers()
    assert isinstance(optimizer, torch.optim.RMSprop)
    assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["alpha"] == 0.9
    assert isinstance(EchoModule(net, 10, 1e-3, False, 21).configure_optimizers(), torch.optim.Adam)
    cfg = make_cfg("experiment=copy_memory")
    assert (cfg.model.optimizer, cfg.model.hidden_size, cfg.model.batch_size) == ("rmsprop", 40, 20)
    assert (cfg.trainer.gradient_clip_val, cfg.task.delay, cfg.stop_at) == (1.0, 100, None)


BAD = {
    "task.delay=0": "task.delay=0 must be a whole number >= 1",
    "task.reverse_input=true": "task.reverse_input=true reverses echo windows; task=copy_memory has none",
    "task.reverse_target=true": "task.reverse_target=true reverses echo windows; task=copy_memory has none",
    "model=encdec": "model=encdec cannot read task=copy_memory",
    "model=transformer": "model=transformer cannot read task=copy_memory",
    "model.stateful=true": "task=copy_memory trains on independent sequences: set model.stateful=false",
    "task.n_in=30": "task.n_in=30 is set by task.delay for task=copy_memory",
    "task.framing=mask": "task=copy_memory frames nothing \\(whole sequences\\): set task.framing=drop",
    "+task.train_lengths=[1,10]": "task.train_lengths varies echo windows; task=copy_memory has none",
    "model.num_layers=0": "model.num_layers=0 must be a whole number >= 1",
    "model.optimizer=adagrad": "model.optimizer='adagrad' is unknown",
}


@pytest.mark.parametrize("override", BAD)
def test_a_copy_memory_setting_that_cannot_work_is_one_line(override):
    with pytest.raises(ConfigError, match=BAD[override]) as raised:
        validate(make_cfg("experiment=copy_memory", *override.split()))
    assert "\n" not in str(raised.value)


def test_stacked_populations_refuse_what_has_no_stacked_form():
    from echo.population import why_not_stackable

    assert "num_layers=2" in why_not_stackable(make_cfg("model=encdec", "model.num_layers=2"))
    assert why_not_stackable(make_cfg("model=encdec", "model.optimizer=rmsprop")) is None  # MemberRMSprop
    assert "copy_memory" in why_not_stackable(make_cfg("experiment=copy_memory"))
    assert why_not_stackable(make_cfg("model=encdec", "task.reverse_input=true")) is None


def test_a_bad_memory_setting_exits_2_with_one_line(tmp_path):
    result = run_py("task=copy_memory", "model=encdec", cwd=tmp_path, uri=f"sqlite:///{tmp_path}/m.db", timeout=120)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "model=encdec cannot read task=copy_memory, which scores an answer at every input step as the network "
            "reads it: use model=seq2seq (model.cell=lstm or gru)"
        )
    )


def test_a_tiny_copy_memory_run_logs_the_baseline_and_the_test_metrics(store, tmp_path):
    result = run_py(
        "experiment=copy_memory", "task.delay=5", "trainer.max_epochs=20", "trainer.check_val_every_n_epoch=10",
        "task.eval_windows=50", "threads=1", "progress=false", cwd=tmp_path, uri=store,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (run,) = all_runs(store, "copy_memory")
    metrics = run.data.metrics
    assert metrics["chance/loss"] == pytest.approx(10 * math.log(8) / 25)
    assert {"test/exact_match", "test/token_acc", "test/prefix_acc", "val/exact_match", "train/loss"} <= set(metrics)
    assert metrics["test/prefix_acc"] <= metrics["test/token_acc"]
    assert run.data.params["model.optimizer"] == "rmsprop"


def test_one_rmsprop_over_stacked_weights_is_each_members_rmsprop_and_a_frozen_member_stays_put():
    from echo.stacked import MemberRMSprop

    torch.manual_seed(0)
    lrs = [1e-3, 1e-2, 1e-3]
    stacked = torch.nn.Parameter(torch.randn(3, 6, 5))
    alone = [torch.nn.Parameter(stacked[k].detach().clone()) for k in range(3)]
    torches = [torch.optim.RMSprop([p], lr=lr, alpha=0.9) for p, lr in zip(alone, lrs)]
    ours = MemberRMSprop([stacked], lrs)
    for step in range(20):
        if step == 10:
            ours.freeze(2)
            frozen = stacked[2].detach().clone()
        grads = torch.randn(3, 6, 5)
        stacked.grad = grads.clone()
        ours.step()
        for k in range(2 if step >= 10 else 3):
            alone[k].grad = grads[k].clone()
            torches[k].step()
    for k in range(2):
        torch.testing.assert_close(stacked[k].detach(), alone[k].detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(stacked[2].detach(), frozen)
    state = ours.member_state(0, ["w"], lambda name, value: value.clone())
    assert set(state) == {"step", "square_avg"} and state["step"] == 20


def test_a_population_trains_reversed_windows_with_rmsprop_as_runs_alone_would(tmp_path):
    from echo.logger import Member
    from echo.population import train_population, why_not_stackable

    overrides = ["model=encdec", "model.hidden_size=8", "model.optimizer=rmsprop", "task.reverse_input=true"]
    overrides += ["task.reverse_target=true", "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2"]
    overrides += ["logger=none", "stop_at=null", "task.eval_windows=21", "task.sequences_per_epoch=1"]
    cfgs = [make_cfg(*overrides, f"seed={seed}") for seed in (0, 1)]
    assert why_not_stackable(cfgs[0]) is None
    members = train_population([Member(cfg, f"s{i}", {}) for i, cfg in enumerate(cfgs)], None, threads=1)
    assert all(m.status == "FINISHED" for m in members)
    for member in members:
        assert member.summary["test/prefix_acc"] <= member.summary["test/token_acc"]


def _run(seed: int, **values) -> dict:
    """A study_memory run as experiments/report.py reads it: params as strings, metrics as floats."""
    params = {"seed": str(seed), "task.name": "None", "task.reverse_input": "False", "task.reverse_target": "False"}
    params["task.train_lengths"] = "None"
    return {**params, **{k: v for k, v in values.items()}}


def test_the_memory_report_holds_one_table_and_sentences_from_the_numbers():
    from experiments.report import memory_report

    copy = dict(
        **{"task.name": "copy_memory", "model.cell": "lstm", "model.hidden_size": "40", "model.optimizer": "rmsprop"},
        **{"model.lr": "0.001", "epochs": 1500.0, "chance/loss": 0.0945, "test/token_acc": 0.125},
    )
    runs = [_run(s, **copy, **{"task.delay": "200", "val/loss": 0.0945 * (1 + s / 1000)}) for s in range(3)]
    for n, forward, backward in ((2, 1.0, 1.0), (10, 0.01, 0.7)):
        runs += [_run(s, **{"task.n_in": str(n), "test/exact_match": forward}) for s in range(3)]
        runs += [
            _run(s, **{"task.n_in": str(n), "task.reverse_input": "True", "test/exact_match": backward})
            for s in range(3)
        ]
    lengths = {"task.train_lengths": "[4, 16]", "task.n_unique": "32", "model.num_layers": "2"}
    lengths |= {"model.hidden_size": "128", "test/iid_exact_match": 0.5, "test/ood_exact_match": 0.0}
    runs += [_run(s, **lengths, **{"test/ood_prefix_acc": 0.1 * s}) for s in range(3)]
    reverse = {"task.train_lengths": "[1, 10]", "task.reverse_target": "True", "task.n_unique": "2"}
    runs += [_run(s, **reverse, **{"test/ood_token_acc": 0.5 + 0.1 * s}) for s in range(3)]
    text, fig = memory_report(runs)
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| paper | setting | theirs |") and len(table) == 2 + 2 + 4 + 3 + 1
    assert "| Grefenstette et al. 2015, Fig. 2a |" in text and "| 0.100 ± 0.100 (0.000–0.200) | 0.200 |" in text
    assert "T = 200, LSTM(40) rmsprop 0.001, 1500 steps: the held-out loss sits on the memoryless baseline" in text
    assert "at n = 10 reversal helps (test exact match 0.010 → 0.700)" in text
    assert "reading it backwards rescues the tutorial's encoder-decoder" in text
    assert "the best seed's token accuracy on longer strings is 0.700" in text and "does not solve it" in text
