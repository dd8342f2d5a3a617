"""The LightningModule: loss, metrics and Keras-style stateful state, per member of a population
(docs/populations.md): K networks stacked as one (`echo.stacked.StackedNet`), or one network as a
population of one."""

from __future__ import annotations

import sys
import time

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from echo.encoding import PAD, LinearScale, OneHot, representation
from echo.faults import TrainingError, check_finite, interrupted
from echo.models import detach_state
from echo.policy import windows_per_epoch
from echo.speedups import EpochGraph
from echo.stacked import MEMBER_OPTIMIZERS, StackedNet, member_loss_sums, member_scored, stacked_layout
from echo.steps import StepSettings
from echo.summary import summary_line
from echo.windows import Draw, before_first_error


class EchoModule(pl.LightningModule):
    """Trains a network to echo windows of integers: one run, or a population (`PopulationModule`).

    One Lightning step trains `epochs_per_step` tutorial epochs, so Lightning's bookkeeping (about
    0.5 ms a step on a CPU) is paid once per several; metrics are summed on the device and read back
    once per validation, their step the tutorial epoch. On CUDA an epoch is one graph (`EpochGraph`)."""

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
        self.stacked = isinstance(net, StackedNet)
        self.tokens = self.stacked and net.reads_tokens and isinstance(representation, OneHot)  # fed as tokens
        self.windows_per_epoch, self.target, self.stop_at = windows_per_epoch, target, stop_at
        self.rep, self.mask_inputs = representation or OneHot(n_unique), mask_inputs
        self.epochs_per_step = epochs_per_step
        self.steps = steps or StepSettings()
        self.teacher_forced = getattr(net, "teacher_forced", False)
        self.optimizer_name = optimizer
        self.recall = recall  # accuracy over the last `recall` output positions only (copy memory: 10)
        self.by_position: list[float] = []  # test token accuracy at output positions 1, 2, ...
        self.summary: dict[str, float] = {}
        self._train_sums: list[tuple[int, Tensor, list[bool] | None]] = []  # (first epoch, (epochs, 4, K), training)
        self._training: Tensor | None = None  # the members still training, where the others are left out
        self._unchecked: list[tuple[str, int, float]] = []  # the last validation's rows, for check_finite
        self._graph = EpochGraph() if cuda_graph else None
        self._t0, self._trained_s = None, 0.0  # (a resumed run: the training time before)
        # Several optimizer steps per Lightning step; also skips automatic optimization's costly hooks.
        self.automatic_optimization = False

    def forward(self, x: Tensor, state=None, n_out: int | None = None, targets: Tensor | None = None) -> tuple:
        """One network's scores for windows of token ids `x`; `n_out`: windows of another length."""
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
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True, capturable=self._graphs())

    def optimizer(self):
        return self.optimizers(use_pl_optimizer=False)

    def _graphs(self) -> bool:
        return self._graph is not None and self.device.type == "cuda"

    def _scored(self, t: Tensor) -> Tensor:
        return t if self.recall is None else t[..., -self.recall :]

    def _forward_batches(self, batches, teacher_forced: bool = False, index: Tensor | None = None):
        """Yield (scores, targets) per batch, member axis first, of every member or those in `index`;
        the state (stateful) runs on detached and starts from zeros with every call."""
        state = None
        for x, y in batches:
            state = state if self.stateful else None
            if self.stacked:
                mask = x != PAD if self.mask_inputs else None
                inputs = x if self.tokens else self.rep.encode(x).to(self.input_dtype)
                scores, state = self.net(inputs, state, mask, members=index)
            else:
                scores, state = self(x, state, n_out=y.shape[1], targets=y if teacher_forced else None)
                scores, y = scores.unsqueeze(0), y.unsqueeze(0)
            yield scores, y
            state = detach_state(state)

    def _counts(self, scores: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per member (7, K): summed loss, `window_counts` over the scored positions, the loss's tokens;
        then the scored positions' right and real tokens (K, batch, positions)."""
        loss_sums, right = member_scored(self.rep, scores, y)
        real = y != PAD
        right, scored = self._scored(right) & self._scored(real), self._scored(real)
        counts = window_counts(right, scored, members=True)
        return torch.stack([loss_sums, *counts, real.flatten(1).sum(1)]).to(loss_sums.dtype), right, scored

    @torch.no_grad()
    def eval_sums(self, batches, index: Tensor | None = None, teacher_forced: bool = False):
        """`_counts` summed over batches (7, K), and right and real tokens by position (2, K, positions)."""
        if index is not None:
            batches = [(x[index], y[index]) for x, y in batches]
        sums = positions = 0
        for scores, y in self._forward_batches(batches, teacher_forced, index):
            counts, right, real = self._counts(scores, y)
            sums = sums + counts
            positions = _add_padded(positions, torch.stack([right.sum(1), real.sum(1)]))
        return sums, positions

    @torch.no_grad()
    def predicted(self, batches, index: Tensor | None = None) -> Tensor:
        """Predicted tokens (K, windows, n_out)."""
        return torch.cat([self.rep.decode(scores) for scores, _ in self._forward_batches(batches, index=index)], 1)

    def predict_windows(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        self.eval()
        return self.predicted(batches)[0]

    def on_fit_start(self) -> None:
        if self.device.type == "cuda" and not self.stacked:
            self._load_cuda_libraries()

    def _load_cuda_libraries(self) -> None:
        """Evaluate and backpropagate once on the validation windows, learning nothing: cuDNN, cuBLAS and
        the kernels load on first use (0.1-0.5 s a process), here rather than in training."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        for draw in datamodule.val_dataloader():
            batches = draw()
            with torch.inference_mode():
                self.eval_sums(batches)
            with torch.enable_grad():
                for scores, y in self._forward_batches(batches):
                    member_loss_sums(self.rep, scores, y).sum().backward()
        self.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)

    def on_train_start(self) -> None:
        self._t0 = time.perf_counter() - self._trained_s

    def train_time_s(self) -> float:
        """Training time so far, a resumed run's time before included."""
        return self._trained_s if self._t0 is None else time.perf_counter() - self._t0

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["train_time_s"] = self.train_time_s()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._trained_s = float(checkpoint.get("train_time_s", 0.0))

    def epochs_completed(self) -> int:
        """Tutorial epochs of the Lightning epochs completed."""
        return self.current_epoch * self.epochs_per_step

    def epochs_at_step_end(self) -> int:
        return self.epochs_completed() + self.epochs_per_step

    def training_step(self, draw: Draw, batch_idx: int) -> None:
        self._step_sums = torch.stack([self.train_epoch(draw) for _ in range(self.epochs_per_step)])

    def train_epoch(self, draw: Draw) -> Tensor:
        return self._graph(self._train_epoch, draw) if self._graphs() else self._train_epoch(draw())

    def _train_epoch(self, batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Train every member (or those in `_training`); per member [summed loss, tokens, correct and
        scored tokens] (4, K). Nothing reads back to the host, so a CUDA graph can capture it. The loss
        sums the members' mean losses: each member's gradient is the one it would have alone."""
        index = self._training
        if index is not None:
            batches = [(x[index], y[index]) for x, y in batches]
        optimizer = self.optimizer()
        steps, scale = self.steps, self.steps.loss_scale()
        sums = []
        for i, (scores, y) in enumerate(self._forward_batches(batches, self.teacher_forced, index)):
            tokens = (y != PAD).flatten(1).sum(1)
            loss_sums = member_loss_sums(self.rep, scores, y)
            if steps.zero_before(i):
                optimizer.zero_grad()
            (loss_sums / tokens * scale if scale != 1 else loss_sums / tokens).sum().backward()
            if steps.step_after(i, len(batches)):
                steps.clip(self.net.parameters(), members=self.stacked)
                optimizer.step()
            scored, scored_y = self._scored(self.rep.decode(scores.detach())), self._scored(y)
            correct = (scored == scored_y).flatten(1).sum(1)  # PAD (-1) is never a prediction
            sums.append(torch.stack([loss_sums.detach(), tokens, correct, (scored_y != PAD).flatten(1).sum(1)]))
        sums = torch.stack(sums).sum(0)
        if index is None:
            return sums
        return sums.new_zeros(4, self.n_members).index_copy_(1, index, sums)

    @property
    def n_members(self) -> int:
        return self.net.n_members if self.stacked else 1

    def on_train_epoch_end(self) -> None:  # after the step's validation: its epochs are complete
        self._train_sums.append((self.epochs_completed() + 1, self._step_sums, None))

    def on_train_end(self) -> None:
        check_finite(self.log_train_metrics()[0], self.lr)

    def member_loggers(self, k: int) -> list:
        return self.loggers

    def log_train_metrics(self, through: int | None = None) -> list[list[tuple[str, int, float]]]:
        """Log each member's per-epoch training metrics for the epochs it trained (of the steps that end
        by epoch `through`); return its rows."""
        rows = [[] for _ in range(self.n_members)]
        for first, sums, training in self._train_sums:
            if through is not None and first > through:
                continue
            for epoch, member_sums in enumerate(sums.tolist(), first):
                for k, (loss_sum, tokens, correct, scored) in enumerate(zip(*member_sums)):
                    if training is None or training[k]:
                        rows[k] += [("train/loss", epoch, loss_sum / tokens), ("train/acc", epoch, correct / scored)]
        for k, member_rows in enumerate(rows):
            log_rows(self.member_loggers(k), member_rows)
        self._train_sums = []  # after logging: an interrupt meanwhile logs them again rather than never
        return rows

    def configure_callbacks(self) -> list[pl.Callback]:
        return [_KeepMetricsOnException()]

    def stopped_by(self, exception: BaseException) -> None:
        """A crash or an interrupt: the training metrics of the steps Lightning completed are logged. A
        step interrupted after its end hook recorded them is not complete: its checkpoint restarts it."""
        self.log_train_metrics(through=self.epochs_completed())

    def _eval_step(self, draw: Draw, batch_idx: int) -> None:
        """Sums over the set: one draw per window length (batch_idx 0, 1, ...)."""
        batches = draw()
        sums, positions = self.eval_sums(batches)
        forced = self.eval_sums(batches, teacher_forced=True)[0] if self.teacher_forced else None
        if batch_idx == 0:
            self._eval_sums, self._eval_positions, self._forced_sums = sums, positions, forced
            return
        self._eval_sums = self._eval_sums + sums
        self._eval_positions = _add_padded(self._eval_positions, positions)
        if forced is not None:
            self._forced_sums = self._forced_sums + forced

    validation_step = test_step = _eval_step

    def _metrics(self, prefix: str) -> dict[str, float]:
        forced = self._forced_sums[:, 0].tolist() if self.teacher_forced else None
        return eval_metrics(self._eval_sums[:, 0].tolist(), prefix, forced)

    def on_validation_epoch_end(self) -> None:
        metrics = self._metrics("val")
        epoch = self.epochs_at_step_end()
        self._unchecked = self.log_train_metrics()[0] + [(name, epoch, value) for name, value in metrics.items()]
        self.log_dict({**metrics, "step": float(epoch)})  # `step`: Lightning's x-axis
        if self._reached(self.summary, metrics, epoch, self.target, self.stop_at):
            self.trainer.should_stop = True

    def progress(self) -> dict[str, str]:
        """What the progress bar shows beside the epochs."""
        exact = self.summary.get("val/exact_match")
        return {} if exact is None else {"val/exact_match": f"{exact:.3f}"}

    def _reached(self, summary: dict, metrics: dict, epoch: int, target: float, stop_at: float | None) -> bool:
        """Put `metrics` into `summary`, with time, epochs and samples the first time val/exact_match
        reaches `target`; return whether it reached `stop_at`."""
        summary.update(metrics)
        exact = metrics["val/exact_match"]
        if exact >= target and "epochs_to_target" not in summary:
            summary.update(
                time_to_target_s=time.perf_counter() - self._t0,
                epochs_to_target=epoch,
                samples_to_target=epoch * self.windows_per_epoch,
            )
        return stop_at is not None and exact >= stop_at

    def on_validation_end(self) -> None:  # once the loggers have the validation's metrics
        rows, self._unchecked = self._unchecked, []
        check_finite(rows, self.lr)

    def on_test_epoch_end(self) -> None:
        metrics = self._metrics("test")
        del metrics["test/loss"]
        self.summary.update(metrics)
        correct, counted = self._eval_positions[:, 0].float()
        self.by_position = (correct / counted.clamp(min=1)).tolist()


def eval_metrics(sums: list[float], prefix: str, forced: list[float] | None = None) -> dict[str, float]:
    """One member's metrics from its `eval_sums`, and the teacher-forced ones from `forced`: token
    accuracy shows the exposure-bias gap; exact match cannot (a greedy row all right is fed exactly
    the true tokens, so it is exact teacher-forced if and only if free-running)."""
    loss_sum, correct, tokens, exact, rows, before_error, loss_tokens = sums
    metrics = {
        f"{prefix}/loss": loss_sum / loss_tokens,
        f"{prefix}/token_acc": correct / tokens,
        f"{prefix}/exact_match": exact / rows,
        f"{prefix}/prefix_acc": before_error / tokens,
    }
    if forced is not None:
        _, correct, tokens, exact, rows, *_ = forced
        metrics[f"{prefix}/token_acc_teacher_forced"] = correct / tokens
        metrics[f"{prefix}/exact_match_teacher_forced"] = exact / rows
    return metrics


class EpochProgress(pl.Callback):
    """One progress bar over the tutorial's epochs (a Lightning step trains several)."""

    def __init__(self, total: int):
        self.total = total

    def on_train_start(self, trainer, module) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, unit="epoch", mininterval=0.25, dynamic_ncols=True)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.bar.update(module.epochs_at_step_end() - self.bar.n)

    def on_validation_end(self, trainer, module) -> None:
        if postfix := module.progress():
            self.bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, trainer, module) -> None:
        self.bar.close()

    def on_exception(self, trainer, module, exception) -> None:
        if hasattr(self, "bar"):
            self.bar.close()


