"""A bare PyTorch loop for the echo tutorial's listings, written plainly, imports torch only.

It does the harness's work step for step: the same networks, fresh sequences every epoch,
the same stateful batches, Adam, validation every N epochs on the same held-out windows,
the same stopping rule. It prints one JSON line of results. Used by benchmarks/speed.py.

    python benchmarks/bare_loop.py --model encdec --n-out 2 --batch-size 21 --sequences 8 --lr 1e-2
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn


class Seq2Seq(nn.Module):
    def __init__(self, n_unique, hidden, n_out):
        super().__init__()
        self.n_out = n_out
        self.lstm = nn.LSTM(n_unique, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_unique)
        init_like_keras(self)

    def forward(self, x, state):
        h, state = self.lstm(x, state)
        return self.head(h[:, : self.n_out]), state


class EncDec(nn.Module):
    def __init__(self, n_unique, hidden, n_out):
        super().__init__()
        self.n_out = n_out
        self.encoder = nn.LSTM(n_unique, hidden, batch_first=True)
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_unique)
        init_like_keras(self)

    def forward(self, x, state):
        enc, dec = state if state is not None else (None, None)
        h, enc = self.encoder(x, enc)
        h, dec = self.decoder(h[:, -1:].expand(-1, self.n_out, -1), dec)
        return self.head(h), (enc, dec)


def init_like_keras(net):
    """Keras' initialisers, as the tutorial's networks had (and the harness's have)."""
    for m in net.modules():
        if isinstance(m, nn.LSTM):
            for name, p in m.named_parameters():
                if name.startswith("weight_ih"):
                    nn.init.xavier_uniform_(p)
                elif name.startswith("weight_hh"):
                    nn.init.orthogonal_(p)
                else:
                    nn.init.zeros_(p)
                    if name.startswith("bias_ih"):
                        p.data.chunk(4)[1].fill_(1.0)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def detach(state):
    return tuple(detach(s) for s in state) if isinstance(state, tuple) else state.detach()


def windows(seqs, n_in, n_out, batch_size):
    """Stateful batches: batch k holds windows k*B..(k+1)*B-1 of every sequence."""
    x = seqs.unfold(1, n_in, 1)
    n_seq, rows = x.shape[:2]
    steps = rows // batch_size

    def interleave(t):
        return t.reshape(n_seq, steps, batch_size, -1).transpose(0, 1).reshape(steps, n_seq * batch_size, -1)

    return list(zip(interleave(x), interleave(x[..., :n_out])))


def evaluate(model, batches, n_unique):
    correct = exact = tokens = rows = 0
    state = None
    with torch.no_grad():
        for x, y in batches:
            logits, state = model(F.one_hot(x, n_unique).float(), state)
            hit = logits.argmax(-1) == y
            correct, tokens = correct + hit.sum().item(), tokens + hit.numel()
            exact, rows = exact + hit.all(-1).sum().item(), rows + len(y)
    return correct / tokens, exact / rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="seq2seq", choices=["seq2seq", "encdec"])
    p.add_argument("--hidden", type=int, default=20)
    p.add_argument("--n-in", type=int, default=5)
    p.add_argument("--n-out", type=int, default=5)
    p.add_argument("--length", type=int, default=25)
    p.add_argument("--n-unique", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=7)
    p.add_argument("--sequences", type=int, default=1, help="fresh sequences per epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=500)
    p.add_argument("--val-every", type=int, default=10)
    p.add_argument("--target", type=float, default=0.99)
    p.add_argument("--stop-at", type=float, default=None)
    p.add_argument("--eval-windows", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda: the model and every batch live there")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    model = (EncDec if a.model == "encdec" else Seq2Seq)(a.n_unique, a.hidden, a.n_out).to(a.device)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr, fused=True)
    rows = a.length - a.n_in + 1
    n_eval = -(-a.eval_windows // rows)

    def held_out(seed):
        seqs = torch.randint(0, a.n_unique, (n_eval, a.length), generator=torch.Generator().manual_seed(seed))
        return windows(seqs.to(a.device), a.n_in, a.n_out, a.batch_size)

    val, test = held_out(1001), held_out(1002)
    g = torch.Generator(a.device).manual_seed(a.seed)

    start = time.perf_counter()
    result = {"time_to_target_s": None, "epochs_to_target": None}
    for epoch in range(1, a.epochs + 1):
        model.train()
        state = None  # reset_states(): a new sequence
        seqs = torch.randint(0, a.n_unique, (a.sequences, a.length), generator=g, device=a.device)
        for x, y in windows(seqs, a.n_in, a.n_out, a.batch_size):
            logits, state = model(F.one_hot(x, a.n_unique).float(), state)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            state = detach(state)
        if epoch % a.val_every == 0 or epoch == a.epochs:
            model.eval()
            _, exact = evaluate(model, val, a.n_unique)
            if exact >= a.target and result["epochs_to_target"] is None:
                result.update(time_to_target_s=time.perf_counter() - start, epochs_to_target=epoch)
            if a.stop_at is not None and exact >= a.stop_at:
                break
    result["train_time_s"] = time.perf_counter() - start
    result["epochs"] = epoch
    result["threads"] = a.threads
    result["val_exact_match"] = exact
    result["test_token_acc"], result["test_exact_match"] = evaluate(model, test, a.n_unique)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
