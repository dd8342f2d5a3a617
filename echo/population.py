"""A population: K runs whose configs differ only in settings that leave every tensor's shape
alone (seed, learning rate, ...), trained as one stacked model in one process (docs/populations.md).

Each member is an honest run: its own network, built under its own seed exactly as
`echo.train` builds it, its own training data (its own generator, seeded as `echo.data.EchoData`
seeds it), its own Adam or RMSprop (`echo.stacked.MemberAdam`, `MemberRMSprop`: element-wise, so one over the
stacked weights is K independent ones), its own validation, stopping, metrics and MLflow run. The loss is the sum
of the members' mean losses, so each member's gradient is the one it would have alone. A member
that reaches `stop_at` is frozen (its updates masked) while the others go on; one whose loss
becomes NaN or infinite ends FAILED and the others go on; an interrupt (Ctrl-C, SIGTERM) ends
every member KILLED with a checkpoint. The loop is a plain PyTorch loop (no Lightning): a member's
step is the same computation as an independent run's, batch for batch.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from echo.compat import reuse_freed_memory
from echo.encoding import PAD, OneHot, representation
from echo.faults import TrainingError, check_finite
from echo.models import build_net, count_parameters, detach_state
from echo.policy import cpu_threads, wide_step
from echo.reuse import save_network
from echo.speedups import EpochGraph
from echo.stacked import (
    MEMBER_OPTIMIZERS,
    STACKABLE,
    StackedNet,
    member_loss_sums,
    member_scored,
    member_sequences,
    member_windows,
    stacked_batches,
    stacked_layout,
)
from echo.steps import StepSettings
from echo.summary import summary_line
from echo.task import windows_per_sequence
from echo.tracking import Tracker, log_artifacts, start_tracker
from echo.windows import Draw, before_first_error

POPULATION_TAG = "echo.population"
CHECKPOINT = "population.pt"  # in each member's artifacts, under checkpoints/
MEMBER_STATE = ("state_dict", "adam", "generator", "epochs_done", "summary")  # what CHECKPOINT holds ("adam":
# the member's optimizer state, Adam's or RMSprop's moments, under the name it always had)
# Settings that may differ between the members of one population: none changes a tensor's shape,
# the data's framing or the training's cadence. (progress and objective change nothing trained.)
MEMBER_SETTINGS = ("seed", "model.lr", "target", "stop_at", "objective", "progress")


def why_not_stackable(cfg: DictConfig) -> str | None:
    """Why a run of `cfg` cannot be a population member (None if it can)."""
    model, task = cfg.model, cfg.task
    if model.name not in STACKABLE:
        return f"model={model.name} has no stacked form"
    if model.get("cell", "lstm") != "lstm":
        return f"model.cell={model.cell} has no stacked form (lstm only)"
    if model.get("num_layers", 1) != 1:
        return f"model.num_layers={model.num_layers} has no stacked form (one layer only)"
    if task.get("name") == "copy_memory":
        return "task=copy_memory has no stacked form"
    for key in ("resume", "evaluate"):
        if cfg.get(key):
            return f"{key}={cfg.get(key)} continues or reads one run"
    for key in ("train_lengths", "test_lengths"):
        if task.get(key) is not None:
            return f"task.{key} varies tensor shapes"
    return None


def population_key(cfg: DictConfig) -> str:
    """Runs whose configs have the same key can train as one population: the config without
    MEMBER_SETTINGS."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    for path in MEMBER_SETTINGS:
        *parents, leaf = path.split(".")
        node = tree
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return repr(sorted(_flat_items(tree)))


