"""Populations (hydra/launcher=population): K runs trained as one stacked model, each member an
honest run that matches the independent run with its config."""

import signal
import time

import pytest
import torch
import yaml
from helpers import TINY, all_runs, artifacts, csv_metrics, make_cfg, metric_history, run_py, start_run_py
from pytorch_lightning.loggers import Logger

from echo.data import EchoData, PopulationData, held_out, to_batches, to_windows
from echo.encoding import PAD, LinearScale, OneHot
from echo.logger import Member
from echo.models import build_net
from echo.module import EchoModule
from echo.population import build_population, fit_population, population_key, why_not_stackable
from echo.stacked import MemberAdam, StackedNet, member_loss_sums, member_scored

POPULATION = ["-m", "hydra/launcher=population"]
MODELS = ["seq2seq", "encdec", "one_to_one", "many_to_one"]


def _members(name: str, rep, seeds=(0, 1, 2), hidden=8, n_in=5, n_out=3):
    nets = []
    for seed in seeds:
        torch.manual_seed(seed)
        nets.append(build_net(name, n_in, rep.n_features, hidden, rep.n_outputs, n_out))
    return nets


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("rep", [OneHot(20), LinearScale(20)], ids=["onehot", "linear"])
def test_a_stacked_network_computes_each_members_scores_state_and_gradient(name, rep):
    nets = _members(name, rep)
    stacked = StackedNet(nets)
    x = torch.randint(0, 20, (3, 7, 5))
    mask = None
    if name != "one_to_one":  # masked framing: left padding, as to_windows pads
        x[:, :2, :2] = PAD
        mask = x != PAD
    scores, state = stacked(rep.encode(x), None, mask)
    scores, _ = stacked(rep.encode(x), state, mask)  # a carried state, as a stateful run carries it
    y = x[..., :3].clamp(min=0)
    (member_loss_sums(rep, scores, y) / y[0].numel()).sum().backward()
    for k, net in enumerate(nets):
        kwargs = {"mask": mask[k]} if mask is not None else {}
        alone, state_k = net(rep.encode(x[k]), None, **kwargs)
        alone, _ = net(rep.encode(x[k]), state_k, **kwargs)
        torch.testing.assert_close(scores[k], alone, atol=1e-6, rtol=1e-5)
        (rep.loss_sum(alone, y[k]) / y[k].numel()).backward()
        for param_name, param in net.named_parameters():
            grad = stacked.p(param_name).grad[k]
            grad = grad.t() if param_name in stacked.matrices else grad.squeeze(0)
            torch.testing.assert_close(grad, param.grad, atol=1e-6, rtol=1e-4)
        assert all(torch.equal(v, net.state_dict()[n]) for n, v in stacked.member_state_dict(k).items())
    with torch.no_grad():  # evaluation's path: the same scores, one-hot inputs read as their tokens where they can be
        inputs = x if isinstance(rep, OneHot) and stacked.reads_tokens else rep.encode(x)
        _, state = stacked(inputs, None, mask)
        evaluated, _ = stacked(inputs, state, mask)
    torch.testing.assert_close(evaluated, scores.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rep", [OneHot(20), LinearScale(20)], ids=["onehot", "linear"])
def test_evaluation_scores_each_member_as_its_loss_and_decode_do(rep):
    torch.manual_seed(0)
    y = torch.randint(0, 20, (3, 64, 4))
    y[:, :5, :2] = PAD  # masked framing's padded targets count nowhere
    scores = torch.randn(3, 64, 4, rep.n_outputs) * 3
    if rep.n_outputs > 1:
        scores[0, 5:10] = 0.0  # ties: every class holds the maximum; decode's argmax takes the first
        scores[1, 5:10, :, 7] = scores[1, 5:10].amax(-1) + 1  # two classes share a maximum
        scores[1, 5:10, :, 3] = scores[1, 5:10, :, 7]
        y[1, 5:8] = 3
        y[1, 8:10] = 7
    loss_sums, right = member_scored(rep, scores, y)
    real = y != PAD
    torch.testing.assert_close(loss_sums, member_loss_sums(rep, scores, y), rtol=1e-6, atol=1e-5)
    assert torch.equal(right & real, (rep.decode(scores) == y) & real)
    assert (right & real).any() and not (right & real).all()


@pytest.mark.parametrize("stateful", [True, False])
@pytest.mark.parametrize("framing", ["drop", "mask"])
def test_each_members_batches_are_the_batches_it_would_train_on_alone(stateful, framing):
    seqs = torch.randint(0, 100, (3, 2, 25))  # 3 members, 2 sequences each
    windows = [to_windows(s, 5, 2, framing) for s in seqs]
    x, y = torch.stack([w[0] for w in windows]), torch.stack([w[1] for w in windows])
    batch_size = 7 if framing == "drop" else 5
    together = to_batches(x, y, batch_size, stateful)
    for k in range(3):
        alone = to_batches(*windows[k], batch_size, stateful)
        assert len(alone) == len(together)
        for (xa, ya), (xt, yt) in zip(alone, together):
            assert torch.equal(xa, xt[k]) and torch.equal(ya, yt[k])


@pytest.mark.parametrize("framing", ["drop", "mask"])
def test_each_member_draws_the_data_its_seed_gives_a_run_alone(framing):
    cfg = make_cfg(f"task.framing={framing}", "task.reverse_input=true")
    task, batch_size, stateful = cfg.task, 7 if framing == "drop" else 5, cfg.model.stateful
    data = PopulationData(task, [0, 7], batch_size, stateful, torch.device("cpu"))
    together = data.fresh_batches()
    x, y = data.held_out(2, [3, 4])
    for k, seed in enumerate((0, 7)):
        alone = EchoData(task, batch_size, stateful, seed)
        alone.setup("fit")
        for (xa, ya), (xt, yt) in zip(alone.fresh_batches(), together, strict=True):
            assert torch.equal(xa, xt[k]) and torch.equal(ya, yt[k])
        x_alone, y_alone = held_out(task, 2, 3 + k)
        assert torch.equal(x[k], x_alone) and torch.equal(y[k], y_alone)


def test_one_adam_over_stacked_weights_is_each_members_adam_and_a_frozen_member_stays_put():
    torch.manual_seed(0)
    lrs = [1e-3, 1e-2, 3e-3, 1e-1]
    stacked = torch.nn.Parameter(torch.randn(4, 6, 5))  # a (6, 5) weight for each of 4 members
    alone = [torch.nn.Parameter(stacked[k].detach().clone()) for k in range(4)]
    adams = [torch.optim.Adam([p], lr=lr, fused=True) for p, lr in zip(alone, lrs)]
    ours = MemberAdam([stacked], torch.tensor(lrs))
    for step in range(30):
        if step == 20:
            ours.freeze(3)
            frozen = stacked[3].detach().clone()
        grads = torch.randn(4, 6, 5)
        stacked.grad = grads.clone()
        ours.step()
        for k in range(3 if step >= 20 else 4):
            alone[k].grad = grads[k].clone()
            adams[k].step()
    for k in range(3):
        torch.testing.assert_close(stacked[k].detach(), alone[k].detach(), atol=1e-6, rtol=1e-5)
    assert torch.equal(stacked[3].detach(), frozen)


def test_seeds_and_learning_rates_share_a_population_and_shapes_do_not():
    base = population_key(make_cfg())
    assert population_key(make_cfg("seed=3", "model.lr=0.01", "stop_at=null")) == base
    assert population_key(make_cfg("model.hidden_size=50")) != base
    assert population_key(make_cfg("task.n_out=2")) != base
    assert why_not_stackable(make_cfg("model=encdec", "task.representation=linear")) is None
    assert "resume" in why_not_stackable(make_cfg("resume=abc"))


VARIANTS = {  # the networks and settings a population trains
    "listing A": [],
    "listing B": ["model=encdec", "task.n_out=2"],
    "stateless": ["model.stateful=false"],
    "masked": ["task.framing=mask", "task.n_out=2", "model.batch_size=5"],
    "linear": ["model=encdec", "task.n_out=2", "task.representation=linear"],
    "many_to_one": ["model=many_to_one", "task.n_out=2"],
    "one_to_one": ["model=one_to_one", "task.n_in=1", "task.n_out=1", "model.batch_size=5"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_training_epoch_reads_nothing_back_from_the_device(variant, monkeypatch):
    """On a GPU a population's epoch is captured in a CUDA graph, and a capture fails on any read of
    a value back to the host (.item(), .tolist(), a tensor's truth value). Here, where there is no
    GPU: the epoch trains while every such read raises."""
    members = [Member(make_cfg("logger=none", f"seed={seed}", *VARIANTS[variant]), f"m{seed}", {}) for seed in (0, 1)]
    trainer, population, data = build_population(members)
    before = population.net.p(population.net.names[0]).detach().clone()

    def read(*args):
        raise AssertionError("a training epoch read a value back from the device")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, read)
    sums = population._train_epoch(data.draw())
    monkeypatch.undo()
    assert sums.shape == (4, 2) and (sums[1] > 0).all()  # [loss, tokens, correct, scored tokens] per member
    assert not torch.equal(population.net.p(population.net.names[0]), before)  # it trained


def test_members_still_training_train_alone_as_they_would_with_the_stopped_ones_masked():
    """Where a step is arithmetic-bound (wide, on a CPU), a member that stops is left out of the
    forward and backward: the others train exactly as when it is only masked out of Adam's step."""
    cfgs = [make_cfg("logger=none", "model=encdec", "task.n_out=2", f"seed={seed}") for seed in (0, 1, 2)]
    runs = {}
    for compact in (True, False):
        trainer, population, data = build_population([Member(cfg, f"m{cfg.seed}", {}) for cfg in cfgs])
        assert population.compact  # listing B's fast regime is wide
        population.compact, population._t0 = compact, time.perf_counter()
        losses = []
        for epoch in range(1, 9):
            if epoch == 4:
                population._stop(population.members[1], 3)
                stopped = [population.net.p(name)[1].detach().clone() for name in population.net.names]
            losses.append(population.train_epoch(data.draw))
        runs[compact] = population, torch.stack(losses)
    (compacted, together), (masked, apart) = runs[True], runs[False]
    assert compacted._training.tolist() == [0, 2] and masked._training is None
    torch.testing.assert_close(together[:, :, [0, 2]], apart[:, :, [0, 2]], atol=1e-5, rtol=1e-5)
    assert (together[3:, :, 1] == 0).all()  # the stopped member's sums, once it is left out
    for name, before in zip(compacted.net.names, stopped):
        torch.testing.assert_close(compacted.net.p(name), masked.net.p(name), atol=1e-6, rtol=1e-5)
        assert torch.equal(compacted.net.p(name)[1], before)


def test_a_member_resumed_from_its_checkpoint_trains_on_as_if_never_stopped():
    """A member's checkpoint (weights, Adam, data generator, epochs, summary) restores it alone, in a
    population of one: it trains the epochs it had left exactly as it would have in its population."""
    settings = ["logger=none", "stop_at=null", "trainer.check_val_every_n_epoch=2", "model=encdec", "task.n_out=2"]

    def population(epochs: int, seeds=(0, 1), restore=None):
        cfgs = [make_cfg(*settings, f"trainer.max_epochs={epochs}", f"seed={seed}") for seed in seeds]
        members = [Member(cfg, f"m{cfg.seed}", {}, logger=Rows()) for cfg in cfgs]
        trainer, together, data = build_population(members, restore)
        fit_population(trainer, together, data, threads=1)
        return together, data

    (whole, _), (halted, data) = population(10), population(6)
    state = halted.member_state(1, data.generators[1])
    assert state["epochs_done"] == 6 and state["adam"]["step"] == 6 * len(data.draw())
    resumed, _ = population(10, seeds=(1,), restore=state)
    for name in whole.net.names:
        torch.testing.assert_close(resumed.net.p(name)[0], whole.net.p(name)[1], atol=1e-6, rtol=1e-5)

    def losses(member):
        return [(epoch, value) for name, epoch, value in member.logger.rows if name == "train/loss"]

    together, alone = losses(whole.members[1]), losses(resumed.members[0])
    assert [epoch for epoch, _ in alone] == [7, 8, 9, 10]  # it logs the epochs it trains, from the 7th
    assert [value for _, value in alone] == pytest.approx([value for _, value in together[6:]], rel=1e-5)


def test_an_interrupt_between_an_epochs_sums_and_its_count_checkpoints_the_epochs_it_logged(monkeypatch):
    """Ctrl-C or SIGTERM lands wherever Python checks for signals, also between an epoch's training
    sums and its count: the checkpoint then counts the epochs its member logged, and the epoch trained
    is neither lost nor trained again on resume."""
    settings = ["logger=none", "stop_at=null", "trainer.max_epochs=8", "trainer.check_val_every_n_epoch=4"]
    members = [Member(make_cfg(*settings, f"seed={seed}"), f"m{seed}", {}, logger=Rows()) for seed in (0, 1)]
    trainer, module, data = build_population(members)
    count, signals = type(module).__setattr__, [signal.SIGTERM]

    def interrupt_the_third_count(self, name, value):
        if name == "epochs_done" and value == 3 and signals:
            raise KeyboardInterrupt(signals.pop())
        count(self, name, value)

    monkeypatch.setattr(type(module), "__setattr__", interrupt_the_third_count)
    with pytest.raises(SystemExit):  # Lightning's, after a KeyboardInterrupt
        fit_population(trainer, module, data, threads=1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after one
    monkeypatch.undo()
    module.log_train_metrics()  # as the population does on an interrupt, before saving checkpoints
    for k, member in enumerate(members):
        logged = [step for name, step, _ in member.logger.rows if name == "train/loss"]
        assert logged == [1, 2, 3] and module.member_state(k, data.generators[k])["epochs_done"] == 3


def test_an_interrupt_while_a_population_logs_its_epochs_loses_none_of_them():
    """Ctrl-C or SIGTERM while the members' training metrics are being logged: those not logged yet
    are logged as the population stops, so each member's metrics reach the epoch its checkpoint counts."""

    class InterruptedOnce(Rows):
        interrupts = [signal.SIGTERM]

        def log_metrics(self, metrics, step=None):
            if step == 3 and self.interrupts:
                raise KeyboardInterrupt(self.interrupts.pop())
            super().log_metrics(metrics, step)

    settings = ["logger=none", "stop_at=null", "trainer.max_epochs=8", "trainer.check_val_every_n_epoch=4"]
    members = [Member(make_cfg(*settings, "seed=0"), "m0", {}, logger=Rows())]
    members.append(Member(make_cfg(*settings, "seed=1"), "m1", {}, logger=InterruptedOnce()))
    trainer, module, data = build_population(members)
    with pytest.raises(SystemExit):  # Lightning's, after a KeyboardInterrupt
        fit_population(trainer, module, data, threads=1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after one
    for k, member in enumerate(members):
        logged = {step for name, step, _ in member.logger.rows if name == "train/loss"}
        assert logged == {1, 2, 3, 4} and module.member_state(k, data.generators[k])["epochs_done"] == 4


def test_an_interrupt_in_a_validation_finishes_it_and_tests_the_members_it_stopped():
    """Ctrl-C or SIGTERM after a validation epoch's training and before its validation is done (here,
    while m1 logs it): each member still training validates before its checkpoint is saved, once, and
    a member the validation stopped (m0, stop_at=0) is tested and ends FINISHED, as the step would have."""

    class InterruptedOnce(Rows):
        interrupts = [signal.SIGTERM]

        def log_metrics(self, metrics, step=None):
            if "val/exact_match" in metrics and self.interrupts:
                raise KeyboardInterrupt(self.interrupts.pop())
            super().log_metrics(metrics, step)

    settings = ["logger=none", "trainer.max_epochs=8", "trainer.check_val_every_n_epoch=4"]
    members = [Member(make_cfg(*settings, "stop_at=0.0", "seed=0"), "m0", {}, logger=Rows())]
    members.append(Member(make_cfg(*settings, "stop_at=null", "seed=1"), "m1", {}, logger=InterruptedOnce()))
    trainer, module, data = build_population(members)
    with pytest.raises(SystemExit):  # Lightning's, after a KeyboardInterrupt
        fit_population(trainer, module, data, threads=1)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores Ctrl-C after one
    m0, m1 = members
    assert m0.status == "FINISHED" and "test/exact_match" in m0.summary and m0.summary["epochs"] == 4
    assert [step for name, step, _ in m0.logger.rows if name == "val/exact_match"] == [4]
    assert [step for name, step, _ in m1.logger.rows if name == "val/exact_match"] == [4]
    assert m1.status == "RUNNING" and module.member_state(1, data.generators[1])["epochs_done"] == 4


class Rows(Logger):
    """A Lightning logger that keeps the rows it is given, (name, step, value)."""

    name, version = "rows", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows += [(name, step, value) for name, value in metrics.items()]

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _history(uri, run_id, name):
    from echo.tracking import mlflow_client

    return {m.step: m.value for m in mlflow_client().get_metric_history(run_id, name)}


def _by_tag(runs, tag):
    return [r for r in runs if tag in r.data.tags]


@pytest.mark.slow
def test_members_are_ordinary_children_of_the_sweep_and_match_independent_runs(store, tmp_path):
    from echo.train import train

    settings = ["trainer.max_epochs=10", "trainer.check_val_every_n_epoch=5", "progress=false"]
    result = run_py(*POPULATION, "seed=0,1", "model.lr=1e-3,3e-3", *settings, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train as one stacked model" in result.stderr
    parent = next(r for r in all_runs(store) if r.data.tags.get("echo.sweep_parent") == "true")
    assert f"MLflow sweep '{parent.info.run_name}' ({parent.info.run_id})" in result.stdout.splitlines()[-1]
    members = _by_tag(all_runs(store), "echo.population")
    assert len(members) == 4 and len({m.data.tags["echo.population"] for m in members}) == 1
    for member in members:
        assert member.info.status == "FINISHED"
        assert member.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert member.data.tags["echo.sweep"] == parent.data.tags["echo.sweep"]  # one sweep folder, resolved once
        assert {"config.yaml", "expected_predicted.txt", "learning_curve.png"} <= set(
            artifacts(store, member.info.run_id)
        )
    for seed, lr in [(0, "0.001"), (1, "0.003")]:
        member = next(m for m in members if m.data.params["seed"] == str(seed) and m.data.params["model.lr"] == lr)
        train(make_cfg(f"seed={seed}", f"model.lr={lr}", *settings), run_name=f"alone {seed}")
        alone = next(r for r in all_runs(store) if r.info.run_name == f"alone {seed}")
        assert member.data.params == alone.data.params  # the same resolved config
        assert set(member.data.metrics) == set(alone.data.metrics)
        assert artifacts(store, member.info.run_id) == artifacts(store, alone.info.run_id)  # figures, network
        assert artifacts(store, member.info.run_id, "model") == ["model/config.yaml", "model/weights.pt"]
        for name in ("train/loss", "train/acc", "val/loss"):
            ours, theirs = _history(store, member.info.run_id, name), _history(store, alone.info.run_id, name)
            assert ours.keys() == theirs.keys()
            assert all(abs(ours[e] - theirs[e]) < 1e-4 for e in ours), (name, ours, theirs)
        assert abs(member.data.metrics["test/token_acc"] - alone.data.metrics["test/token_acc"]) < 2e-3
    # a member's stored network is tested again as any run's is (echo.reuse), and scores the same
    again = run_py(f"evaluate={member.info.run_id}", "progress=false", cwd=tmp_path, uri=store)
    assert again.returncode == 0, again.stderr[-3000:]
    (run,) = [r for r in all_runs(store) if r.data.tags.get("echo.evaluated_from") == member.info.run_id]
    assert run.data.metrics["test/exact_match"] == pytest.approx(member.data.metrics["test/exact_match"], abs=1e-6)


@pytest.mark.slow
def test_a_population_reaches_the_target_when_its_members_alone_do_and_stops_each_on_its_own(store, tmp_path):
    """Listing A to stop_at: each member stops at its own validation, frozen, as its run alone stops."""
    from echo.train import train

    result = run_py(*POPULATION, "seed=0,1", "progress=false", cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    members = {int(m.data.params["seed"]): m for m in _by_tag(all_runs(store), "echo.population")}
    for seed, member in members.items():
        alone = train(make_cfg(f"seed={seed}"), run_name=f"alone {seed}")
        ours = member.data.metrics
        assert abs(ours["epochs_to_target"] - alone["epochs_to_target"]) <= 20, (ours, alone)
        assert ours["test/exact_match"] >= 0.99
        assert max(_history(store, member.info.run_id, "train/loss")) == ours["epochs"]  # nothing after its stop


@pytest.mark.slow
def test_a_diverging_member_fails_and_the_others_go_on(store, tmp_path):
    settings = ["trainer.max_epochs=10", "trainer.check_val_every_n_epoch=5", "stop_at=null", "progress=false"]
    result = run_py(*POPULATION, "model.lr=1e-3,1e38", *settings, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    members = {m.data.params["model.lr"]: m for m in _by_tag(all_runs(store), "echo.population")}
    failed, fine = members["1e+38"], members["0.001"]
    assert failed.info.status == "FAILED" and "training diverged" in failed.data.tags["echo.error"]
    assert "echo: run failed" in result.stderr
    assert fine.info.status == "FINISHED" and fine.data.metrics["epochs"] == 10
    assert max(_history(store, fine.info.run_id, "train/loss")) == 10


@pytest.mark.slow
def test_shapes_form_populations_of_at_most_max_members_and_the_rest_run_alone(store, tmp_path):
    settings = ["trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2", "progress=false"]
    sweep = ["model.hidden_size=4,8", "seed=0,1,2", "hydra.launcher.max_members=2"]
    result = run_py(*POPULATION, *sweep, *settings, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    children = [r for r in all_runs(store) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    populations = {}
    for run in _by_tag(children, "echo.population"):
        populations.setdefault(run.data.tags["echo.population"], set()).add(
            (run.data.params["model.hidden_size"], run.data.params["seed"])
        )
    assert sorted(populations.values(), key=sorted) == [{("4", "0"), ("4", "1")}, {("8", "0"), ("8", "1")}]


@pytest.mark.slow
def test_jobs_with_no_stacked_form_run_alone_with_a_line_saying_so(store, tmp_path):
    result = run_py(*POPULATION, "seed=0,1", "+resume=null", "model.cell=gru", *TINY, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("runs on its own: model.cell=gru has no stacked form") == 2
    children = [r for r in all_runs(store) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and not _by_tag(children, "echo.population")


def _wait_for_running_members(uri, proc, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        running = [r for r in all_runs(uri) if r.info.status == "RUNNING" and "echo.population" in r.data.tags]
        if len(running) == n:
            return
        time.sleep(0.5)
    raise AssertionError("the members never started")


@pytest.mark.slow
def test_sigterm_ends_every_member_killed_with_its_checkpoint(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    long_runs = ["seed=0,1,2", "trainer.max_epochs=100000", "stop_at=null", "progress=false"]
    assert all_runs(uri) == []  # the store's tables exist before the sweep: polling it cannot race their creation
    proc = start_run_py(*POPULATION, *long_runs, cwd=tmp_path, uri=uri)
    try:
        _wait_for_running_members(uri, proc, 3)
        time.sleep(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) != 0
    finally:
        proc.kill()
    output = proc.stdout.read()
    assert "checkpoints saved" in output, output[-3000:]
    runs = all_runs(uri)
    assert sorted(r.info.status for r in runs) == ["KILLED"] * 4  # the parent and its three members
    for member in _by_tag(runs, "echo.population"):
        assert set(artifacts(uri, member.info.run_id, "checkpoints")) == {
            "checkpoints/config.yaml",
            "checkpoints/population.pt",
        }
        assert "train/loss" in member.data.metrics  # its metrics so far
    # a member resumed alone: a new run that trains on from its checkpoint's epoch
    done = max(step for step, _ in metric_history(uri, member.info.run_id, "train/loss"))
    resumed = run_py(f"resume={member.info.run_id}", f"trainer.max_epochs={done + 20}", cwd=tmp_path, uri=uri)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (run,) = [r for r in all_runs(uri) if r.data.tags.get("echo.resumed_from") == member.info.run_id]
    assert run.info.status == "FINISHED" and "echo.population" not in run.data.tags
    steps = [step for step, _ in metric_history(uri, run.info.run_id, "train/loss")]
    assert steps == list(range(done + 1, done + 21))
    assert "test/exact_match" in run.data.metrics and run.data.params["seed"] == member.data.params["seed"]


# -- Lightning's gradient clipping and accumulation, precision 64: as an independent run's ----------


def test_clipping_a_members_gradient_norm_is_clipping_it_alone():
    from echo.steps import StepSettings

    torch.manual_seed(0)
    stacked = [torch.nn.Parameter(torch.randn(3, 6, 5)), torch.nn.Parameter(torch.randn(3, 1, 5))]
    grads = [torch.randn(3, 6, 5) * torch.tensor([10.0, 0.01, 3.0]).view(3, 1, 1), torch.randn(3, 1, 5)]
    for p, g in zip(stacked, grads):
        p.grad = g.clone()
    StepSettings(clip_val=0.5).clip(stacked, members=True)
    for k in range(3):
        alone = [torch.nn.Parameter(p[k].detach().clone()) for p in stacked]
        for p, g in zip(alone, grads):
            p.grad = g[k].clone()
        before = torch.nn.utils.clip_grad_norm_(alone, 0.5)  # Lightning's norm clipping
        for p, q in zip(stacked, alone):
            torch.testing.assert_close(p.grad[k], q.grad, atol=1e-7, rtol=1e-6)
        after = torch.linalg.vector_norm(torch.cat([p.grad[k].flatten() for p in stacked]))
        assert after == pytest.approx(min(0.5, float(before)), rel=1e-5)  # member 1's small gradient is kept
    StepSettings(clip_val=1e-3, clip_algorithm="value").clip(stacked, members=True)
    assert max(float(p.grad.abs().max()) for p in stacked) == pytest.approx(1e-3)  # clamped, float32


STEPS = {  # Lightning's trainer settings echo's own steps take, each a real change to the updates
    "clip norm, accumulate 2": ["+trainer.gradient_clip_val=0.05", "+trainer.accumulate_grad_batches=2"],
    "clip value": ["+trainer.gradient_clip_val=0.001", "+trainer.gradient_clip_algorithm=value"],
    "precision 64, clip norm": ["+trainer.precision=64", "+trainer.gradient_clip_val=0.05"],
}


@pytest.mark.slow
@pytest.mark.parametrize("steps", STEPS)
def test_a_member_steps_as_its_independent_run_does_clipped_accumulated_or_in_float64(steps, monkeypatch):
    """Listing A, 4 epochs of 3 batches: each member's weights after its clipped (or accumulated, or
    float64) steps are its independent run's (echo.train), which differ from the plain ones."""
    from echo import train as training

    settings = ["logger=none", "stop_at=null", "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2"]
    modules = []
    monkeypatch.setattr(training, "EchoModule", lambda *a, **k: modules.append(EchoModule(*a, **k)) or modules[-1])
    cfgs = [make_cfg(*settings, *STEPS[steps], f"seed={seed}") for seed in (0, 1)]
    trainer, population, data = build_population([Member(cfg, f"m{cfg.seed}", {}) for cfg in cfgs])
    fit_population(trainer, population, data, threads=1)
    for k, cfg in enumerate(cfgs):
        training.train(cfg)
        training.train(make_cfg(*settings, f"seed={cfg.seed}"))  # plain steps
        (alone, plain), modules[:] = modules, []
        ours = population.net.member_state_dict(k)
        for name, value in alone.net.state_dict().items():
            assert ours[name].dtype == value.dtype == (torch.float64 if "64" in steps else torch.float32)
            torch.testing.assert_close(ours[name], value, atol=1e-5, rtol=1e-4)
        assert any(not torch.allclose(v, plain.net.state_dict()[n].to(v.dtype)) for n, v in ours.items())
        adam_steps = int(next(iter(alone.optimizers().optimizer.state.values()))["step"])
        assert adam_steps == int(population.optimizer()._step) == (8 if "accumulate 2" in steps else 12)


def test_members_log_through_their_own_lightning_loggers_with_logger_csv(store, tmp_path):
    """Each member's metrics go through a Lightning Logger of its own: with logger=csv, one metrics.csv
    per member with every epoch's train/loss and the validations, and its Expected/Predicted table."""
    result = run_py(*POPULATION, "seed=0,1", "logger=csv", *TINY, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train as one stacked model" in result.stderr
    folders = sorted(path.parent for path in tmp_path.rglob("metrics.csv"))
    assert len(folders) == 2
    for folder in folders:
        assert [step for step, _ in csv_metrics(folder, "train/loss")] == list(range(1, 11))
        assert [step for step, _ in csv_metrics(folder, "val/exact_match")] == [5, 10]
        assert (
            csv_metrics(folder, "test/exact_match") and "Expected: [" in (folder / "expected_predicted.txt").read_text()
        )
    assert {yaml.safe_load((folder / "config.yaml").read_text())["seed"] for folder in folders} == {0, 1}
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("launcher", [[], POPULATION], ids=["run", "population"])
def test_lightnings_own_trainer_settings_reach_a_run_and_a_population(launcher, store, tmp_path):
    """A population trains through Lightning's Trainer as a run does: trainer.max_time ends it (each
    member FINISHED and tested, long before max_epochs), with deterministic algorithms and anomaly detection on."""
    lightning = ["+trainer.max_time=00:00:00:03", "+trainer.deterministic=true", "+trainer.detect_anomaly=true"]
    result = run_py(*launcher, "seed=0,1" if launcher else "seed=0", *lightning, "trainer.max_epochs=100000",
                    "stop_at=null", "progress=false", cwd=tmp_path, uri=store)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [r for r in all_runs(store) if r.data.tags.get("echo.sweep_parent") != "true"]
    assert len(runs) == (2 if launcher else 1)
    for run in runs:
        assert run.info.status == "FINISHED" and "test/exact_match" in run.data.metrics
        assert 0 < run.data.metrics["epochs"] < 100000 and run.data.params["trainer.max_time"] == "00:00:00:03"


def test_a_populations_progress_bar_counts_the_tutorials_epochs(capsys):
    """progress=true (the default): one bar over the population's tutorial epochs, as a run has, ending
    at trainer.max_epochs with the members still training and the best member's val/exact_match."""
    settings = ["logger=none", "stop_at=null", "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=2"]
    members = [Member(make_cfg(*settings, "progress=true", f"seed={seed}"), f"m{seed}", {}) for seed in (0, 1)]
    fit_population(*build_population(members), threads=1)
    bar = capsys.readouterr().err.split("\r")[-1]
    assert "6/6" in bar and "training=2/2" in bar and "best val/exact_match=0." in bar, bar