class _KeepMetricsOnException(pl.Callback):
    """Lightning's `on_exception` (a crash or an interrupt, before the Trainer is torn down): the module
    keeps what it trained (`stopped_by`)."""

    def on_exception(self, trainer, module: EchoModule, exception: BaseException) -> None:
        module.stopped_by(exception)


def log_rows(loggers, rows: list[tuple[str, int, float]]) -> None:
    """(name, step, value) rows: one `log_metrics` per step, then `save`."""
    if not rows:
        return
    by_step: dict[int, dict[str, float]] = {}
    for name, step, value in rows:
        by_step.setdefault(step, {})[name] = value
    for logger in loggers:
        for step, metrics in by_step.items():
            logger.log_metrics(metrics, step)
        logger.save()


def summary_rows(summary: dict[str, float], epochs: int, by_position: list[float]) -> list[tuple[str, int, float]]:
    """A run's last rows: its summary but val/* at its last epoch, and test token accuracy by position."""
    final = [(name, epochs, value) for name, value in summary.items() if not name.startswith("val/")]
    return final + [("test/token_acc_by_position", j, acc) for j, acc in enumerate(by_position, 1)]


def window_counts(correct: Tensor, real: Tensor, members: bool = False) -> tuple[Tensor, ...]:
    """Correct real tokens, real tokens, exact windows, windows with a real token, and real tokens
    before each window's first error (Grefenstette et al.'s fine accuracy, summed); per member (K,)
    with `members`."""
    correct = correct & real
    exact = (correct | ~real).all(-1) & real.any(-1)
    counts = correct, real, exact, real.any(-1), before_first_error(correct, real)
    return tuple(c.flatten(1).sum(1) if members else c.sum() for c in counts)