def _flat_items(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", repr(value)


@dataclass(eq=False)  # a member is itself alone: finding it in a list compares no configs
class Member:
    """One run of the population: its config (resolved and checked, as run.py leaves it), run name
    and tags, and what it has done so far."""

    cfg: DictConfig
    run_name: str
    tags: dict[str, str]
    tracker: Tracker | None = None
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    status: str = "RUNNING"  # RUNNING (training), STOPPED (trained, not yet tested), FINISHED, FAILED, KILLED
    error: str | None = None
    sent: int = 0  # rows of `history` handed to the tracker

    def send(self) -> None:
        if self.tracker:
            self.tracker.log_metrics(self.history[self.sent :])
        self.sent = len(self.history)


def _device(cfg: DictConfig) -> torch.device:
    """trainer.accelerator's device; on a GPU, trainer.devices=[i]'s (echo.config allows one device)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        devices = cfg.trainer.get("devices", 1)
        return torch.device("cuda", int(devices[0])) if not isinstance(devices, (int, str)) else torch.device("cuda")
    return torch.device("cpu")


def _dtype(cfg: DictConfig) -> torch.dtype:
    """The weights' and inputs' type trainer.precision asks for (echo.config allows 32 and 64 only)."""
    return torch.float64 if str(cfg.trainer.get("precision", "32")).startswith("64") else torch.float32


def train_population(
    members: list[Member], population_id: str | None, threads: int, restore: dict | list[dict] | None = None
) -> list[Member]:
    """Train the members as one population; return them with their status and summary.

    Every member's config must have the same `population_key`. Each starts an MLflow run (tagged
    `echo.population=<population_id>`, if given) if its logger is mlflow. KeyboardInterrupt (Ctrl-C,
    or SIGTERM as the sweep turns it) propagates after every member has ended KILLED with a
    checkpoint. `restore`: each member's checkpoint (CHECKPOINT's contents; one for a population of one),
    for members that continue, all saved after the same epoch by one population (`can_restore_together`).
    """
    for member in members:
        if population_id is not None:
            member.tags = {**member.tags, POPULATION_TAG: population_id}
        if member.cfg.logger.name == "mlflow":
            member.tracker = start_tracker(member.cfg, member.run_name, member.tags)
            member.tracker.log_text(OmegaConf.to_yaml(member.cfg, resolve=True), "config.yaml")  # there while it runs
    population = None
    try:
        population = _Population(members, threads, restore)
        population.fit()
    except BaseException as exception:
        interrupted = isinstance(exception, KeyboardInterrupt)
        if population is not None:
            population.flush_train_metrics()  # the metrics so far are kept, as an independent run keeps them
            if interrupted:
                population.save_checkpoints()
        error = None if interrupted else traceback.format_exc()
        for member in members:
            if member.status in ("RUNNING", "STOPPED"):
                member.status, member.error = ("KILLED", None) if interrupted else ("FAILED", error)
        raise
    finally:
        for member in members:
            if member.tracker:
                member.send()
                member.tracker.end(member.status, member.error)
    return members


def restored_together(state: dict) -> tuple[int, int]:
    """Checkpoints (CHECKPOINT's contents) of members that can continue as one population have the same
    epoch count and Adam step count (one for all of a population's members): this pair."""
    return int(state["epochs_done"]), int(state["adam"]["step"])


def can_restore_together(states: list[dict]) -> bool:
    return len({restored_together(state) for state in states}) == 1


class _Population:
    """The stacked model, its members' data and optimizer, and the training loop."""

    def __init__(self, members: list[Member], threads: int, restore: dict | list[dict] | None = None):
        restore = [restore] if isinstance(restore, dict) else restore
        assert restore is None or (len(restore) == len(members) and can_restore_together(restore)), restore
        self.members = members
        cfg = members[0].cfg
        self.task, self.model_cfg, self.trainer_cfg = cfg.task, cfg.model, cfg.trainer
        task, model = cfg.task, cfg.model
        # The set-up (weights, held-out data) on one thread, the training on `threads`: while the
        # sweep starts, its tracking service is busy on the other core, and a second thread's
        # share of each operation would wait for it (0.5-1 s for listing B's eight networks).
        torch.set_num_threads(1)
        reuse_freed_memory()
        self.threads = threads
        self.device, self.dtype = _device(cfg), _dtype(cfg)
        self.steps = StepSettings.from_trainer(cfg.trainer)  # clipping (per member) and accumulation
        self.rep = representation(task)
        nets = []
        for member in members:  # as echo.train builds an independent run's network
            torch.manual_seed(member.cfg.seed)
            nets.append(
                build_net(
                    model.name,
                    n_in=task.n_in,
                    n_features=self.rep.n_features,
                    hidden_size=model.hidden_size,
                    n_classes=self.rep.n_outputs,
                    n_out=task.n_out,
                ).to(self.dtype)
            )
        for net, state in zip(nets, restore or []):
            net.load_state_dict({name.removeprefix("net."): w for name, w in state["state_dict"].items()})
        for member, net in zip(members, nets):
            if member.tracker:  # as an independent run logs it
                member.tracker.log_params({"n_params": count_parameters(net)})
        self.net = StackedNet(nets).to(self.device)  # (float64 already, with trainer.precision=64)
        self.nets = nets  # each member's own network, to store its trained weights in (echo.reuse)
        self.tokens = isinstance(self.rep, OneHot) and self.net.reads_tokens  # one-hot codes as their tokens
        optimizer = MEMBER_OPTIMIZERS[model.get("optimizer", "adam")]  # MemberAdam or MemberRMSprop
        self.optimizer = optimizer(list(self.net.parameters()), [float(m.cfg.model.lr) for m in members])
        self.generators = [torch.Generator(self.device).manual_seed(m.cfg.seed) for m in members]
        self.draw = Draw(self._fresh_batches, tuple(self.generators))
        # On a GPU an epoch is replayed as one CUDA graph, as an independent run's is.
        self.graph = EpochGraph() if self.device.type == "cuda" and cfg.get("cuda_graph", True) else None
        self.stateful, self.mask_inputs = bool(model.stateful), task.framing == "mask"
        self.reverse = {key: bool(task.get(key, False)) for key in ("reverse_input", "reverse_target")}
        self.windows_per_epoch = task.sequences_per_epoch * windows_per_sequence(task)
        n_seq = -(-task.eval_windows // windows_per_sequence(task))
        k = len(members)
        self.val = self._eval_batches(*self._held_out(n_seq, [task.val_seed] * k))
        self.test = self._eval_batches(*self._held_out(n_seq, [task.test_seed] * k))
        self.epochs_done = 0
        self._train_sums: list[tuple[int, Tensor, list[bool]]] = []
        # On a CPU a wide step is arithmetic-bound: members that have stopped are then left out of
        # the forward and backward (`_freeze`), not only of Adam's step.
        self.compact = self.device.type == "cpu" and wide_step(cfg, k)
        self._training: Tensor | None = None  # the members still training, once one has stopped
        if restore is not None:
            self._restore(restore)

    def _restore(self, states: list[dict]) -> None:
        """Continue the members from their checkpoints: their Adam, data generators, epochs and
        summaries (their weights were loaded into their networks before stacking)."""
        for k, state in enumerate(states):
            self.optimizer.load_member_state(k, state["adam"], self.net.names, stacked_layout)
            self.generators[k].set_state(state["generator"])
            self.members[k].summary.update(state["summary"])
        self.epochs_done = int(states[0]["epochs_done"])

    # -- data --------------------------------------------------------------------------------
    def _held_out(self, n_seq: int, seeds: list[int]) -> tuple[Tensor, Tensor]:
        """Fixed windows from `n_seq` sequences per member, member k's drawn with seeds[k] on the
        CPU and moved to the device, as `echo.data.held_out` draws them."""
        t = self.task
        seqs = member_sequences([torch.Generator().manual_seed(s) for s in seeds], n_seq, t.length, t.n_unique)
        return member_windows(seqs.to(self.device), t.n_in, t.n_out, t.framing, **self.reverse)

    def _eval_batches(self, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
        """As `EchoData.eval_batches`: stateful batch by batch, stateless all windows at once."""
        if self.stateful:
            return stacked_batches(x, y, self.model_cfg.batch_size, stateful=True)
        return stacked_batches(x, y, x.shape[2], stateful=False)

    def _fresh_batches(self) -> list[tuple[Tensor, Tensor]]:
        """One epoch: each member's `sequences_per_epoch` fresh sequences from its own generator,
        framed and batched as `EchoData.fresh_batches` does."""
        t = self.task
        seqs = member_sequences(self.generators, t.sequences_per_epoch, t.length, t.n_unique)
        x, y = member_windows(seqs, t.n_in, t.n_out, t.framing, **self.reverse)
        return stacked_batches(x, y, self.model_cfg.batch_size, self.stateful)

    def _forward_batches(self, batches, index: Tensor | None = None):
        """(scores, targets) batch by batch, state carried (detached) if stateful, zeros first; of
        every member, or of the members `index` holds only, whose batches hold theirs only."""
        state = None
        for x, y in batches:
            mask = x != PAD if self.mask_inputs else None
            inputs = x if self.tokens else self.rep.encode(x).to(self.dtype)
            scores, state = self.net(inputs, state if self.stateful else None, mask, members=index)
            yield scores, y
            state = detach_state(state)

    def _indices(self, members: list[Member]) -> Tensor | None:
        """The members' indices in the population, on the device; None for all of them."""
        if len(members) == len(self.members):
            return None
        return torch.tensor([self.members.index(m) for m in members], dtype=torch.long, device=self.device)

    # -- training ------------------------------------------------------------------------------
    def train_epoch(self) -> Tensor:
        """One epoch on fresh data: `_train_epoch`, replayed as a CUDA graph once captured on a GPU."""
        return self.graph(self._train_epoch, self.draw) if self.graph else self._train_epoch(self.draw())

    def _train_epoch(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One epoch for every member on its batches; returns per member [summed loss, correct
        tokens, tokens] (3, K), on the device. Nothing in it reads a value back to the host, so a
        CUDA graph can capture it."""
        index = self._training  # None: every member trains
        if index is not None:
            batches = [(x[index], y[index]) for x, y in batches]
        steps, scale = self.steps, self.steps.loss_scale()
        sums = []
        for i, (scores, y) in enumerate(self._forward_batches(batches, index)):
            tokens = (y != PAD).flatten(1).sum(1)
            loss_sums = member_loss_sums(self.rep, scores, y)
            if steps.zero_before(i):
                self.optimizer.zero_grad()
            mean_losses = loss_sums / tokens * scale if scale != 1 else loss_sums / tokens
            mean_losses.sum().backward()  # each member's gradient: that of its own mean loss
            if steps.step_after(i, len(batches)):
                steps.clip(self.optimizer.params, members=True)  # each member's own norm
                self.optimizer.step()
            correct = (self.rep.decode(scores.detach()) == y).flatten(1).sum(1)
            sums.append(torch.stack([loss_sums.detach(), correct, tokens]))
        if index is None:
            return torch.stack(sums).sum(0)
        every = sums[0].new_zeros(3, len(self.members))  # (the members that no longer train: zeros)
        return every.index_copy_(1, index, torch.stack(sums).sum(0))

    def fit(self) -> None:
        torch.set_num_threads(self.threads)
        every = self.trainer_cfg.get("check_val_every_n_epoch", 1) or 1
        self._t0 = time.perf_counter()
        bar = self._progress_bar()
        for epoch in range(self.epochs_done + 1, self.trainer_cfg.max_epochs + 1):
            active = [m.status == "RUNNING" for m in self.members]
            self._train_sums.append((epoch, self.train_epoch(), active))
            self.epochs_done = epoch
            if bar is not None:
                bar.update(1)
            if epoch % every == 0:
                self._validate(epoch)
            if not any(m.status == "RUNNING" for m in self.members):
                break
        else:  # max_epochs: the members still training end here
            self.flush_train_metrics()
            self._check_finite()
            last = self._running()
            for member in last:
                self._stop(member, self.epochs_done)
            self._finish(last)
        if bar is not None:
            bar.close()

    def _progress_bar(self):
        if not self.members[0].cfg.get("progress"):
            return None
        from tqdm import tqdm

        return tqdm(total=self.trainer_cfg.max_epochs, unit="epoch", mininterval=0.25, dynamic_ncols=True)

    def _running(self) -> list[Member]:
        return [m for m in self.members if m.status == "RUNNING"]

    def _stop(self, member: Member, epoch: int) -> None:
        member.status = "STOPPED"
        member.summary.update(train_time_s=time.perf_counter() - self._t0, epochs=epoch)
        self._freeze(member)
        if member.tracker:  # its history is complete: the worker draws the curve while the others train
            member.tracker.log_learning_curve(member.history, member.cfg.target)

    def _freeze(self, member: Member, zero: bool = False) -> None:
        """The member trains no more (see `MemberAdam.freeze`). A captured epoch updates the members
        that trained when it was captured: it is captured again at the next epoch. Where a step is
        arithmetic-bound (a wide step on a CPU), the others now train without it."""
        self.optimizer.freeze(self.members.index(member), zero)
        if self.graph is not None:
            self.graph.reset()
        if self.compact:
            self._training = self._indices(self._running())

    def flush_train_metrics(self) -> None:
        """Per-epoch training metrics into each member's history, for the epochs it trained."""
        if not self._train_sums:
            return
        sums = torch.stack([s for _, s, _ in self._train_sums]).tolist()  # (epochs, 3, K)
        for (epoch, _, active), (loss_sums, correct, tokens) in zip(self._train_sums, sums):
            for k, member in enumerate(self.members):
                if active[k]:
                    member.history += [
                        ("train/loss", epoch, loss_sums[k] / tokens[k]),
                        ("train/acc", epoch, correct[k] / tokens[k]),
                    ]
        self._train_sums = []

    @torch.no_grad()
    def _evaluate(self, batches, index: Tensor | None = None, by_position: bool = False):
        """Per member (every one, or those `index` holds) [summed loss, correct tokens, tokens, exact
        rows, rows, tokens before each row's first error] (lists of 6); with `by_position`, also per
        member the token accuracy at each output position (lists of n_out)."""
        if index is not None:
            batches = [(x[index], y[index]) for x, y in batches]
        total = correct_at = real_at = 0
        for scores, y in self._forward_batches(batches, index):
            real = y != PAD
            loss_sums, right = member_scored(self.rep, scores, y)
            correct = right & real
            exact = (correct | ~real).all(-1) & real.any(-1)
            counts = [loss_sums, correct.flatten(1).sum(1), real.flatten(1).sum(1)]
            counts += [exact.sum(1), real.any(-1).sum(1), before_first_error(correct, real).flatten(1).sum(1)]
            total = total + torch.stack([c.float() for c in counts], 1)
            if by_position:
                correct_at, real_at = correct_at + correct.sum(1), real_at + real.sum(1)
        if not by_position:
            return total.tolist()
        return total.tolist(), (correct_at / real_at.clamp(min=1)).tolist()

    def _validate(self, epoch: int) -> None:
        """As an independent run validates (the members still training): metrics, target, stop_at;
        then the NaN check, and the test of the members that stopped."""
        running = self._running()
        self.flush_train_metrics()
        results = self._evaluate(self.val, self._indices(running))
        now = time.perf_counter() - self._t0
        stopped = []
        for member, (loss_sum, correct, tokens, exact, rows, before_error) in zip(running, results):
            metrics = {
                "val/loss": loss_sum / tokens,
                "val/token_acc": correct / tokens,
                "val/exact_match": exact / rows,
                "val/prefix_acc": before_error / tokens,
            }
            member.history += [(name, epoch, value) for name, value in metrics.items()]
            member.summary.update(metrics)
            cfg = member.cfg
            if metrics["val/exact_match"] >= cfg.target and "epochs_to_target" not in member.summary:
                member.summary.update(
                    time_to_target_s=now, epochs_to_target=epoch, samples_to_target=epoch * self.windows_per_epoch
                )
            if cfg.stop_at is not None and metrics["val/exact_match"] >= cfg.stop_at:
                self._stop(member, epoch)
                stopped.append(member)
        self._check_finite(running)
        for member in running:
            member.send()
        self._finish([m for m in stopped if m.status == "STOPPED"])

    def _check_finite(self, members: list[Member] | None = None) -> None:
        """A member whose loss became NaN or infinite ends FAILED (as `echo.faults.check_finite`
        ends an independent run); the others go on."""
        for member in members if members is not None else self._running():
            try:
                check_finite(member.history[member.sent :], member.cfg.model.lr)
            except TrainingError as error:
                member.status, member.error = "FAILED", f"echo.faults.TrainingError: {error}\n"
                self._freeze(member, zero=True)
                print(f"echo: run failed: {member.run_name}: {error}", file=sys.stderr)

    # -- the end -------------------------------------------------------------------------------
    def _finish(self, members: list[Member]) -> None:
        """Test members that stopped training, store their networks, print and log what an
        independent run does at its end. Their weights no longer change, so this runs as soon as they
        stop: the tracking process writes their figures and files while the others train on."""
        if not members:
            return
        index = self._indices(members)
        results, positions = self._evaluate(self.test, index, by_position=True)
        tables = self._expected_predicted(members, index)
        chance = 1 / self.task.n_unique  # a uniform guess per token
        for member, (_, correct, tokens, exact, rows, before_error), at, table in zip(
            members, results, positions, tables
        ):
            member.summary.update({"test/token_acc": correct / tokens, "test/exact_match": exact / rows})
            member.summary["test/prefix_acc"] = before_error / tokens
            member.summary.update({"chance/token_acc": chance, "chance/exact_match": chance**self.task.n_out})
            print(f"{member.run_name}: {summary_line(member.summary)}")
            if member.tracker:
                epochs = member.summary["epochs"]
                final = [(n, epochs, v) for n, v in member.summary.items() if not n.startswith("val/")]
                member.send()
                by_position = [("test/token_acc_by_position", j, acc) for j, acc in enumerate(at, 1)]
                member.tracker.log_metrics(final + by_position)
                member.tracker.log_by_position_plot(at, chance)
                member.tracker.log_text(table + "\n", "expected_predicted.txt")
                save_network(self._member_net(member), OmegaConf.to_yaml(member.cfg, resolve=True), member.tracker)
                member.tracker.end_soon("FINISHED")  # written while the others train
            member.status = "FINISHED"

    def _member_net(self, member: Member) -> torch.nn.Module:
        """The member's own network (echo.models), holding its trained weights."""
        k = self.members.index(member)
        self.nets[k].load_state_dict(self.net.member_state_dict(k))
        return self.nets[k]

    @torch.no_grad()
    def _expected_predicted(self, members: list[Member], index: Tensor | None) -> list[str]:
        """Each member's tutorial evaluation: one fresh sequence of its own (seed 10,000 + seed);
        `index`: the members' indices (`_indices`)."""
        x, y = self._held_out(1, [10_000 + m.cfg.seed for m in members])
        batches = self._eval_batches(x, y)
        predicted = torch.cat([self.rep.decode(s) for s, _ in self._forward_batches(batches, index)], 1)
        return [
            "\n".join(f"Expected: {e} Predicted {p}" for e, p in zip(y[j, 0].tolist(), predicted[j].tolist()))
            for j in range(len(members))
        ]

    def member_state(self, k: int) -> dict:
        """Member k's checkpoint (MEMBER_STATE): its weights in its own network's layout (under
        `net.`, as in a Lightning checkpoint), Adam moments and step, data generator, epochs and summary."""
        member = self.members[k]
        return {
            "state_dict": {f"net.{n}": v for n, v in self.net.member_state_dict(k).items()},
            "adam": self.optimizer.member_state(k, self.net.names, self.net.member_layout),
            "generator": self.generators[k].get_state(),
            "epochs_done": self.epochs_done if member.status == "RUNNING" else member.summary["epochs"],
            "summary": dict(member.summary),
        }

    def save_checkpoints(self) -> None:
        """Each member's weights (its own network's layout), Adam moments, data generator and epoch
        count into its run's artifacts: checkpoints/population.pt and checkpoints/config.yaml."""
        saved = 0
        for k, member in enumerate(self.members):
            if member.tracker is None or member.status not in ("RUNNING", "STOPPED"):
                continue
            state = self.member_state(k)
            try:
                with tempfile.TemporaryDirectory() as folder:
                    torch.save(state, Path(folder) / CHECKPOINT)
                    yaml = OmegaConf.to_yaml(member.cfg, resolve=True)
                    (Path(folder) / "config.yaml").write_text(yaml)
                    log_artifacts(member.tracker.run_id, folder, "checkpoints")
                saved += 1
            except Exception:  # the others are still worth saving
                traceback.print_exc()
        print(
            f"echo: population stopped after {self.epochs_done} complete epochs; "
            f"checkpoints saved for {saved} of {len(self.members)} members (checkpoints/{CHECKPOINT} in each run): "
            "continue one with `python run.py resume=<its run id>`",
            file=sys.stderr,
        )


def resume_member(cfg: DictConfig, run_name: str, tags: dict[str, str], checkpoint: str) -> dict[str, float]:
    """`resume=<member run id>`: the member continues alone from its checkpoint (CHECKPOINT, read
    with weights only and checked by `echo.checkpoints.download_checkpoint`), in the population's
    loop, as a new run; returns its summary. A member that diverges raises TrainingError, as a run does."""
    from echo.reuse import read_weights_only

    state = read_weights_only(checkpoint, f"resume={cfg.resume}: the run's checkpoints/{CHECKPOINT}")
    member = Member(cfg, run_name, tags)
    train_population([member], None, cpu_threads(cfg), restore=state)
    if member.status == "FAILED":
        raise TrainingError((member.error or "").strip().removeprefix("echo.faults.TrainingError: "))
    return member.summary
