"""On a CUDA GPU: data drawn on the device, epochs replayed as CUDA graphs, runs tracked.

Skipped where torch sees no GPU (as in CI); run them on a GPU machine with `pytest tests/test_gpu.py`.
"""

import math
import tempfile

import pytest
import pytorch_lightning as pl
import torch
from helpers import TINY, all_runs, csv_metrics, make_cfg, metric_history, run_py
from pytorch_lightning.loggers import CSVLogger

from echo.data import EchoData
from echo.logger import Member
from echo.models import build_net
from echo.module import EchoModule
from echo.population import build_population
from echo.speedups import WARM_EPOCHS
from echo.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU = ["trainer.accelerator=gpu", "logger=none", "stop_at=null", "trainer.check_val_every_n_epoch=5"]
VARIANTS = {
    "listing B, fast regime": ["model=encdec", "task.n_out=2"],
    "listing A": [],
    "stateless": ["model.stateful=false"],
    "masked framing": ["task.framing=mask", "task.n_out=2", "model.batch_size=5"],
    "linear representation": ["task.representation=linear"],
    # Lightning's settings echo's own steps take (echo/steps.py), captured with the epoch
    "clipped, accumulated": ["+trainer.gradient_clip_val=0.05", "+trainer.accumulate_grad_batches=2"],
    "float64, clipped by value": [
        "+trainer.precision=64",
        "+trainer.gradient_clip_val=0.01",
        "+trainer.gradient_clip_algorithm=value",
    ],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_graphed_epochs_train_as_eager_epochs_do(variant):
    """Capturing an epoch in a CUDA graph changes nothing but the speed: the same draws, the
    same steps, the same metrics (to float rounding)."""
    settings = [*GPU, *VARIANTS[variant], "trainer.max_epochs=15"]
    graphed, eager = train(make_cfg(*settings, "cuda_graph=true")), train(make_cfg(*settings, "cuda_graph=false"))
    for name in ("val/loss", "test/token_acc", "test/exact_match"):
        assert graphed[name] == pytest.approx(eager[name], rel=1e-3, abs=1e-3), name
    assert math.isfinite(graphed["val/loss"])


def fit(epochs: int, cuda_graph: bool) -> EchoModule:
    tmp = tempfile.mkdtemp()
    cfg = make_cfg(*GPU, "model=encdec", "task.n_out=2")
    torch.manual_seed(0)
    net = build_net("encdec", n_in=5, n_features=100, hidden_size=150, n_classes=100, n_out=2)
    module = EchoModule(net, 100, 1e-2, True, windows_per_epoch=8 * 21, cuda_graph=cuda_graph)
    data = EchoData(cfg.task, 21, True, seed=0)
    trainer = pl.Trainer(
        accelerator="gpu", devices=1, max_epochs=epochs, logger=CSVLogger(tmp), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, check_val_every_n_epoch=5,
    )  # fmt: skip
    trainer.fit(module, data)
    assert data.val[0].is_cuda and data.train_generator.device.type == "cuda"  # data lives on the GPU
    return module


def test_an_epoch_is_captured_after_the_warm_up_and_replayed():
    module = fit(WARM_EPOCHS + 5, cuda_graph=True)
    assert module._graph.graph is not None
    losses = [v for _, v in csv_metrics(module.logger.log_dir, "train/loss")]
    assert len(losses) == WARM_EPOCHS + 5 and len(set(losses)) == len(losses)  # fresh data every replay
    assert fit(WARM_EPOCHS + 5, cuda_graph=False)._graph.graph is None


def test_a_gpu_run_is_tracked_in_mlflow(store, tmp_path):
    result = run_py(*TINY, "model=encdec", "task.n_out=2", "trainer.accelerator=gpu", cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr
    (run,) = all_runs(store)
    assert run.info.status == "FINISHED" and run.data.params["trainer.accelerator"] == "gpu"
    assert [step for step, _ in metric_history(store, run.info.run_id, "train/loss")] == list(range(1, 11))
    assert [step for step, _ in metric_history(store, run.info.run_id, "val/exact_match")] == [5, 10]
    assert {"test/token_acc", "test/exact_match", "train_time_s"} <= set(run.data.metrics)


def test_loading_the_cuda_libraries_first_changes_nothing(monkeypatch):
    """The forward and backward pass that loads cuDNN and cuBLAS before training learns nothing
    and draws no random number: the run is the same without it."""
    settings = [*GPU, "model=encdec", "task.n_out=2", "trainer.max_epochs=10"]
    loaded = train(make_cfg(*settings))
    monkeypatch.setattr(EchoModule, "_load_cuda_libraries", lambda self: None)
    skipped = train(make_cfg(*settings))
    for name in ("val/loss", "test/token_acc", "test/exact_match"):
        assert loaded[name] == pytest.approx(skipped[name], rel=1e-4, abs=1e-5), name


def _population(settings: list[str], graphed: bool):
    cfgs = [make_cfg(*GPU, *settings, f"cuda_graph={graphed}", f"seed={seed}") for seed in (0, 1, 2)]
    return build_population([Member(cfg, f"seed={cfg.seed}", {}) for cfg in cfgs])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_populations_graphed_epochs_train_as_its_eager_epochs_do(variant):
    """A population's epoch is captured after the warm-up and replayed; freezing a member captures
    it again. Nothing changes but the speed: the same draws, the same steps, the frozen member
    stays put."""
    losses, weights = {}, {}
    for graphed in (True, False):
        _, population, data = _population(VARIANTS[variant], graphed)
        first = population.net.p(population.net.names[0])
        sums, captured = [], None
        for epoch in range(1, WARM_EPOCHS + 9):
            if epoch == WARM_EPOCHS + 4:
                captured = population._graph.graph if graphed else None
                population._freeze(population.members[1])
                frozen = first[1].detach().clone()
            sums.append(population.train_epoch(data.draw))
        assert torch.equal(first[1], frozen)  # member 1 stayed put after its freeze
        if graphed:
            assert captured is not None and population._graph.graph is not None
            assert population._graph.graph is not captured  # captured again after the freeze
        else:
            assert population._graph is None
        sums = torch.stack(sums)  # (epochs, 4, members)
        losses[graphed], weights[graphed] = sums[:, 0] / sums[:, 1], first.detach().clone()
        assert len(set(losses[graphed][:, 0].tolist())) == len(losses[graphed])  # fresh data every replay
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-3, atol=1e-5)


def test_a_population_on_the_gpu_is_tracked_and_its_members_match_independent_runs(store, tmp_path):
    settings = [*TINY, "model=encdec", "task.n_out=2", "trainer.accelerator=gpu"]
    result = run_py("-m", "hydra/launcher=population", "seed=0,1", *settings, cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr
    result = run_py(*settings, "seed=1", "logger.experiment=alone", cwd=tmp_path, uri=store)
    assert result.returncode == 0, result.stderr
    members, (alone,) = [r for r in all_runs(store) if "echo.population" in r.data.tags], all_runs(store, "alone")
    assert len(members) == 2 and all(r.info.status == "FINISHED" for r in members)
    (member,) = [r for r in members if r.data.params["seed"] == "1"]
    for name in ("train/loss", "val/loss"):
        together = metric_history(store, member.info.run_id, name)
        apart = metric_history(store, alone.info.run_id, name)
        assert [step for step, _ in together] == [step for step, _ in apart]
        for (_, a), (_, b) in zip(together[:5], apart[:5]):  # cuDNN's LSTM against the stacked cell: rounding
            assert a == pytest.approx(b, rel=1e-3), name
