"""K networks of one topology as one: every weight gets a leading member axis and every matrix product
is batched (`torch.bmm`), so K small networks train in the time of about one. The LSTM cell is written
out: `torch.func.vmap` has no batching rule for `nn.LSTM`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echo.compat import fused_adam_
from echo.encoding import PAD
from echo.models import EncoderDecoder, ManyToOne, OneToOne, Seq2Seq

STACKABLE = {"seq2seq": Seq2Seq, "encdec": EncoderDecoder, "one_to_one": OneToOne, "many_to_one": ManyToOne}
LSTMS = {Seq2Seq: ("lstm",), EncoderDecoder: ("encoder", "decoder"), OneToOne: ("lstm",), ManyToOne: ("lstm",)}
TOKEN_INPUTS = (Seq2Seq, EncoderDecoder, ManyToOne)  # their first LSTM reads one item per step


def stacked_layout(name: str, value: Tensor) -> Tensor:
    """A member's parameter as stacked: matrices (inputs, outputs) for `x @ w`, biases (1, outputs)."""
    return value.t() if value.dim() == 2 else value.unsqueeze(0)


class StackedNet(nn.Module):
    """K networks (`echo.models`) of one class and size as one: x (K, batch, n_in, n_features), or
    tokens (K, batch, n_in) where `reads_tokens`, -> scores (K, batch, n_out, n_classes). Parameters
    keep the members' names (dots become `__`); LSTM biases stay two, as Adam moves each."""

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
            stacked = torch.stack([stacked_layout(name, v) for v in values]).contiguous()
            self.register_parameter(name.replace(".", "__"), nn.Parameter(stacked))
        for lstm in LSTMS[self.kind]:
            module = getattr(first, lstm)
            if module.num_layers != 1 or module.bidirectional or module.proj_size:
                raise TypeError(f"{lstm}: only one-layer unidirectional LSTMs have a stacked form")
        self._members: Tensor | None = None  # set by `forward` for a pass

    @property
    def reads_tokens(self) -> bool:
        return self.kind in TOKEN_INPUTS

    def p(self, name: str) -> Tensor:
        """Stacked parameter `name`: every member's, or in a pass given `members`, theirs."""
        value = getattr(self, name.replace(".", "__"))
        return value if self._members is None else value[self._members]

    def member_state_dict(self, k: int) -> dict[str, Tensor]:
        """Member k's weights in its own network's layout."""
        return {name: self.member_layout(name, self.p(name)[k]) for name in self.names}

    def member_layout(self, name: str, value: Tensor) -> Tensor:
        """One member's slice of stacked parameter `name` (or of its moments) in its network's layout."""
        value = value.detach()
        return (value.t() if name in self.matrices else value.squeeze(0)).clone()

    def _linear(self, prefix: str, h: Tensor) -> Tensor:
        k, shape = h.shape[0], h.shape[1:-1]
        w, b = self.p(f"{prefix}.weight"), self.p(f"{prefix}.bias")
        h = h.reshape(k, -1, h.shape[-1])
        if torch.is_grad_enabled():
            return torch.baddbmm(b, h, w).view(k, *shape, w.shape[-1])
        # Evaluating: the bias added in place (on a CPU, baddbmm's copy of it costs more than the product).
        return torch.bmm(h, w).add_(b).view(k, *shape, w.shape[-1])

    def _lstm(self, prefix: str, x: Tensor, state, mask: Tensor | None = None):
        """One-layer LSTM: outputs (K, batch, steps, hidden) and final (h, c); steps where `mask` is False
        are skipped, as `echo.models.masked_lstm` skips them."""
        return self._recur(prefix, self._input_gates(prefix, x), state, mask)

    def _recur(self, prefix: str, inputs: Tensor, state, mask: Tensor | None = None):
        w_hh = self.p(f"{prefix}.weight_hh_l0")
        k, batch = inputs.shape[:2]
        if state is None:
            h = c = inputs.new_zeros(k, batch, w_hh.shape[1])
        else:
            h, c = state
        cell = _cell if torch.is_grad_enabled() or inputs.is_cuda else _evaluation_cell
        outputs = []
        for t, step_inputs in enumerate(inputs.unbind(2)):
            h_new, c_new = cell(torch.baddbmm(step_inputs, h, w_hh), c)
            if mask is None:
                h, c = h_new, c_new
            else:
                keep = mask[:, :, t].unsqueeze(-1)
                h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            outputs.append(h)
        return torch.stack(outputs, 2), (h, c)

    def _input_gates(self, prefix: str, x: Tensor) -> Tensor:
        """Input projection plus both biases, (K, batch, steps, 4 hidden). Tokens stand for one-hot codes:
        their weight rows are looked up (the same numbers, no product over zeros). A PAD token's row
        counts nowhere: PAD comes only with a mask, which skips its step."""
        w_ih, bias = self.p(f"{prefix}.weight_ih_l0"), self.p(f"{prefix}.bias_ih_l0") + self.p(f"{prefix}.bias_hh_l0")
        k, n_in = w_ih.shape[:2]
        if x.is_floating_point():
            return torch.baddbmm(bias, x.reshape(k, -1, n_in), w_ih).view(*x.shape[:3], -1)
        offsets = torch.arange(k, device=x.device).view(k, 1, 1) * n_in
        rows = (x.clamp(min=0) + offsets).flatten()
        if torch.is_grad_enabled():
            return w_ih.reshape(k * n_in, -1).index_select(0, rows).view(*x.shape, -1) + bias.unsqueeze(1)
        # Evaluating: the bias added to the table's rows, not to every item's.
        return (w_ih + bias).reshape(k * n_in, -1).index_select(0, rows).view(*x.shape, -1)

    def _repeated_lstm(self, prefix: str, x: Tensor, steps: int, state):
        """The LSTM fed the same input at each of `steps` steps: its input gates computed once."""
        return self._recur(prefix, self._input_gates(prefix, x.unsqueeze(2)).expand(-1, -1, steps, -1), state)

    def forward(self, x: Tensor, state=None, mask: Tensor | None = None, members: Tensor | None = None):
        """Scores and state of every member, or only of `members` (indices): x, state and mask then hold
        only theirs."""
        self._members = members
        try:
            return self._forward(x, state, mask)
        finally:
            self._members = None

    def _forward(self, x: Tensor, state, mask: Tensor | None):
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