def _add_padded(total: Tensor | int, sums: Tensor) -> Tensor:
    """`total + sums` of per-position sums, the narrower padded with zeros; `total` 0 is nothing yet."""
    if isinstance(total, int):
        return sums
    width = max(total.shape[-1], sums.shape[-1])
    pad = torch.nn.functional.pad
    return pad(total, (0, width - total.shape[-1])) + pad(sums, (0, width - sums.shape[-1]))


class PopulationModule(EchoModule):
    """`EchoModule` over K members' stacked networks (docs/populations.md), each with its own optimizer,
    data, validation, stop, NaN guard, test and loggers (`echo.logger.Member`). One Lightning step
    trains up to the next validation. `restore`: each member's checkpoint (`member_state`)."""

    def __init__(
        self,
        members: list,
        nets: list[nn.Module],
        device: torch.device,
        every: int,
        compact: bool,
        restore: list | None = None,
    ):
        cfg = members[0].cfg
        task, model = cfg.task, cfg.model
        on_gpu = device.type == "cuda"
        super().__init__(
            StackedNet(nets).to(device),
            task.n_unique,
            lr=None,  # each member's own
            stateful=bool(model.stateful),
            windows_per_epoch=windows_per_epoch(cfg),
            representation=representation(task),
            mask_inputs=task.framing == "mask",
            cuda_graph=on_gpu and cfg.get("cuda_graph", True),
            steps=StepSettings.from_trainer(cfg.trainer),
            optimizer=model.get("optimizer", "adam"),
        )
        self.members, self.nets = members, nets  # (a plain list: not submodules)
        self.input_dtype = self.net.p(self.net.names[0]).dtype
        self.n_out = task.n_out
        self.every, self.max_epochs = every, int(cfg.trainer.max_epochs)
        optimizer = MEMBER_OPTIMIZERS[self.optimizer_name]
        self._optimizer = optimizer(list(self.net.parameters()), [float(m.cfg.model.lr) for m in members])
        self.compact = compact and not on_gpu  # a wide CPU step leaves stopped members out (`_freeze`)
        self.epochs_done = 0
        for k, state in enumerate(restore or []):  # (weights: loaded into `nets` before stacking)
            self._optimizer.load_member_state(k, state["adam"], self.net.names, stacked_layout)
            members[k].summary.update(state["summary"])
            self.epochs_done = int(state["epochs_done"])
            self._trained_s = float(state["summary"].get("train_time_s", 0.0))
        self._validated = [self.epochs_done] * len(members)  # each member's last validated epoch

    def configure_optimizers(self) -> None:
        return None  # the members' own (`_optimizer`)

    def optimizer(self):
        return self._optimizer

    def member_loggers(self, k: int) -> list:
        return self.members[k].loggers

    def epochs_at_step_end(self) -> int:
        return self.epochs_done

    def log_train_metrics(self) -> list[list[tuple[str, int, float]]]:
        """Every epoch trained. An interrupt can land between an epoch's sums and its count: the epoch is
        done, and its checkpoint counts it."""
        if self._train_sums:
            self.epochs_done = max(self.epochs_done, self._train_sums[-1][0])
        return super().log_train_metrics()

    def stopped_by(self, exception: BaseException) -> None:
        """Every epoch trained is logged. An interrupt may cut a validation short (or land just before it):
        the members left validate now, and those it stopped are tested, as the step would have done."""
        self.log_train_metrics()
        if interrupted(exception):
            if self.epochs_done % self.every == 0:
                self._validate(self.epochs_done, self.trainer.datamodule.val)
            self._finish([m for m in self.members if m.status == "STOPPED"])

    def training_step(self, draw: Draw, batch_idx: int) -> None:
        last = min(self.max_epochs, (self.epochs_done // self.every + 1) * self.every)
        for epoch in range(self.epochs_done + 1, last + 1):
            training = [m.status == "RUNNING" for m in self.members]
            self._train_sums.append((epoch, self.train_epoch(draw)[None], training))
            self.epochs_done = epoch

    def validation_step(self, draw: Draw, batch_idx: int) -> None:
        """Lightning's validation after each step: the members still training, as a run validates (not
        after a last step shorter than `every`)."""
        if self.epochs_done % self.every == 0 and self._running():
            self._validate(self.epochs_done, draw())

    def on_validation_epoch_end(self) -> None:
        pass  # each member's own, in `_validate`

    def on_validation_end(self) -> None:
        pass

    def on_train_epoch_end(self) -> None:
        pass  # `training_step` keeps each epoch's sums itself

    def progress(self) -> dict[str, str]:
        """The members still training, and the best last val/exact_match of any member."""
        exact = [m.summary["val/exact_match"] for m in self.members if "val/exact_match" in m.summary]
        if not exact:
            return {}
        return {"training": f"{len(self._running())}/{len(self.members)}", "best val/exact_match": f"{max(exact):.3f}"}

    def on_train_end(self) -> None:
        """trainer.max_epochs or max_time: the members still training end here."""
        self._check_finite(self._running(), self.log_train_metrics())
        last = self._running()
        for member in last:
            self._stop(member, self.epochs_done)
        self._finish(last)

    def _indices(self, members: list) -> Tensor | None:
        """The members' indices, on the device; None for all of them."""
        if len(members) == len(self.members):
            return None
        return torch.tensor([self.members.index(m) for m in members], dtype=torch.long, device=self.device)

    def _running(self) -> list:
        return [m for m in self.members if m.status == "RUNNING"]

    def _stop(self, member, epoch: int) -> None:
        member.status = "STOPPED"
        member.summary.update(train_time_s=self.train_time_s(), epochs=epoch)
        self._freeze(member)
        member.stopped()

    def _freeze(self, member, zero: bool = False) -> None:
        """The member trains no more; a captured epoch (which updates the members of its capture) is
        captured again."""
        self._optimizer.freeze(self.members.index(member), zero)
        if self._graph is not None:
            self._graph.reset()
        if self.compact:
            self._training = self._indices(self._running())

    def _validate(self, epoch: int, batches: list[tuple[Tensor, Tensor]]) -> None:
        """Validate the members still training (those not yet validated at `epoch`) as a run validates;
        test those that stopped."""
        running = [m for m, last in zip(self.members, self._validated) if m.status == "RUNNING" and last < epoch]
        if not running:
            return
        checked = self.log_train_metrics()
        sums, _ = self.eval_sums(batches, self._indices(running))
        stopped = []
        for member, member_sums in zip(running, sums.T.tolist()):
            k, metrics = self.members.index(member), eval_metrics(member_sums, "val")
            stop = self._reached(member.summary, metrics, epoch, member.cfg.target, member.cfg.stop_at)
            rows = [(name, epoch, value) for name, value in metrics.items()]
            log_rows(member.loggers, rows)
            checked[k] += rows
            self._validated[k] = epoch
            if stop:
                self._stop(member, epoch)
                stopped.append(member)
        self._check_finite(running, checked)
        self._finish([m for m in stopped if m.status == "STOPPED"])
        if not self._running():
            self.trainer.should_stop = True

    def _check_finite(self, members: list, rows: list[list[tuple[str, int, float]]]) -> None:
        """A member whose loss became NaN or infinite among its `rows` ends FAILED; the others go on."""
        for member in members:
            try:
                check_finite(rows[self.members.index(member)], member.cfg.model.lr)
            except TrainingError as error:
                member.status, member.error = "FAILED", f"echo.faults.TrainingError: {error}\n"
                self._freeze(member, zero=True)
                print(f"echo: run failed: {member.run_name}: {error}", file=sys.stderr)

    def _finish(self, members: list) -> None:
        """Test members that stopped and hand each its results (`finished`) while the others train on."""
        if not members:
            return
        index = self._indices(members)
        data = self.trainer.datamodule
        sums, positions = self.eval_sums(data.test, index)
        correct_at, counted_at = positions.float()
        by_position = (correct_at / counted_at.clamp(min=1)).tolist()
        # the tutorial's evaluation: one fresh sequence each (seed 10,000 + seed)
        x, y = data.held_out(1, [10_000 + m.cfg.seed for m in members])
        predicted = self.predicted(data.eval_batches(x, y), index)
        chance = 1 / self.n_unique
        for j, (member, member_sums, at) in enumerate(zip(members, sums.T.tolist(), by_position)):
            metrics = eval_metrics(member_sums, "test")
            del metrics["test/loss"]
            member.summary.update({**metrics, "chance/token_acc": chance, "chance/exact_match": chance**self.n_out})
            print(f"{member.run_name}: {summary_line(member.summary)}")
            log_rows(member.loggers, summary_rows(member.summary, member.summary["epochs"], at))
            k = self.members.index(member)
            self.nets[k].load_state_dict(self.net.member_state_dict(k))
            table = "\n".join(f"Expected: {e} Predicted {p}" for e, p in zip(y[j, 0].tolist(), predicted[j].tolist()))
            member.finished(self.nets[k], at, chance, table)
            member.status = "FINISHED"

    def member_state(self, k: int, generator: torch.Generator) -> dict:
        """Member k's checkpoint (echo.population.MEMBER_STATE), its weights in its own network's layout."""
        member = self.members[k]
        return {
            "state_dict": {f"net.{n}": v for n, v in self.net.member_state_dict(k).items()},
            "adam": self._optimizer.member_state(k, self.net.names, self.net.member_layout),
            "generator": generator.get_state(),
            "epochs_done": self.epochs_done if member.status == "RUNNING" else member.summary["epochs"],
            "summary": {"train_time_s": self.train_time_s(), **member.summary},
        }
