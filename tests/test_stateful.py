"""Keras `stateful=True` semantics: row i of batch b+1 starts where row i of batch b ended."""

import pytest
import pytorch_lightning as pl
import torch
from helpers import make_cfg

from echo.data import EchoData, generate_sequences, to_windows
from echo.encoding import one_hot_encode
from echo.models import MODELS, EncoderDecoder, Seq2Seq, build_net


def test_carried_state_equals_one_long_run_over_consecutive_windows():
    torch.manual_seed(0)
    net = Seq2Seq(n_features=10, hidden_size=8, n_classes=10, n_out=3)
    a, b = torch.randn(4, 3, 10), torch.randn(4, 3, 10)
    _, state = net(a)
    out_b, _ = net(b, state)
    h, _ = net.lstm(torch.cat([a, b], dim=1))
    assert torch.allclose(out_b, net.head(h[:, 3:]), atol=1e-6)
    fresh, _ = net(b)
    assert not torch.allclose(out_b, fresh, atol=1e-3)


def test_encoder_decoder_keeps_the_state_of_both_lstms():
    net = EncoderDecoder(n_features=10, hidden_size=8, n_classes=10, n_out=2)
    scores, (enc, dec) = net(torch.randn(5, 4, 10))
    assert scores.shape == (5, 2, 10)
    assert enc[0].shape == dec[0].shape == (1, 5, 8)


class Recorder(torch.nn.Module):
    """Wraps a network and records the state each training call received and returned."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, state=None):
        out, new_state = self.net(x, state)
        if self.training:
            self.calls.append((state, new_state))
        return out, new_state


def fit_recording(*overrides):
    from echo.module import EchoModule

    cfg = make_cfg("trainer.max_epochs=2", "logger=none", *overrides)
    net = Recorder(Seq2Seq(100, cfg.model.hidden_size, 100, cfg.task.n_out))
    module = EchoModule(net, 100, 1e-3, cfg.model.stateful, windows_per_epoch=21)
    data = EchoData(cfg.task, cfg.model.batch_size, cfg.model.stateful, seed=0)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        accelerator="cpu",
    )
    trainer.fit(module, data)
    return net.calls


def test_state_carries_between_batches_and_resets_every_epoch():
    calls = fit_recording()  # listing A: 3 batches of 7 windows per sequence, stateful
    assert len(calls) == 6
    for epoch in (0, 1):
        first, second, third = calls[3 * epoch : 3 * epoch + 3]
        assert first[0] is None  # a new sequence starts from zeros: reset_states()
        for (_, returned), (received, _) in ((first, second), (second, third)):
            for r, s in zip(returned, received):
                assert torch.equal(r.detach(), s)  # row i continues row i
                assert not s.requires_grad  # no gradient crosses batches


def test_stateless_mode_starts_every_batch_from_zeros():
    calls = fit_recording("model.stateful=false")
    assert len(calls) == 6 and all(received is None for received, _ in calls)


def test_training_batches_are_fresh_sequences_every_epoch():
    cfg = make_cfg("logger=none")
    data = EchoData(cfg.task, 7, True, seed=0)
    data.trainer = None
    data.setup("fit")
    loader = data.train_dataloader()  # one item per epoch: what draws the epoch's batches
    first, second = [torch.cat([x for x, _ in next(iter(loader))()]) for _ in range(2)]
    assert first.shape == (21, 5) and not torch.equal(first, second)
    # and the held-out sets are fixed by their own seeds
    val_x, _ = data.val
    seqs = generate_sequences(48, 25, 100, torch.Generator().manual_seed(cfg.task.val_seed))
    assert torch.equal(val_x, to_windows(seqs, 5, 5)[0]) and val_x.shape[:2] == (48, 21)
    assert one_hot_encode(val_x, 100).shape == (48, 21, 5, 100)


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"transformer"}))  # every recurrent one
def test_every_network_starts_from_keras_initial_weights(name):
    net = build_net(name, n_in=5, n_features=100, hidden_size=20, n_classes=100, n_out=2)
    lstms = [m for m in net.modules() if isinstance(m, torch.nn.LSTM)]
    assert lstms
    for lstm in lstms:
        forget_bias = lstm.bias_ih_l0.chunk(4)[1]
        assert torch.equal(forget_bias, torch.ones_like(forget_bias))  # Keras unit_forget_bias
        assert lstm.bias_hh_l0.abs().sum() == 0
        w = lstm.weight_hh_l0  # orthogonal: its columns are orthonormal
        assert torch.allclose(w.T @ w, torch.eye(w.shape[1]), atol=1e-5)
