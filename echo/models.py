"""The networks: plain nn.Modules with explicit sizes; they never see the config.

Every network maps input features (batch, n_in, n_features) and a recurrent state (None for
a fresh zero state) to scores (batch, n_out, n_classes) and its new state, so a caller can
carry the state to the next batch the way a Keras `stateful=True` layer does.

Recurrent networks take `cell="lstm"` or `"gru"` and `num_layers` (stacked recurrent layers, each
recurrent layer of the network that many deep). Networks with `variable_length = True`
accept a window of any length L and an `n_out` other than the one they were built with
(`forward(x, state, mask, n_out)`); those with `teacher_forced = True` also take the target
tokens (`targets`), fed to their decoder in training.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

State = tuple  # nested tuples of (h, c) tensors, one pair per LSTM (a GRU's state is h alone)

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1) -> nn.LSTM | nn.GRU:
    """A batch-first recurrent layer of kind `cell` ("lstm" or "gru"), `num_layers` stacked."""
    if cell not in CELLS:
        raise ValueError(f"cell={cell!r} is unknown: use one of {', '.join(CELLS)}")
    return CELLS[cell](input_size, hidden_size, num_layers=num_layers, batch_first=True)


class Seq2Seq(nn.Module):
    """Listing A: `LSTM(hidden, return_sequences)` → `TimeDistributed(Dense(n_classes))`.

    One output per input step; the first `n_out` steps are the echo (with `n_out == n_in`,
    the whole window, as in the tutorial). Any window length: it reads whatever steps it is given
    and answers at the first `n_out` of them (at most the window's length).
    """

    variable_length = True

    def __init__(
        self, n_features: int, hidden_size: int, n_classes: int, n_out: int, cell: str = "lstm", num_layers: int = 1
    ):
        super().__init__()
        self.n_out = n_out
        self.lstm = rnn(cell, n_features, hidden_size, num_layers)
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

    def __init__(
        self, n_features: int, hidden_size: int, n_classes: int, n_out: int, cell: str = "lstm", num_layers: int = 1
    ):
        super().__init__()
        self.n_out = n_out
        self.encoder = rnn(cell, n_features, hidden_size, num_layers)
        self.decoder = rnn(cell, hidden_size, hidden_size, num_layers)
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

    def __init__(
        self,
        n_in: int,
        n_features: int,
        hidden_size: int,
        n_classes: int,
        n_out: int,
        cell: str = "lstm",
        num_layers: int = 1,
    ):
        super().__init__()
        self.n_out, self.n_classes = n_out, n_classes
        self.lstm = rnn(cell, n_in * n_features, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, n_out * n_classes)
        init_like_keras(self)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        h, state = self.lstm(x.flatten(1).unsqueeze(1), state)
        return self.head(h[:, -1]).unflatten(-1, (self.n_out, self.n_classes)), state


class ManyToOne(nn.Module):
    """Extension 5, many-to-one: `LSTM(hidden)` over the window, its last output only →
    `Dense(n_out * n_classes)`, reshaped to (n_out, n_classes)."""

    def __init__(
        self, n_features: int, hidden_size: int, n_classes: int, n_out: int, cell: str = "lstm", num_layers: int = 1
    ):
        super().__init__()
        self.n_out, self.n_classes = n_out, n_classes
        self.lstm = rnn(cell, n_features, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, n_out * n_classes)
        init_like_keras(self)

    def forward(self, x: Tensor, state: State | None = None, mask: Tensor | None = None) -> tuple[Tensor, State]:
        h, state = masked_lstm(self.lstm, x, state, mask)
        return self.head(h[:, -1]).unflatten(-1, (self.n_out, self.n_classes)), state


class Attention(nn.Module):
    """Encoder-decoder with (Luong, dot) attention: an LSTM/GRU encoder over the window keeps an
    output per item; at each output step j an LSTM/GRU decoder, started from the encoder's final
    state and fed a learned embedding of position j, scores every encoder output against its own
    output, reads their softmax-weighted sum (the context) and predicts from
    `tanh(W [context; decoder output])`.

    Content alone cannot tell two equal integers apart, so positions are explicit: the same
    learned position table is the decoder's input at output step j and is added to the encoder's
    output at input item i where it is scored (the keys; the context reads the outputs alone). Step
    j can then find item j by position; without the keys' positions the encoder must learn to count,
    and on windows of 20 it had learned nothing after 100 steps where with them it was at 0.8 token
    accuracy after 60. The decoder's inputs do not depend on its predictions, so the whole decoder
    runs in one call. Windows and n_out of any length up to `max_len` (the position table).
    """

    variable_length = True

    def __init__(
        self,
        n_features: int,
        hidden_size: int,
        n_classes: int,
        n_out: int,
        cell: str = "lstm",
        max_len: int = 64,
        num_layers: int = 1,
    ):
        super().__init__()
        if n_out > max_len:
            raise ValueError(f"n_out={n_out} is more output steps than max_len={max_len}")
        self.n_out, self.max_len = n_out, max_len
        self.encoder = rnn(cell, n_features, hidden_size, num_layers)
        self.steps = nn.Embedding(max_len, hidden_size)  # output position j -> decoder input
        self.decoder = rnn(cell, hidden_size, hidden_size, num_layers)
        self.combine = nn.Linear(2 * hidden_size, hidden_size)
        self.head = nn.Linear(hidden_size, n_classes)
        init_like_keras(self)

    def forward(
        self, x: Tensor, state: State | None = None, mask: Tensor | None = None, n_out: int | None = None
    ) -> tuple[Tensor, State]:
        n_out = n_out or self.n_out
        if max(n_out, x.shape[1]) > self.max_len:
            raise ValueError(f"{max(n_out, x.shape[1])} positions are more than max_len={self.max_len}")
        memory, state = masked_lstm(self.encoder, x, state, mask)  # (batch, L, hidden)
        queries = self.steps.weight[:n_out].expand(x.shape[0], -1, -1)
        h, _ = self.decoder(queries, state)  # (batch, n_out, hidden)
        keys = memory + self.steps.weight[: x.shape[1]]  # input item i is found by position i
        weights = h @ keys.transpose(1, 2)  # (batch, n_out, L)
        if mask is not None:
            weights = weights.masked_fill(~mask.unsqueeze(1), float("-inf"))
        context = weights.softmax(-1) @ memory
        return self.head(torch.tanh(self.combine(torch.cat([context, h], -1)))), state


class Autoregressive(nn.Module):
    """Sequence-to-sequence with an autoregressive decoder (Sutskever et al. 2014): an LSTM/GRU
    encoder reads the window; the decoder starts from its final state and is fed, at each output
    step, the previous output token (a start token first): in training the true one with
    probability `teacher_forcing` (1: teacher forcing; below 1: scheduled sampling, a coin per
    token), otherwise and in evaluation its own argmax prediction. No attention: the encoder's
    final state is all the decoder knows of the window.

    `targets` (batch, n_out) are the true tokens; given in evaluation, they are always fed (the
    teacher-forced metrics). Any input length and n_out.
    """

    variable_length = True
    teacher_forced = True

    def __init__(
        self,
        n_features: int,
        hidden_size: int,
        n_classes: int,
        n_out: int,
        cell: str = "lstm",
        teacher_forcing: float = 1.0,
        num_layers: int = 1,
    ):
        super().__init__()
        self.n_out, self.n_classes, self.teacher_forcing = n_out, n_classes, teacher_forcing
        self.encoder = rnn(cell, n_features, hidden_size, num_layers)
        self.tokens = nn.Embedding(n_classes + 1, hidden_size)  # the last one is the start token
        self.decoder = rnn(cell, hidden_size, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, n_classes)
        init_like_keras(self)

    def forward(
        self,
        x: Tensor,
        state: State | None = None,
        mask: Tensor | None = None,
        n_out: int | None = None,
        targets: Tensor | None = None,
    ) -> tuple[Tensor, State]:
        n_out = n_out or self.n_out
        _, state = masked_lstm(self.encoder, x, state, mask)
        start = x.new_full((x.shape[0], 1), self.n_classes, dtype=torch.long)
        if targets is not None:
            targets = targets[:, :n_out]
            targets = torch.where(targets < 0, self.n_classes, targets)  # PAD (masked framing): the start token
        p = self.teacher_forcing if self.training else 1.0
        if targets is not None and p >= 1:  # every input known: one call
            h, _ = self.decoder(self.tokens(torch.cat([start, targets[:, :-1]], 1)), state)
            return self.head(h), state
        token, dec_state, scores = start, state, []
        for t in range(n_out):
            h, dec_state = self.decoder(self.tokens(token), dec_state)
            scores.append(self.head(h))
            token = scores[-1].argmax(-1)
            if targets is not None and p > 0:
                forced = torch.rand(token.shape, device=token.device) < p
                token = torch.where(forced, targets[:, t : t + 1], token)
        return torch.cat(scores, 1), state


class Transformer(nn.Module):
    """A small Transformer (torch.nn layers): the window's items, embedded, plus n_out query
    slots, through one stack of bidirectional self-attention layers; output j is read at query
    slot j. A query slot is a learned "query" vector plus the positional encoding of position j,
    the same encoding as input item j, which is the one it must echo (the oldest n_out first).

    Non-autoregressive: every output at once, no teacher forcing and no exposure bias.
    `positional`: "sinusoidal" (Vaswani et al. 2017; any length) or "learned" (a table of
    `max_len` positions). Pre-norm layers, no dropout (fresh data every epoch: nothing to
    overfit). The feed-forward width is `hidden_size`. No state: it returns None.
    """

    variable_length = True

    def __init__(
        self,
        n_features: int,
        hidden_size: int,
        n_classes: int,
        n_out: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        positional: str = "sinusoidal",
        max_len: int = 64,
    ):
        super().__init__()
        if positional not in ("sinusoidal", "learned"):
            raise ValueError(f"positional={positional!r} is unknown: use sinusoidal or learned")
        self.n_out, self.d_model, self.positional, self.max_len = n_out, d_model, positional, max_len
        self.embed = nn.Linear(n_features, d_model)
        self.scale = math.sqrt(d_model)  # Vaswani et al.: embeddings times sqrt(d_model)
        self.query = nn.Parameter(torch.randn(d_model) * 0.02)
        if positional == "learned":
            self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=hidden_size, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def position(self, n: int, device) -> Tensor:
        """Encodings of positions 0 .. n-1, (n, d_model)."""
        if self.positional == "learned":
            if n > self.max_len:
                raise ValueError(f"{n} positions are more than max_len={self.max_len}")
            return self.positions.weight[:n]
        return sinusoidal(n, self.d_model, device)

    def forward(
        self, x: Tensor, state: State | None = None, mask: Tensor | None = None, n_out: int | None = None
    ) -> tuple[Tensor, None]:
        n_out = n_out or self.n_out
        batch, length = x.shape[:2]
        positions = self.position(max(length, n_out), x.device)
        items = self.embed(x) * self.scale + positions[:length]  # items as loud as their positions
        queries = (self.query + positions[:n_out]).expand(batch, -1, -1)
        padding = None
        if mask is not None:  # padded items are not attended to
            padding = torch.cat([~mask, mask.new_zeros(batch, n_out)], 1)
        h = self.layers(torch.cat([items, queries], 1), src_key_padding_mask=padding)
        return self.head(self.norm(h[:, length:])), None


def sinusoidal(n: int, d_model: int, device=None) -> Tensor:
    """The sinusoidal position encodings of Vaswani et al. (2017) for positions 0 .. n-1."""
    position = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
    rate = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32) * (-math.log(10_000.0) / d_model))
    encoding = torch.zeros(n, d_model, device=device)
    encoding[:, 0::2] = torch.sin(position * rate)
    encoding[:, 1::2] = torch.cos(position * rate[: d_model // 2])
    return encoding


MODELS = {
    "seq2seq": Seq2Seq,
    "encdec": EncoderDecoder,
    "one_to_one": OneToOne,
    "many_to_one": ManyToOne,
    "attention": Attention,
    "autoregressive": Autoregressive,
    "transformer": Transformer,
}
# Network options beyond the sizes every network takes; each goes to the networks that accept it.
NET_OPTIONS = ("cell", "num_layers", "max_len", "teacher_forcing", "d_model", "n_layers", "n_heads", "positional")


def build_net(
    name: str, n_in: int, n_features: int, hidden_size: int, n_classes: int, n_out: int, **options
) -> nn.Module:
    """Network `name` with these sizes; only the topologies that flatten the window get `n_in`.
    `options` (NET_OPTIONS, e.g. cell="gru") go to the networks that take them; others ignore them.
    It keeps its arguments as `build_args`, so a stored network can be built again (echo/reuse.py)."""
    cls = MODELS[name]
    sizes = dict(n_features=n_features, hidden_size=hidden_size, n_classes=n_classes, n_out=n_out)
    accepted = inspect.signature(cls).parameters
    sizes |= {k: v for k, v in options.items() if k in accepted and v is not None}
    net = cls(n_in=n_in, **sizes) if getattr(cls, "needs_n_in", False) else cls(**sizes)
    net.build_args = {"name": name, "n_in": n_in, **sizes}
    return net


def variable_length(name: str) -> bool:
    """Whether network `name` takes windows of any length and any `n_out` (length generalisation)."""
    return getattr(MODELS[name], "variable_length", False)


def can_mask(name: str) -> bool:
    """Whether network `name` can skip masked (padded) input steps."""
    return getattr(MODELS[name], "can_mask", True)


def masked_lstm(lstm: nn.LSTM | nn.GRU, x: Tensor, state, mask: Tensor | None) -> tuple[Tensor, object]:
    """`lstm(x, state)`, except that where `mask` (batch, steps) is False the step is skipped,
    as Keras `Masking` does: the state does not change and the output repeats the last one.
    Also for a GRU (its state is h alone).

    With no mask this is the plain (fast) LSTM call; with one it runs step by step.
    """
    if mask is None:
        return lstm(x, state)
    if state is None:
        zeros = x.new_zeros(lstm.num_layers, x.shape[0], lstm.hidden_size)
        state = (zeros, zeros) if isinstance(lstm, nn.LSTM) else zeros
    outputs = []
    for t in range(x.shape[1]):
        _, new = lstm(x[:, t : t + 1], state)
        keep = mask[:, t].view(1, -1, 1)
        if isinstance(state, Tensor):
            state = torch.where(keep, new, state)
        else:
            state = tuple(torch.where(keep, n, s) for n, s in zip(new, state))
        outputs.append((state if isinstance(state, Tensor) else state[0])[-1])
    return torch.stack(outputs, 1), state


def init_like_keras(net: nn.Module) -> None:
    """Initialise as Keras does, as the tutorial's networks were: Glorot-uniform input
    kernels, orthogonal recurrent kernels, zero biases but 1 for the forget gate
    (`unit_forget_bias`), Glorot-uniform dense layers. It learns the echo about twice as fast
    as PyTorch's default uniform init (README, Performance)."""
    for module in net.modules():
        if isinstance(module, (nn.LSTM, nn.GRU)):  # a GRU as Keras': no forget gate
            for name, param in module.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(param)  # Keras' kernel: (inputs, 4 * units)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(param)
                else:
                    nn.init.zeros_(param)
                    if name.startswith("bias_ih") and isinstance(module, nn.LSTM):
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
