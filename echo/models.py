"""The networks: plain nn.Modules with explicit sizes; they never see the config (docs/models.md).

Each maps features (batch, n_in, n_features) and a state (None: zeros) to scores (batch, n_out,
n_classes) and its new state. `variable_length` ones take any window length and `n_out`;
`teacher_forced` ones also take the target tokens."""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

State = tuple  # nested tuples of (h, c) tensors, one pair per LSTM (a GRU's state is h alone)

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


def rnn(cell: str, input_size: int, hidden_size: int, num_layers: int = 1) -> nn.LSTM | nn.GRU:
    if cell not in CELLS:
        raise ValueError(f"cell={cell!r} is unknown: use one of {', '.join(CELLS)}")
    return CELLS[cell](input_size, hidden_size, num_layers=num_layers, batch_first=True)


class Seq2Seq(nn.Module):
    """Listing A: `LSTM(hidden, return_sequences)` → `TimeDistributed(Dense(n_classes))`; the first
    `n_out` steps are the echo."""

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
    """Listing B: `LSTM(hidden)` → `RepeatVector(n_out)` → `LSTM(hidden, return_sequences)` →
    `TimeDistributed(Dense(n_classes))`. As in Keras, the decoder starts from its own state."""

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
    """Extension 5, one-to-one: the flattened window read in one step by `LSTM(hidden)` (so it keeps
    a state), then `Dense(n_out * n_classes)`. It cannot mask: padding is inside its single step."""

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
    """Extension 5, many-to-one: `LSTM(hidden)`'s last output → `Dense(n_out * n_classes)`."""

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
    """Encoder-decoder with (Luong, dot) attention; the decoder is fed a learned embedding of output
    position j and predicts from `tanh(W [context; decoder output])`, all steps in one call.

    The same position table is added to the keys: without it, on windows of 20, nothing was learned
    after 100 steps; with it, 0.8 token accuracy after 60.
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
    """Sequence-to-sequence with an autoregressive decoder (Sutskever et al. 2014), no attention. In
    training it is fed the true previous token with probability `teacher_forcing` (below 1: scheduled
    sampling), else its own prediction; `targets` given in evaluation are always fed."""

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
    """A small non-autoregressive Transformer: the embedded items plus n_out query slots (a learned
    query plus position j's encoding, item j's) through pre-norm self-attention layers. No dropout
    (fresh data every epoch), feed-forward width `hidden_size`, no state."""

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
    """Vaswani et al.'s (2017) encodings of positions 0 .. n-1."""
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
NET_OPTIONS = ("cell", "num_layers", "max_len", "teacher_forcing", "d_model", "n_layers", "n_heads", "positional")


def build_net(
    name: str, n_in: int, n_features: int, hidden_size: int, n_classes: int, n_out: int, **options
) -> nn.Module:
    """Network `name`; each of `options` (NET_OPTIONS) goes to the networks that take it. Its arguments
    are kept as `build_args`, to build a stored network again (echo/reuse.py)."""
    cls = MODELS[name]
    sizes = dict(n_features=n_features, hidden_size=hidden_size, n_classes=n_classes, n_out=n_out)
    accepted = inspect.signature(cls).parameters
    sizes |= {k: v for k, v in options.items() if k in accepted and v is not None}
    net = cls(n_in=n_in, **sizes) if getattr(cls, "needs_n_in", False) else cls(**sizes)
    net.build_args = {"name": name, "n_in": n_in, **sizes}
    return net


def variable_length(name: str) -> bool:
    """Whether network `name` takes windows of any length and any `n_out`."""
    return getattr(MODELS[name], "variable_length", False)


def can_mask(name: str) -> bool:
    """Whether network `name` can skip masked (padded) input steps."""
    return getattr(MODELS[name], "can_mask", True)


def masked_lstm(lstm: nn.LSTM | nn.GRU, x: Tensor, state, mask: Tensor | None) -> tuple[Tensor, object]:
    """`lstm(x, state)` skipping the steps where `mask` is False, as Keras `Masking` does (the state
    stays, the output repeats); step by step with a mask."""
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
    """Initialise as Keras does (Glorot, orthogonal, forget-gate bias 1): it learns the echo about twice
    as fast as PyTorch's default init (README, Performance)."""
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
    """The state with no gradient history."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return tuple(detach_state(s) for s in state)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
