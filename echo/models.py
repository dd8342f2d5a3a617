"""The networks: plain nn.Modules with explicit sizes; they never see the config.

Every network maps input features (batch, n_in, n_features) and a recurrent state (None for
a fresh zero state) to scores (batch, n_out, n_classes) and its new state, so a caller can
carry the state to the next batch the way a Keras `stateful=True` layer does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

State = tuple  # nested tuples of (h, c) tensors, one pair per LSTM


class Seq2Seq(nn.Module):
    """Listing A: `LSTM(hidden, return_sequences)` → `TimeDistributed(Dense(n_classes))`.

    One output per input step; the first `n_out` steps are the echo (with `n_out == n_in`,
    the whole window, as in the tutorial). Any window length: it reads whatever steps it is given
    and answers at the first `n_out` of them (at most the window's length).
    """

    variable_length = True

    def __init__(self, n_features: int, hidden_size: int, n_classes: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.lstm = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_classes)
        init_like_keras(self)

    def forward(
        self, x: Tensor, state: State | None = None, mask: Tensor | None = None, n_out: int | None = None
    ) -> tuple[Tensor, State]:
        h, state = masked_lstm(self.lstm, x, state, mask)
        return self.head(h[:, : n_out or self.n_out]), state


class EncoderDecoder(nn.Module):
    """Listing B: `LSTM(hidden)` encoder (last output only) → `RepeatVector(n_out)` →
    `LSTM(hidden, return_sequences)` decoder → `TimeDistributed(Dense(n_classes))`.

    As in Keras, the decoder starts from its own state, not the encoder's; the encoder's
    last output is its input at every step. Any window length and any `n_out`: the encoder
    reads every step, and its last output is repeated `n_out` times.
    """

    variable_length = True

    def __init__(self, n_features: int, hidden_size: int, n_classes: int, n_out: int):
        super().__init__()
        self.n_out = n_out
        self.encoder = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.decoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_classes)
        init_like_keras(self)

    def forward(
        self, x: Tensor, state: State | None = None, mask: Tensor | None = None, n_out: int | None = None
    ) -> tuple[Tensor, State]:
        enc_state, dec_state = state if state is not None else (None, None)
        h, enc_state = masked_lstm(self.encoder, x, enc_state, mask)
        repeated = h[:, -1:].expand(-1, n_out or self.n_out, -1)
        h, dec_state = self.decoder(repeated, dec_state)
        return self.head(h), (enc_state, dec_state)


class OneToOne(nn.Module):
    """Extension 5, one-to-one: the whole window as one feature vector (n_in * n_features wide)
    read in one step by `LSTM(hidden)`, then `Dense(n_out * n_classes)` reshaped to n_out scores.

    An LSTM over one step (not an MLP), so it keeps a state and can be trained statefully like
    the tutorial's listings. It cannot mask: padded items are inside its single step.
    """

    needs_n_in = True
    can_mask = False

    def __init__(self, n_in: int, n_features: int, hidden_size: int, n_classes: int, n_out: int):
        super().__init__()
        self.n_out, self.n_classes = n_out, n_classes
        self.lstm = nn.LSTM(n_in * n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_out * n_classes)
        init_like_keras(self)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h, state = self.lstm(x.flatten(1).unsqueeze(1), state)
        return self.head(h[:, -1]).unflatten(-1, (self.n_out, self.n_classes)), state


class ManyToOne(nn.Module):
    """Extension 5, many-to-one: `LSTM(hidden)` over the window, its last output only →
    `Dense(n_out * n_classes)`, reshaped to (n_out, n_classes)."""

    def __init__(self, n_features: int, hidden_size: int, n_classes: int, n_out: int):
        super().__init__()
        self.n_out, self.n_classes = n_out, n_classes
        self.lstm = nn.LSTM(n_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, n_out * n_classes)
        init_like_keras(self)

    def forward(self, x: Tensor, state: State | None = None, mask: Tensor | None = None) -> tuple[Tensor, State]:
        h, state = masked_lstm(self.lstm, x, state, mask)
        return self.head(h[:, -1]).unflatten(-1, (self.n_out, self.n_classes)), state


MODELS = {"seq2seq": Seq2Seq, "encdec": EncoderDecoder, "one_to_one": OneToOne, "many_to_one": ManyToOne}


def build_net(name: str, n_in: int, n_features: int, hidden_size: int, n_classes: int, n_out: int) -> nn.Module:
    """Network `name` with these sizes; only the topologies that flatten the window get `n_in`."""
    cls = MODELS[name]
    sizes = dict(n_features=n_features, hidden_size=hidden_size, n_classes=n_classes, n_out=n_out)
    return cls(n_in=n_in, **sizes) if getattr(cls, "needs_n_in", False) else cls(**sizes)


def variable_length(name: str) -> bool:
    """Whether network `name` takes windows of any length and any `n_out` (length generalisation)."""
    return getattr(MODELS[name], "variable_length", False)


def can_mask(name: str) -> bool:
    """Whether network `name` can skip masked (padded) input steps."""
    return getattr(MODELS[name], "can_mask", True)


def masked_lstm(
    lstm: nn.LSTM, x: Tensor, state: tuple[Tensor, Tensor] | None, mask: Tensor | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`lstm(x, state)`, except that where `mask` (batch, steps) is False the step is skipped,
    as Keras `Masking` does: the state does not change and the output repeats the last one.

    With no mask this is the plain (fast) LSTM call; with one it runs step by step.
    """
    if mask is None:
        return lstm(x, state)
    if state is None:
        zeros = x.new_zeros(lstm.num_layers, x.shape[0], lstm.hidden_size)
        state = (zeros, zeros)
    h, c = state
    outputs = []
    for t in range(x.shape[1]):
        _, (h_new, c_new) = lstm(x[:, t : t + 1], (h, c))
        keep = mask[:, t].view(1, -1, 1)
        h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
        outputs.append(h[-1])
    return torch.stack(outputs, 1), (h, c)


def init_like_keras(net: nn.Module) -> None:
    """Initialise as Keras does, as the tutorial's networks were: Glorot-uniform input
    kernels, orthogonal recurrent kernels, zero biases but 1 for the forget gate
    (`unit_forget_bias`), Glorot-uniform dense layers. It learns the echo about twice as fast
    as PyTorch's default uniform init (README, Performance)."""
    for module in net.modules():
        if isinstance(module, nn.LSTM):
            for name, param in module.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(param)  # Keras' kernel: (inputs, 4 * units)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(param)
                else:
                    nn.init.zeros_(param)
                    if name.startswith("bias_ih"):
                        param.data.chunk(4)[1].fill_(1.0)  # gates: input, forget, cell, output
        elif isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def detach_state(state: State | Tensor | None):
    """The same state with no gradient history: no gradient flows across batches."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return tuple(detach_state(s) for s in state)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