def _cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """One LSTM step: the new (h, c) from gates in nn.LSTM's order (input, forget, cell, output)."""
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _evaluation_cell(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """`_cell` (to rounding) for evaluation on a CPU: in place, one sigmoid over all four gates, tanh as
    2 sigmoid(2x) - 1 (torch's CPU tanh takes about three times its sigmoid). Evaluation: a third faster."""
    hidden = c.shape[-1]
    gates[..., 2 * hidden : 3 * hidden] *= 2
    i, f, g, o = gates.sigmoid_().chunk(4, -1)
    c = torch.addcmul(f * c, i, g.mul(2).sub_(1))
    return c.mul(2).sigmoid_().mul_(2).sub_(1).mul_(o), c


def member_loss_sums(rep, scores: Tensor, y: Tensor) -> Tensor:
    """Each member's summed loss (K,), as its representation's `loss_sum`; PAD counts nowhere."""
    k = y.shape[0]
    if hasattr(rep, "scale"):  # LinearScale
        error = scores.squeeze(-1) - y / rep.scale
        return (error.square() * (y != PAD)).reshape(k, -1).sum(1)
    losses = F.cross_entropy(scores.flatten(0, 2), y.flatten(), ignore_index=PAD, reduction="none")
    return losses.view(k, -1).sum(1)


def member_scored(rep, scores: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """`member_loss_sums` and `rep.decode(scores) == y`, without gradients. One-hot on a CPU (where the
    scores' width makes evaluation arithmetic-bound) in fewer passes: from the scores less their
    maximum, log-sum-exp less the target's score; right where only the target's is the maximum (a tie:
    argmax decides, as `decode` does)."""
    if hasattr(rep, "scale") or scores.is_cuda:
        return member_loss_sums(rep, scores, y), rep.decode(scores) == y
    k, real = y.shape[0], y != PAD
    z = scores - scores.amax(-1, keepdim=True)
    at = y.clamp(min=0).unsqueeze(-1)
    target = z.gather(-1, at).squeeze(-1)
    z.scatter_(-1, at, -math.inf)
    best_other = z.amax(-1)
    exp_sums = z.exp_().sum(-1) + target.exp()
    loss_sums = ((exp_sums.log() - target) * real).view(k, -1).sum(1)
    at_max = target == 0
    right = at_max & (best_other < 0)
    tied = at_max & (best_other == 0)
    if tied.any():
        right[tied] = rep.decode(scores[tied]) == y[tied]
    return loss_sums, right


class MemberOptimizer:
    """An element-wise optimizer over stacked parameters, so K independent ones, member k with its own
    learning rate; a frozen member is not updated. Members sharing a learning rate step in one call."""

    MOMENTS: tuple[str, ...] = ()

    def __init__(self, params: list[Tensor], lrs):
        self.params, self.lrs = list(params), [float(lr) for lr in lrs]
        for moment in self.MOMENTS:
            setattr(self, moment, [torch.zeros_like(p) for p in self.params])
        # On the device, where the kernels read it: a CUDA graph's replay counts its steps too.
        self._step = torch.zeros((), device=self.params[0].device)
        self._group(active=range(len(self.lrs)))

    def _group(self, active) -> None:
        """The members still training, by learning rate: one kernel call each."""
        self.groups: dict[float, list[int]] = {}
        for k in active:
            self.groups.setdefault(self.lrs[k], []).append(k)

    def _tensors(self, members: list[int]) -> list[list[Tensor]]:
        """[params, grads, *moments] of `members`: whole, or each member's slices (views)."""
        tensors = [self.params, [p.grad for p in self.params], *(getattr(self, m) for m in self.MOMENTS)]
        if len(members) < len(self.lrs):
            tensors = [[t[k] for t in group for k in members] for group in tensors]
        return tensors

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def freeze(self, k: int, zero: bool = False) -> None:
        """Member k trains no more; `zero`: also clear its weights and moments (a diverged member's NaNs)."""
        self._group(active=sorted(j for members in self.groups.values() for j in members if j != k))
        if zero:
            for t in (*self.params, *(t for m in self.MOMENTS for t in getattr(self, m))):
                t[k] = 0

    @torch.no_grad()
    def load_member_state(self, k: int, state: dict, names: list[str], layout) -> None:
        """Member k's moments and step count from `member_state`'s (the step count is shared)."""
        for moment in self.MOMENTS:
            for i, name in enumerate(names):
                getattr(self, moment)[i][k].copy_(layout(name, state[moment][name]))
        self._step.fill_(state["step"])

    def member_state(self, k: int, names: list[str], layout) -> dict:
        """Member k's moments in its own network's layout, and the step count."""
        state: dict = {"step": int(self._step)}
        for moment in self.MOMENTS:
            state[moment] = {n: layout(n, m[k]) for n, m in zip(names, getattr(self, moment))}
        return state


class MemberAdam(MemberOptimizer):
    """torch.optim.Adam per member, by the fused kernel an independent run's `Adam(fused=True)` runs."""

    MOMENTS = ("exp_avg", "exp_avg_sq")
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    @torch.no_grad()
    def step(self) -> None:
        self._step += 1
        for lr, members in self.groups.items():
            tensors = self._tensors(members)
            fused_adam_(
                *tensors,
                [self._step] * len(tensors[0]),
                lr=lr,
                beta1=self.beta1,
                beta2=self.beta2,
                eps=self.eps,
            )


class MemberRMSprop(MemberOptimizer):
    """torch.optim.RMSprop per member (not centred, no momentum), `alpha` 0.9 as a single run's."""

    MOMENTS = ("square_avg",)
    alpha, eps = 0.9, 1e-8

    @torch.no_grad()
    def step(self) -> None:
        self._step += 1
        for lr, members in self.groups.items():
            for param, grad, square_avg in zip(*self._tensors(members)):
                square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
                param.addcdiv_(grad, square_avg.sqrt().add_(self.eps), value=-lr)


MEMBER_OPTIMIZERS = {"adam": MemberAdam, "rmsprop": MemberRMSprop}  # model.optimizer
