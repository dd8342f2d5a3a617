"""K networks of one topology as one: every weight gets a leading member axis, and every matrix
product is a batched one (`torch.bmm`), so K small networks train in the time of about one.

`torch.func.vmap` cannot do this for `nn.LSTM` (it has no batching rule), so the LSTM cell is
written out here. A stacked network is built from K ordinary networks (`echo.models`), each
made as an independent run makes it, and gives each member's weights back in that network's
own layout (`member_state_dict`). Inputs and outputs carry the member axis first:
x (K, batch, n_in, n_features) -> scores (K, batch, n_out, n_classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echo.encoding import PAD
from echo.models import EncoderDecoder, ManyToOne, OneToOne, Seq2Seq
from echo.windows import generate_sequences, to_windows

STACKABLE = {"seq2seq": Seq2Seq, "encdec": EncoderDecoder, "one_to_one": OneToOne, "many_to_one": ManyToOne}
LSTMS = {Seq2Seq: ("lstm",), EncoderDecoder: ("encoder", "decoder"), OneToOne: ("lstm",), ManyToOne: ("lstm",)}


def _stored(name: str, value: Tensor) -> Tensor:
    """A member's parameter as the stacked network stores it: matrices as (inputs, outputs), so
    that `x @ w` is the layer; biases as (1, outputs), to broadcast over a batch."""
    return value.t() if value.dim() == 2 else value.unsqueeze(0)


class StackedNet(nn.Module):
    """K networks of the same class and sizes, trained as one (see the module docstring).

    The parameters keep the members' names (dots become `__`), so the optimizer state maps back
    to each member's. LSTM biases stay two (input and recurrent) as in `nn.LSTM`: Adam moves each.
    """

    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        first = nets[0]
        if type(first) not in LSTMS:
            raise TypeError(f"{type(first).__name__} has no stacked form")
        self.kind, self.n_members = type(first), len(nets)
        self.n_out = first.n_out
        self.n_classes = getattr(first, "n_classes", None)
        self.names = [name for name, _ in first.named_parameters()]
        self.matrices = {name for name, value in first.named_parameters() if value.dim() == 2}
        for name in self.names:
            values = [dict(net.named_parameters())[name].detach() for net in nets]
            stacked = torch.stack([_stored(name, v) for v in values]).contiguous()
            self.register_parameter(name.replace(".", "__"), nn.Parameter(stacked))
        for lstm in LSTMS[self.kind]:
            module = getattr(first, lstm)
            if module.num_layers != 1 or module.bidirectional or module.proj_size:
                raise TypeError(f"{lstm}: only one-layer unidirectional LSTMs have a stacked form")

    def p(self, name: str) -> Tensor:
        return getattr(self, name.replace(".", "__"))

    def member_state_dict(self, k: int) -> dict[str, Tensor]:
        """Member k's weights in its own network's layout (a `state_dict` of the echo.models class)."""
        out = {}
        for name in self.names:
            out[name] = self.member_layout(name, self.p(name)[k])
        return out

    def member_layout(self, name: str, value: Tensor) -> Tensor:
        """One member's slice of stacked parameter `name` (or of its Adam moments) in its network's layout."""
        value = value.detach()
        return (value.t() if name in self.matrices else value.squeeze(0)).clone()

    # -- layers ----------------------------------------------------------------------------
    def _linear(self, prefix: str, h: Tensor) -> Tensor:
        """(K, ..., inputs) -> (K, ..., outputs) with member k's own weights."""
        k, shape = h.shape[0], h.shape[1:-1]
        w, b = self.p(f"{prefix}.weight"), self.p(f"{prefix}.bias")
        return torch.baddbmm(b, h.reshape(k, -1, h.shape[-1]), w).view(k, *shape, w.shape[-1])

    def _lstm(self, prefix: str, x: Tensor, state, mask: Tensor | None = None):
        """One-layer LSTM over x (K, batch, steps, inputs) from `state` ((h, c), each (K, batch,
        hidden), or None for zeros); gates in nn.LSTM's order (input, forget, cell, output).
        Where `mask` (K, batch, steps) is False the step is skipped as `echo.models.masked_lstm`
        skips it. Returns outputs (K, batch, steps, hidden) and the final (h, c)."""
        w_ih, w_hh = self.p(f"{prefix}.weight_ih_l0"), self.p(f"{prefix}.weight_hh_l0")
        b_ih, b_hh = self.p(f"{prefix}.bias_ih_l0"), self.p(f"{prefix}.bias_hh_l0")
        k, batch, steps, n_in = x.shape
        hidden = w_hh.shape[1]
        inputs = torch.baddbmm(b_ih + b_hh, x.reshape(k, batch * steps, n_in), w_ih).view(k, batch, steps, -1)
        if state is None:
            h = c = x.new_zeros(k, batch, hidden)
        else:
            h, c = state
        outputs = []
        for t in range(steps):
            gates = torch.baddbmm(inputs[:, :, t], h, w_hh)
            i, f, g, o = gates.chunk(4, -1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if mask is None:
                h, c = h_new, c_new
            else:
                keep = mask[:, :, t].unsqueeze(-1)
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            outputs.append(h)
        return torch.stack(outputs, 2), (h, c)

    def _repeated_lstm(self, prefix: str, x: Tensor, steps: int, state):
        """The LSTM fed the same input (K, batch, inputs) at every one of `steps` steps."""
        return self._lstm(prefix, x.unsqueeze(2).expand(-1, -1, steps, -1), state)

    # -- the topologies of echo.models -----------------------------------------------------
    def forward(self, x: Tensor, state=None, mask: Tensor | None = None):
        k, batch = x.shape[:2]
        if self.kind is Seq2Seq:
            h, state = self._lstm("lstm", x, state, mask)
            return self._linear("head", h[:, :, : self.n_out]), state
        if self.kind is EncoderDecoder:
            enc_state, dec_state = state if state is not None else (None, None)
            h, enc_state = self._lstm("encoder", x, enc_state, mask)
            h, dec_state = self._repeated_lstm("decoder", h[:, :, -1], self.n_out, dec_state)
            return self._linear("head", h), (enc_state, dec_state)
        if self.kind is OneToOne:
            h, state = self._lstm("lstm", x.flatten(2).unsqueeze(2), state)
            return self._linear("head", h[:, :, -1]).view(k, batch, self.n_out, self.n_classes), state
        h, state = self._lstm("lstm", x, state, mask)  # ManyToOne
        return self._linear("head", h[:, :, -1]).view(k, batch, self.n_out, self.n_classes), state


def member_loss_sums(rep, scores: Tensor, y: Tensor) -> Tensor:
    """Each member's summed loss (K,) over scores (K, batch, n_out, ...) and targets (K, batch,
    n_out), as its representation's `loss_sum` computes it for one network; PAD counts nowhere."""
    k = y.shape[0]
    if hasattr(rep, "scale"):  # LinearScale
        error = scores.squeeze(-1) - y / rep.scale
        return (error.square() * (y != PAD)).reshape(k, -1).sum(1)
    losses = F.cross_entropy(scores.flatten(0, 2), y.flatten(), ignore_index=PAD, reduction="none")
    return losses.view(k, -1).sum(1)


class MemberAdam:
    """Adam over a stacked network's parameters, one independent Adam per member: Adam is
    element-wise, so this is torch.optim.Adam's update (defaults: betas 0.9, 0.999, eps 1e-8),
    with member k's own learning rate, 0 for a member that is frozen (stopped or failed).

    The learning rates are a tensor (K,): `active` masks them, so a frozen member's weights do
    not move at all, while the others go on. Written with `torch._foreach_*`: a few kernels a
    step for all the parameters.
    """

    def __init__(self, params: list[Tensor], lrs: Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lrs = list(params), lrs
        self.beta1, self.beta2, self.eps, self.step_count = betas[0], betas[1], eps, 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.active = torch.ones_like(lrs, dtype=torch.bool)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        grads = [p.grad for p in self.params]
        torch._foreach_lerp_(self.exp_avg, grads, 1 - self.beta1)
        torch._foreach_mul_(self.exp_avg_sq, self.beta2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1 - self.beta2)
        bias1 = 1 - self.beta1**self.step_count
        bias2_sqrt = (1 - self.beta2**self.step_count) ** 0.5
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, self.eps)
        updates = torch._foreach_div(self.exp_avg, denom)
        step_sizes = torch.where(self.active, self.lrs, 0.0) / bias1
        torch._foreach_mul_(updates, [step_sizes.view(-1, *[1] * (p.dim() - 1)) for p in self.params])
        torch._foreach_sub_(self.params, updates)

    @torch.no_grad()
    def freeze(self, k: int, zero: bool = False) -> None:
        """Member k trains no more; `zero`: also clear its weights and moments (a diverged member,
        whose NaNs would otherwise stay in the arithmetic)."""
        self.active[k] = False
        if zero:
            for t in (*self.params, *self.exp_avg, *self.exp_avg_sq):
                t[k] = 0

    def member_state(self, k: int, names: list[str], layout) -> dict:
        """Member k's moments, in its own network's layout (by parameter name), and the step count."""
        return {
            "step": self.step_count,
            "exp_avg": {n: layout(n, m[k]) for n, m in zip(names, self.exp_avg)},
            "exp_avg_sq": {n: layout(n, v[k]) for n, v in zip(names, self.exp_avg_sq)},
        }


def member_sequences(generators: list[torch.Generator], n_seq: int, length: int, n_unique: int) -> Tensor:
    """Each member's `n_seq` sequences (K, n_seq, length), drawn from its own generator."""
    return torch.stack([generate_sequences(n_seq, length, n_unique, g) for g in generators])


def member_windows(seqs: Tensor, n_in: int, n_out: int, framing: str = "drop") -> tuple[Tensor, Tensor]:
    """`to_windows` for every member: seqs (K, n_seq, length) -> x (K, n_seq, rows, n_in),
    y (K, n_seq, rows, n_out)."""
    x, y = to_windows(seqs.flatten(0, 1), n_in, n_out, framing)
    return x.unflatten(0, seqs.shape[:2]), y.unflatten(0, seqs.shape[:2])


def stacked_batches(x: Tensor, y: Tensor, batch_size: int, stateful: bool) -> list[tuple[Tensor, Tensor]]:
    """`echo.data.to_batches` for every member at once: x, y (K, n_seq, rows, ...) -> the epoch's
    batches, each (K, windows, ...), member k's batch b being exactly its own `to_batches`' batch b."""
    k, n_seq, rows = x.shape[:3]
    if not stateful:
        flat_x, flat_y = x.reshape(k, n_seq * rows, -1), y.reshape(k, n_seq * rows, -1)
        return list(zip(flat_x.split(n_seq * batch_size, 1), flat_y.split(n_seq * batch_size, 1)))

    def interleave(t: Tensor) -> Tensor:
        steps = rows // batch_size
        return t.reshape(k, n_seq, steps, batch_size, -1).transpose(1, 2).reshape(k, steps, n_seq * batch_size, -1)

    return list(zip(interleave(x).unbind(1), interleave(y).unbind(1)))
