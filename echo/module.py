"""The LightningModule: loss, metrics, and Keras-style stateful state handling."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from echo.encoding import PAD, LinearScale, OneHot, representation
from echo.faults import TrainingError, check_finite
from echo.models import detach_state
from echo.policy import windows_per_epoch
from echo.speedups import EpochGraph
from echo.stacked import MEMBER_OPTIMIZERS, StackedNet, member_loss_sums, member_scored, stacked_layout
from echo.steps import StepSettings
from echo.summary import summary_line
from echo.windows import Draw, before_first_error


class EchoModule(pl.LightningModule):
    """Trains a network to echo windows of integers.

    Stateful (`stateful=True`): row i of batch b+1 starts from the final LSTM state of row i
    of batch b; no gradient crosses batches; the state is reset at each new epoch (new
    sequences) and before every evaluation. Stateless: every batch starts from zeros.

    One Lightning step (and epoch) is `epochs_per_step` tutorial epochs in a row, each a list
    of batches from fresh sequences with an optimizer step after each batch, so Lightning's
    bookkeeping (about half a millisecond a step on a CPU) is paid once per several epochs. The
    run sets it to divide every epoch count that needs Lightning's hooks in between (validation,
    checkpoints, the last epoch): see `echo.policy.epochs_per_step`. Metrics are accumulated on
    the device and read back once per validation, so the training loop never waits on the host.

    Metrics go to the Trainer's loggers, their step counted in tutorial epochs: the validation's with
    `self.log_dict` (its `step` key is the epoch), the training's per-epoch rows, several epochs a
    Lightning step, with `log_rows` at each validation and at the end. A loss that became NaN or
    infinite stops the run there (`echo.faults.check_finite`). `summary` holds the latest scores.

    `representation` encodes tokens, scores outputs and decodes them (default: one-hot);
    `mask_inputs` hands the network a mask of the real (non-PAD) input items. A network with
    `teacher_forced = True` gets the targets in training; it is evaluated free-running, and in
    validation also teacher-forced (`val/exact_match_teacher_forced`). The test also counts token
    accuracy by output position (`by_position`, position 1 first).

    On a CUDA device with `cuda_graph=True`, a whole training epoch (drawing its sequences,
    every batch's forward, backward and Adam step, the metric sums) is replayed as one CUDA graph
    (echo/speedups.py `EpochGraph`).
    """

    def __init__(
        self,
        net: nn.Module,
        n_unique: int,
        lr: float,
        stateful: bool,
        windows_per_epoch: int,
        target: float = 0.99,
        stop_at: float | None = None,
        representation: OneHot | LinearScale | None = None,
        mask_inputs: bool = False,
        cuda_graph: bool = True,
        epochs_per_step: int = 1,
        steps: StepSettings | None = None,
        optimizer: str = "adam",
        recall: int | None = None,
    ):
        super().__init__()
        self.net, self.n_unique, self.lr, self.stateful = net, n_unique, lr, stateful
        self.windows_per_epoch, self.target, self.stop_at = windows_per_epoch, target, stop_at
        self.rep, self.mask_inputs = representation or OneHot(n_unique), mask_inputs
        self.epochs_per_step = epochs_per_step
        self.steps = steps or StepSettings()  # Lightning's clipping and accumulation (echo/steps.py)
        self.teacher_forced = getattr(net, "teacher_forced", False)
        self.optimizer_name = optimizer  # adam | rmsprop (echo.config.OPTIMIZERS)
        self.recall = recall  # accuracy over the last `recall` output positions only (copy memory: 10); None: all
        self.by_position: list[float] = []  # test token accuracy at output positions 1, 2, ...
        self.summary: dict[str, float] = {}
        self._train_sums: list[tuple[int, Tensor]] = []  # (first epoch, per epoch [loss*tokens, correct, tokens])
        self._unchecked: list[tuple[str, int, float]] = []  # the last validation's rows, for check_finite
        self.cuda_graph, self._graph = cuda_graph, EpochGraph()
        self._t0, self._trained_s = None, 0.0  # (a resumed run: the training time before, from its checkpoint)
        # Several optimizer steps per Lightning step, written out (manual optimization); it
        # also skips automatic optimization's closure and hooks, costly next to these steps.
        self.automatic_optimization = False

    # -- the network on token ids ------------------------------------------------------
    def forward(
        self, x: Tensor, state=None, n_out: int | None = None, targets: Tensor | None = None
    ) -> tuple[Tensor, object]:
        """Scores for windows of token ids `x`; `n_out` echoed items, if not the network's own
        (windows of another length: task.train_lengths, task.test_lengths); `targets` only to a
        teacher-forced network."""
        options = {}
        if self.mask_inputs:
            options["mask"] = x != PAD
        if n_out is not None and n_out != getattr(self.net, "n_out", n_out):  # (never told: a net without n_out)
            options["n_out"] = n_out
        if targets is not None and self.teacher_forced:
            options["targets"] = targets
        inputs = self.rep.encode(x)
        if inputs.dtype != self.dtype:  # trainer.precision=64: the network is float64
            inputs = inputs.to(self.dtype)
        return self.net(inputs, state, **options)

    def configure_optimizers(self):
        if self.optimizer_name == "rmsprop":  # Arjovsky et al.'s (and Graves'): alpha (the decay) 0.9
            return torch.optim.RMSprop(self.parameters(), lr=self.lr, alpha=0.9, capturable=self._graphs())
        # Fused: one kernel per step. Capturable: its step count stays on the device, for graphs.
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True, capturable=self._graphs())

    def _graphs(self) -> bool:
        return self.cuda_graph and self.device.type == "cuda"

    def _scored(self, scores: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The output positions accuracy counts: all, or the last `recall` (copy memory's recalled symbols)."""
        if self.recall is None:
            return scores, y
        return scores[:, -self.recall :], y[:, -self.recall :]

    def _counts(self, scores: Tensor, y: Tensor) -> tuple[Tensor, ...]:
        """Summed loss (every position), then over the scored positions (`_scored`): correct tokens,
        counted tokens, exactly echoed rows, rows, tokens right before each row's first error
        (`window_counts`); last, the tokens the loss summed over. PAD targets count nowhere."""
        loss, loss_tokens = self.rep.loss_sum(scores, y), (y != PAD).sum()
        scores, y = self._scored(scores, y)
        return (loss, *window_counts(self.rep.decode(scores) == y, y != PAD), loss_tokens)

    def _position_sums(self, scores: Tensor, y: Tensor) -> Tensor:
        """Correct and counted tokens at each scored output position, (2, positions); PAD counts nowhere."""
        scores, y = self._scored(scores, y)
        real = y != PAD
        correct = (self.rep.decode(scores) == y) & real
        return torch.stack([correct.sum(0), real.sum(0)])

    def _forward_batches(self, batches: list[tuple[Tensor, Tensor]], teacher_forced: bool = False):
        """Yield (scores, targets) batch by batch. Stateful: the state runs on from batch to
        batch, detached (no gradient crosses batches), and starts from zeros with every call,
        which is a new sequence (Keras `reset_states()`). Stateless: zeros every batch.
        `teacher_forced`: the targets go to a network that takes them (teacher forcing)."""
        state = None
        for x, y in batches:
            scores, state = self(
                x, state if self.stateful else None, n_out=y.shape[1], targets=y if teacher_forced else None
            )
            yield scores, y
            state = detach_state(state)

    # -- training ----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            self._load_cuda_libraries()

    def _load_cuda_libraries(self) -> None:
        """Evaluate the network on the validation windows, then run it forward and backward
        there and drop the gradients: cuDNN, cuBLAS and the kernels load on first use (0.1-0.5 s,
        once per process), a start-up cost like an import, paid here rather than in the first
        epoch and validation. Nothing is learned and no random number is drawn: the run is the same."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        for draw in datamodule.val_dataloader():
            batches = draw()
            with torch.inference_mode():  # as validation runs
                for scores, y in self._forward_batches(batches):
                    self._counts(scores, y)
            with torch.enable_grad():  # as training runs
                for scores, y in self._forward_batches(batches):
                    self.rep.loss_sum(scores, y).backward()
        self.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter() - self._trained_s  # train_time_s and time_to_target_s count from here

    def train_time_s(self) -> float:
        """Training time so far, a resumed run's time before its interruption included."""
        return self._trained_s if self._t0 is None else time.perf_counter() - self._t0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_time_s"] = self.train_time_s()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._trained_s = float(checkpoint.get("train_time_s", 0.0))

    def epochs_completed(self) -> int:
        """Tutorial epochs of the Lightning epochs completed (all of them once `fit` returns)."""
        return self.current_epoch * self.epochs_per_step

    def epochs_at_step_end(self) -> int:
        """Tutorial epochs trained once the current Lightning epoch (and step) is done."""
        return self.epochs_completed() + self.epochs_per_step

    def training_step(self, draw: Draw, batch_idx: int) -> None:
        """`epochs_per_step` tutorial epochs in a row: each `draw()` gives one epoch's batches."""
        if self._graphs():
            sums = [self._graph(self._train_epoch, draw) for _ in range(self.epochs_per_step)]
        else:
            sums = [self._train_epoch(draw()) for _ in range(self.epochs_per_step)]
        self._step_sums = torch.stack(sums)

    def _train_epoch(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Train on the batches in order; returns [summed loss, tokens, correct scored tokens, scored
        tokens] on the device. The plain optimizer and `backward()`: Lightning's per-step hooks would cost more
        than these tiny steps. Clipping and accumulation as `self.steps` says (echo/steps.py)."""
        optimizer = self.optimizers(use_pl_optimizer=False)
        steps, scale = self.steps, self.steps.loss_scale()
        sums = []
        batched = self._forward_batches(batches, teacher_forced=self.teacher_forced)
        for i, (scores, y) in enumerate(batched):
            tokens = (y != PAD).sum()
            loss_sum = self.rep.loss_sum(scores, y)
            if steps.zero_before(i):
                optimizer.zero_grad()
            (loss_sum / tokens * scale if scale != 1 else loss_sum / tokens).backward()
            if steps.step_after(i, len(batches)):
                steps.clip(self.parameters())
                optimizer.step()
            scored, scored_y = self._scored(scores.detach(), y)
            correct = (self.rep.decode(scored) == scored_y).sum()  # PAD (-1) is never a prediction
            sums.append(torch.stack([loss_sum.detach(), tokens, correct, (scored_y != PAD).sum()]))
        return torch.stack(sums).sum(0)

    def on_train_epoch_end(self) -> None:  # after the step's validation: its epochs are complete
        self._train_sums.append((self.epochs_completed() + 1, self._step_sums))

    def on_train_end(self) -> None:
        check_finite(self.log_train_metrics(), self.lr)

    def log_train_metrics(self) -> list[tuple[str, int, float]]:
        """Log the per-epoch training metrics accumulated on the device; returns their rows."""
        if not self._train_sums:
            return []
        epochs = [first + i for first, sums in self._train_sums for i in range(len(sums))]
        sums = torch.cat([s for _, s in self._train_sums]).tolist()
        self._train_sums = []
        rows = []
        for epoch, (loss_sum, tokens, correct, scored) in zip(epochs, sums):
            rows += [("train/loss", epoch, loss_sum / tokens), ("train/acc", epoch, correct / scored)]
        log_rows(self.loggers, rows)
        return rows

    def configure_callbacks(self) -> list[pl.Callback]:
        return [_KeepMetricsOnException()]

    # -- evaluation --------------------------------------------------------------------
    def _eval_step(self, draw: Draw, batch_idx: int) -> None:
        """Evaluate as the model was trained: batch by batch, state carried, reset first;
        free-running, and for a teacher-forced network also teacher-forced. A set of several
        window lengths comes as one draw per length (batch_idx 0, 1, ...), summed up."""
        batches = draw()
        sums, positions, forced = 0, 0, None
        for scores, y in self._forward_batches(batches):
            sums = sums + torch.stack(self._counts(scores, y)).float()
            positions = _add_padded(positions, self._position_sums(scores, y))
        if self.teacher_forced:
            teacher = self._forward_batches(batches, teacher_forced=True)
            forced = sum(torch.stack(self._counts(s, y)).float() for s, y in teacher)
        if batch_idx == 0:
            self._eval_sums, self._eval_positions, self._forced_sums = sums, positions, forced
            return
        self._eval_sums = self._eval_sums + sums
        self._eval_positions = _add_padded(self._eval_positions, positions)
        if forced is not None:
            self._forced_sums = self._forced_sums + forced

    def eval_sums(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """[summed loss, correct tokens, tokens, exactly echoed rows, rows, tokens before the first error,
        tokens of the loss] over evaluation batches."""
        return sum(torch.stack(self._counts(s, y)).float() for s, y in self._forward_batches(batches))

    validation_step = test_step = _eval_step

    def _eval_metrics(self, prefix: str) -> dict[str, float]:
        loss_sum, correct, tokens, exact, rows, before_error, loss_tokens = self._eval_sums.tolist()
        return {
            f"{prefix}/loss": loss_sum / loss_tokens,
            f"{prefix}/token_acc": correct / tokens,
            f"{prefix}/exact_match": exact / rows,
            f"{prefix}/prefix_acc": before_error / tokens,
        }

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self._eval_metrics("val")
        if self.teacher_forced:
            metrics.update(self._forced_metrics("val"))
        epoch = self.epochs_at_step_end()
        self._unchecked = self.log_train_metrics() + [(name, epoch, value) for name, value in metrics.items()]
        self.log_dict({**metrics, "step": float(epoch)})  # `step`: Lightning's x-axis for these
        if reached(self.summary, metrics, epoch, self.target, self.stop_at, self._t0, self.windows_per_epoch):
            self.trainer.should_stop = True

    def on_validation_end(self) -> None:  # once the loggers have the validation's metrics
        rows, self._unchecked = self._unchecked, []
        check_finite(rows, self.lr)

    def _forced_metrics(self, prefix: str) -> dict[str, float]:
        """The teacher-forced scores. Token accuracy shows the exposure-bias gap; exact match cannot:
        decoding greedily, a row all of whose tokens are right is fed exactly the true tokens, so it
        is exact teacher-forced if and only if it is exact free-running."""
        _, correct, tokens, exact, rows, *_ = self._forced_sums.tolist()
        return {
            f"{prefix}/token_acc_teacher_forced": correct / tokens,
            f"{prefix}/exact_match_teacher_forced": exact / rows,
        }

    def on_test_epoch_end(self) -> None:
        metrics = self._eval_metrics("test")
        del metrics["test/loss"]
        if self.teacher_forced:
            metrics.update(self._forced_metrics("test"))
        self.summary.update(metrics)
        correct, counted = self._eval_positions.float()
        self.by_position = (correct / counted.clamp(min=1)).tolist()

    @torch.no_grad()
    def predict_windows(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Predicted tokens for evaluation batches, with state carried and reset first."""
        self.eval()
        return torch.cat([self.rep.decode(scores) for scores, _ in self._forward_batches(batches)])


class EpochProgress(pl.Callback):
    """One progress bar over the tutorial's epochs (a Lightning step trains several), for a run or a population."""

    def __init__(self, total: int):
        self.total = total

    def on_train_start(self, trainer, module) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="epoch", mininterval=0.25, dynamic_ncols=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.bar.update(module.epochs_at_step_end() - self.bar.n)

    def on_validation_end(self, trainer, module) -> None:
        if "val/exact_match" in module.summary:
            self.bar.set_postfix({"val/exact_match": f"{module.summary['val/exact_match']:.3f}"}, refresh=False)

    def on_train_end(self, trainer, module) -> None:
        self.bar.close()

    def on_exception(self, trainer, module, exception) -> None:
        if hasattr(self, "bar"):
            self.bar.close()


class _KeepMetricsOnException(pl.Callback):
    """A run that crashes or is interrupted keeps its training metrics so far."""

    def on_exception(self, trainer, module: EchoModule, exception: BaseException) -> None:
        module.log_train_metrics()


def log_rows(loggers, rows: list[tuple[str, int, float]]) -> None:
    """(name, step, value) rows through Lightning loggers: one `log_metrics` per step, then `save`."""
    if not rows:
        return
    by_step: dict[int, dict[str, float]] = {}
    for name, step, value in rows:
        by_step.setdefault(step, {})[name] = value
    for logger in loggers:
        for step, metrics in by_step.items():
            logger.log_metrics(metrics, step)
        logger.save()


def window_counts(correct: Tensor, real: Tensor, members: bool = False) -> tuple[Tensor, ...]:
    """Over windows (..., n_out) of which tokens are right (`correct`) and real (not PAD): correct real
    tokens, real tokens, exactly right windows, windows with a real token, and real tokens before each
    window's first wrong one (Grefenstette et al.'s fine accuracy, summed: divided by the real tokens it
    is the mean over windows of the fraction right before the first error, each window weighted by its
    real tokens, so never above token accuracy; with windows of one length, the plain mean).
    `members`: the leading axis is a population's member, and each count is per member (K,)."""
    correct = correct & real
    exact = (correct | ~real).all(-1) & real.any(-1)
    counts = correct, real, exact, real.any(-1), before_first_error(correct, real)
    return tuple(c.flatten(1).sum(1) if members else c.sum() for c in counts)


def _add_padded(total: Tensor | int, sums: Tensor) -> Tensor:
    """`total + sums` for per-position sums (2, positions) of different widths (windows of several
    lengths): the narrower is padded with zeros; `total` 0 is nothing yet."""
    if isinstance(total, int):
        return sums
    width = max(total.shape[1], sums.shape[1])
    pad = torch.nn.functional.pad
    return pad(total, (0, width - total.shape[1])) + pad(sums, (0, width - sums.shape[1]))


class PopulationModule(pl.LightningModule):
    """A population (docs/populations.md): K members' networks stacked as one (echo/stacked.py),
    trained by Lightning's Trainer as `EchoModule` trains one run, each member with its own Adam or
    RMSprop (`echo.stacked.MemberAdam`, `MemberRMSprop`: one over the stacked weights is K
    independent ones), data (`echo.data.PopulationData`), validation, stop, NaN guard, test and logger.

    The loss is the sum of the members' mean losses, so each member's gradient is the one it would
    have alone. One Lightning step trains the tutorial epochs up to the next validation (or the last
    epoch), as a run's step trains several, then validates the members still training: one that
    reaches `stop_at` is frozen (its updates masked) and tested at once while the others go on; one
    whose loss became NaN or infinite ends FAILED and the others go on. When every member has
    stopped, or at trainer.max_epochs, training ends.

    `members` are `echo.population.Member`s: their config, their Lightning `logger` (or None), and
    `stopped()` and `finished(...)`, which store what the module hands them; the module knows no tracker.
    `restore`: each member's checkpoint (`member_state`), all saved after the same epoch.
    """

    def __init__(
        self,
        members: list,
        nets: list[nn.Module],
        device: torch.device,
        every: int,
        compact: bool,
        restore: list | None = None,
    ):
        super().__init__()
        cfg = members[0].cfg
        task, model = cfg.task, cfg.model
        self.members, self.nets = members, nets  # (a plain list: not submodules) each member's own network
        self.net = StackedNet(nets).to(device)  # (float64 already, with trainer.precision=64)
        self.input_dtype = self.net.p(self.net.names[0]).dtype
        self.rep = representation(task)
        self.tokens = isinstance(self.rep, OneHot) and self.net.reads_tokens  # one-hot codes as their tokens
        self.stateful, self.mask_inputs = bool(model.stateful), task.framing == "mask"
        self.n_unique, self.n_out = task.n_unique, task.n_out
        self.windows_per_epoch = windows_per_epoch(cfg)
        self.every, self.max_epochs = every, int(cfg.trainer.max_epochs)
        self.steps = StepSettings.from_trainer(cfg.trainer)  # clipping (per member) and accumulation
        optimizer = MEMBER_OPTIMIZERS[model.get("optimizer", "adam")]
        self.optimizer = optimizer(list(self.net.parameters()), [float(m.cfg.model.lr) for m in members])
        # On a GPU an epoch is replayed as one CUDA graph, as an independent run's is.
        on_gpu = device.type == "cuda"
        self.graph = EpochGraph() if on_gpu and cfg.get("cuda_graph", True) else None
        # On a CPU a wide step is arithmetic-bound: members that have stopped are then left out of
        # the forward and backward (`_freeze`), not only of the optimizer's step.
        self.compact = compact and not on_gpu
        self._training: Tensor | None = None  # the members still training, once one has stopped
        self._train_sums: list[tuple[int, Tensor, list[bool]]] = []
        self.epochs_done, self._trained_s, self._t0 = 0, 0.0, time.perf_counter()
        self.automatic_optimization = False  # echo's own steps, as EchoModule's
        for k, state in enumerate(restore or []):  # (weights: loaded into `nets` before stacking)
            self.optimizer.load_member_state(k, state["adam"], self.net.names, stacked_layout)
            members[k].summary.update(state["summary"])
            self.epochs_done = int(state["epochs_done"])
            self._trained_s = float(state["summary"].get("train_time_s", 0.0))  # its time before

    def configure_optimizers(self) -> None:
        return None  # the members' own optimizer, `self.optimizer`, steps in `_train_epoch`

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter() - self._trained_s

    def epochs_at_step_end(self) -> int:
        return self.epochs_done

    def training_step(self, draw: Draw, batch_idx: int) -> None:
        """The tutorial epochs up to the next validation or the last epoch, then the validation."""
        last = min(self.max_epochs, (self.epochs_done // self.every + 1) * self.every)
        for epoch in range(self.epochs_done + 1, last + 1):
            active = [m.status == "RUNNING" for m in self.members]
            self._train_sums.append((epoch, self.train_epoch(draw), active))
            self.epochs_done = epoch
        if self.epochs_done % self.every == 0 and self._running():
            self._validate(self.epochs_done)
        if not self._running() or self.epochs_done >= self.max_epochs:
            self.trainer.should_stop = True

    def on_train_end(self) -> None:
        """trainer.max_epochs (or trainer.max_time): the members still training end here."""
        self._check_finite(self._running(), self.flush_train_metrics())
        last = self._running()
        for member in last:
            self._stop(member, self.epochs_done)
        self._finish(last)

    # -- the members' epochs ----------------------------------------------------------------
    def _forward_batches(self, batches, index: Tensor | None = None):
        """(scores, targets) batch by batch, state carried (detached) if stateful, zeros first; of
        every member, or of the members `index` holds only, whose batches hold theirs only."""
        state = None
        for x, y in batches:
            mask = x != PAD if self.mask_inputs else None
            inputs = x if self.tokens else self.rep.encode(x).to(self.input_dtype)
            scores, state = self.net(inputs, state if self.stateful else None, mask, members=index)
            yield scores, y
            state = detach_state(state)

    def _indices(self, members: list) -> Tensor | None:
        """The members' indices in the population, on the device; None for all of them."""
        if len(members) == len(self.members):
            return None
        return torch.tensor([self.members.index(m) for m in members], dtype=torch.long, device=self.device)

    def train_epoch(self, draw: Draw) -> Tensor:
        """One epoch on fresh data: `_train_epoch`, replayed as a CUDA graph once captured on a GPU."""
        return self.graph(self._train_epoch, draw) if self.graph else self._train_epoch(draw())

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

    def _running(self) -> list:
        return [m for m in self.members if m.status == "RUNNING"]

    def _stop(self, member, epoch: int) -> None:
        member.status = "STOPPED"
        member.summary.update(train_time_s=time.perf_counter() - self._t0, epochs=epoch)
        self._freeze(member)
        member.stopped()  # its metrics are complete: its curve is drawn while the others train

    def _freeze(self, member, zero: bool = False) -> None:
        """The member trains no more (see `MemberAdam.freeze`). A captured epoch updates the members
        that trained when it was captured: it is captured again at the next epoch. Where a step is
        arithmetic-bound (a wide step on a CPU), the others now train without it."""
        self.optimizer.freeze(self.members.index(member), zero)
        if self.graph is not None:
            self.graph.reset()
        if self.compact:
            self._training = self._indices(self._running())

    def flush_train_metrics(self) -> list[list[tuple[str, int, float]]]:
        """Log each member's per-epoch training metrics, for the epochs it trained; returns each member's rows."""
        rows = [[] for _ in self.members]
        if self._train_sums:
            sums = torch.stack([s for _, s, _ in self._train_sums]).tolist()  # (epochs, 3, K)
            for (epoch, _, active), (loss_sums, correct, tokens) in zip(self._train_sums, sums):
                for k in (k for k in range(len(self.members)) if active[k]):
                    rows[k] += [
                        ("train/loss", epoch, loss_sums[k] / tokens[k]),
                        ("train/acc", epoch, correct[k] / tokens[k]),
                    ]
            self._train_sums = []
        for member, member_rows in zip(self.members, rows):
            log_rows(member.loggers, member_rows)
        return rows

    # -- validation and test --------------------------------------------------------------------
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
            counts = [loss_sums, *window_counts(right, real, members=True)]
            total = total + torch.stack([c.float() for c in counts], 1)
            if by_position:
                correct_at, real_at = correct_at + (right & real).sum(1), real_at + real.sum(1)
        if not by_position:
            return total.tolist()
        return total.tolist(), (correct_at / real_at.clamp(min=1)).tolist()

    def _validate(self, epoch: int) -> None:
        """As an independent run validates (the members still training): metrics, target, stop_at;
        then the NaN check, and the test of the members that stopped."""
        running = self._running()
        checked = self.flush_train_metrics()  # each member's rows the NaN guard reads
        results = self._evaluate(self.trainer.datamodule.val, self._indices(running))
        stopped = []
        for member, (loss_sum, correct, tokens, exact, rows, before_error) in zip(running, results):
            metrics = {
                "val/loss": loss_sum / tokens,
                "val/token_acc": correct / tokens,
                "val/exact_match": exact / rows,
                "val/prefix_acc": before_error / tokens,
            }
            log_rows(member.loggers, [(name, epoch, value) for name, value in metrics.items()])
            checked[self.members.index(member)] += [(name, epoch, value) for name, value in metrics.items()]
            cfg = member.cfg
            if reached(member.summary, metrics, epoch, cfg.target, cfg.stop_at, self._t0, self.windows_per_epoch):
                self._stop(member, epoch)
                stopped.append(member)
        self._check_finite(running, checked)
        self._finish([m for m in stopped if m.status == "STOPPED"])

    def _check_finite(self, members: list, rows: list[list[tuple[str, int, float]]]) -> None:
        """A member whose loss became NaN or infinite among its `rows` (by index in the population) ends
        FAILED (as `echo.faults.check_finite` ends an independent run); the others go on."""
        for member in members:
            try:
                check_finite(rows[self.members.index(member)], member.cfg.model.lr)
            except TrainingError as error:
                member.status, member.error = "FAILED", f"echo.faults.TrainingError: {error}\n"
                self._freeze(member, zero=True)
                print(f"echo: run failed: {member.run_name}: {error}", file=sys.stderr)

    def _finish(self, members: list) -> None:
        """Test members that stopped training and hand each its results (`finished`), as an
        independent run ends. Their weights no longer change, so this runs as soon as they stop:
        their figures and files are written while the others train on."""
        if not members:
            return
        index = self._indices(members)
        results, positions = self._evaluate(self.trainer.datamodule.test, index, by_position=True)
        tables = self._expected_predicted(members, index)
        chance = 1 / self.n_unique  # a uniform guess per token
        for member, (_, correct, tokens, exact, rows, before_error), at, table in zip(
            members, results, positions, tables
        ):
            member.summary.update({"test/token_acc": correct / tokens, "test/exact_match": exact / rows})
            member.summary["test/prefix_acc"] = before_error / tokens
            member.summary.update({"chance/token_acc": chance, "chance/exact_match": chance**self.n_out})
            print(f"{member.run_name}: {summary_line(member.summary)}")
            epochs = member.summary["epochs"]
            final = [(n, epochs, v) for n, v in member.summary.items() if not n.startswith("val/")]
            by_position = [("test/token_acc_by_position", j, acc) for j, acc in enumerate(at, 1)]
            log_rows(member.loggers, final + by_position)
            member.finished(self.member_net(member), at, chance, table)
            member.status = "FINISHED"

    def member_net(self, member) -> nn.Module:
        """The member's own network (echo.models), holding its trained weights."""
        k = self.members.index(member)
        self.nets[k].load_state_dict(self.net.member_state_dict(k))
        return self.nets[k]

    @torch.no_grad()
    def _expected_predicted(self, members: list, index: Tensor | None) -> list[str]:
        """Each member's tutorial evaluation: one fresh sequence of its own (seed 10,000 + seed)."""
        data = self.trainer.datamodule
        x, y = data.held_out(1, [10_000 + m.cfg.seed for m in members])
        batches = data.eval_batches(x, y)
        predicted = torch.cat([self.rep.decode(s) for s, _ in self._forward_batches(batches, index)], 1)
        return [
            "\n".join(f"Expected: {e} Predicted {p}" for e, p in zip(y[j, 0].tolist(), predicted[j].tolist()))
            for j in range(len(members))
        ]

    def member_state(self, k: int, generator: torch.Generator) -> dict:
        """Member k's checkpoint (echo.population.MEMBER_STATE): its weights in its own network's layout
        (under `net.`, as in a Lightning checkpoint), optimizer moments and step, data generator, epochs
        and summary."""
        member = self.members[k]
        return {
            "state_dict": {f"net.{n}": v for n, v in self.net.member_state_dict(k).items()},
            "adam": self.optimizer.member_state(k, self.net.names, self.net.member_layout),
            "generator": generator.get_state(),
            "epochs_done": self.epochs_done if member.status == "RUNNING" else member.summary["epochs"],
            "summary": {"train_time_s": time.perf_counter() - self._t0, **member.summary},  # (a stopped one's own)
        }


def reached(
    summary: dict, metrics: dict, epoch: int, target: float, stop_at: float | None, t0: float, windows_per_epoch: int
) -> bool:
    """The stop rule, after a validation: its `metrics` into `summary`, with the time, epochs and samples
    to `target` the first time val/exact_match reaches it; whether it reached `stop_at` (the run stops)."""
    summary.update(metrics)
    exact = metrics["val/exact_match"]
    if exact >= target and "epochs_to_target" not in summary:
        summary.update(
            time_to_target_s=time.perf_counter() - t0,
            epochs_to_target=epoch,
            samples_to_target=epoch * windows_per_epoch,
        )
    return stop_at is not None and exact >= stop_at
