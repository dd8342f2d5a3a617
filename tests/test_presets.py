"""The presets say what the tutorial says; every preset composes into a valid config."""

from pathlib import Path

import pytest
from helpers import CONF, make_cfg
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from echo.config import validate
from echo.policy import cpu_threads, epochs_per_step
from echo.train import train

EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))


def settings(cfg) -> dict:
    return {
        "model": cfg.model.name,
        "hidden_size": cfg.model.hidden_size,
        "stateful": cfg.model.stateful,
        "batch_size": cfg.model.batch_size,
        "lr": cfg.model.lr,
        "n_in": cfg.task.n_in,
        "n_out": cfg.task.n_out,
        "length": cfg.task.length,
        "n_unique": cfg.task.n_unique,
        "sequences_per_epoch": cfg.task.sequences_per_epoch,
        "epochs": cfg.trainer.max_epochs,
        "stop_at": cfg.stop_at,
    }


LISTING_A = dict(
    model="seq2seq",
    hidden_size=20,
    stateful=True,
    batch_size=7,
    lr=1e-3,
    n_in=5,
    n_out=5,
    length=25,
    n_unique=100,
    sequences_per_epoch=1,
    epochs=500,
    stop_at=None,
)
LISTING_B = dict(
    model="encdec",
    hidden_size=150,
    stateful=True,
    batch_size=21,
    lr=1e-3,
    n_in=5,
    n_out=2,
    length=25,
    n_unique=100,
    sequences_per_epoch=1,
    epochs=5000,
    stop_at=None,
)


def test_tutorial_presets_are_the_listings_exactly():
    assert settings(make_cfg("experiment=tutorial_full_echo")) == LISTING_A
    assert settings(make_cfg("experiment=tutorial_partial_echo")) == LISTING_B


def test_the_default_run_is_listing_a_with_an_early_stop():
    assert settings(make_cfg()) == {**LISTING_A, "stop_at": 0.995}


def test_model_encdec_brings_listing_b_network_with_the_fast_regime():
    cfg = settings(make_cfg("model=encdec", "task.n_out=2"))
    assert cfg == {**LISTING_B, "sequences_per_epoch": 8, "lr": 1e-2, "epochs": 1000, "stop_at": 0.995}


@pytest.mark.parametrize(
    "overrides, batch",
    [([], 21), (["task.n_in=10", "task.n_out=10", "task.reverse_input=true"], 16), (["task.framing=mask"], 25)],
)
def test_listing_b_batches_one_whole_sequence_whatever_the_window(overrides, batch):
    """A stateful batch of one sequence's windows: a longer window (fewer windows) still runs."""
    cfg = make_cfg("model=encdec", *overrides)
    assert cfg.model.batch_size == batch
    validate(cfg)


def test_threads_auto_gives_wide_steps_a_second_core_when_the_job_has_one():
    """One thread for the tutorials' narrow steps; two for the fast regime's 168-window steps,
    unless the process may use one core only (SLURM's cpus_per_task=1) or its parallel launcher
    grants each job one thread (joblib and Ray set OMP_NUM_THREADS)."""
    narrow = [make_cfg(), make_cfg("experiment=tutorial_full_echo"), make_cfg("experiment=tutorial_partial_echo")]
    assert [cpu_threads(cfg, cores=16, environ={}) for cfg in narrow] == [1, 1, 1]
    fast = make_cfg("model=encdec", "task.n_out=2")
    assert cpu_threads(fast, cores=2, environ={}) == cpu_threads(fast, cores=16, environ={}) == 2
    assert cpu_threads(fast, cores=1, environ={}) == cpu_threads(fast, cores=2, environ={"OMP_NUM_THREADS": "1"}) == 1
    assert cpu_threads(make_cfg("threads=3"), cores=2, environ={}) == 3  # a number is taken as it is


def test_a_lightning_step_trains_every_epoch_up_to_the_next_validation_checkpoint_or_end():
    assert epochs_per_step(make_cfg("experiment=tutorial_partial_echo")) == 50  # 5,000 epochs, validation every 50
    assert epochs_per_step(make_cfg()) == epochs_per_step(make_cfg("model=encdec")) == 10
    assert epochs_per_step(make_cfg("trainer.max_epochs=1234")) == 2  # ends at epoch 1234
    assert epochs_per_step(make_cfg("checkpoint_every=4")) == 2
    assert epochs_per_step(make_cfg(), resumed=5) == 5  # the resumed run's counts convert


def test_any_setting_is_one_override_away():
    cfg = make_cfg("model=encdec", "trainer.max_epochs=50", "seed=3", "task.sequences_per_epoch=1")
    assert (cfg.trainer.max_epochs, cfg.seed, cfg.task.sequences_per_epoch) == (50, 3, 1)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_is_a_valid_config(name):
    validate(make_cfg(f"experiment={name}"))


# What each preset composes to. The presets state only what differs from the model files and the
# shared study base (conf/study_base.yaml); these are the values they composed to when each still
# spelled everything out, so reducing a preset must not change them.
PINNED_KEYS = (
    "model.name",
    "model.hidden_size",
    "model.stateful",
    "model.batch_size",
    "model.lr",
    "task.n_in",
    "task.n_out",
    "task.length",
    "task.sequences_per_epoch",
    "trainer.max_epochs",
    "trainer.check_val_every_n_epoch",
    "stop_at",
    "progress",
    "logger.experiment",
)
PINNED = {
    "fast_partial_echo": ("encdec", 150, True, 21, 1e-2, 5, 2, 25, 8, 1000, 10, 0.995, True, "echo"),
    "tutorial_full_echo": ("seq2seq", 20, True, 7, 1e-3, 5, 5, 25, 1, 500, 10, None, True, "echo"),
    "tutorial_partial_echo": ("encdec", 150, True, 21, 1e-3, 5, 2, 25, 1, 5000, 50, None, True, "echo"),
    "study_capacity": ("encdec", 150, True, 21, 1e-2, 5, 5, 25, 8, 3000, 10, 0.995, False, "study_capacity"),
    "study_linear": ("seq2seq", 20, True, 7, 1e-3, 5, 5, 25, 1, 500, 10, None, False, "study_linear"),
    "study_long": ("seq2seq", 20, True, 7, 1e-2, 5, 5, 25, 1, 200, 10, 0.995, False, "study_long"),
    "study_masking": ("encdec", 150, False, 25, 1e-2, 5, 2, 25, 8, 600, 10, 0.995, False, "study_masking"),
    "study_stateless": ("seq2seq", 20, True, 7, 1e-3, 5, 5, 25, 1, 500, 10, 0.995, False, "study_stateless"),
    "study_topology": ("seq2seq", 20, True, 7, 1e-3, 5, 5, 25, 1, 1000, 10, 0.995, False, "study_topology"),
    # sweep jobs that swap the model keep the study's regime, not the model file's
    "study_long model=encdec task.n_in=50": (
        "encdec", 150, True, 21, 1e-2, 50, 50, 70, 1, 200, 10, 0.995, False, "study_long"
    ),
    "study_topology model=one_to_one": (
        "one_to_one", 20, True, 7, 1e-3, 5, 5, 25, 1, 1000, 10, 0.995, False, "study_topology"
    ),
    "study_topology model=many_to_one model.hidden_size=100": (
        "many_to_one", 100, True, 7, 1e-3, 5, 5, 25, 1, 1000, 10, 0.995, False, "study_topology"
    ),
}  # fmt: skip


def composed(preset_and_overrides: str, hydra: bool = False):
    name, *overrides = preset_and_overrides.split()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *overrides], return_hydra_config=hydra)


@pytest.mark.parametrize("preset", PINNED)
def test_every_preset_composes_to_the_settings_it_always_had(preset):
    cfg = composed(preset)
    assert tuple(OmegaConf.select(cfg, key) for key in PINNED_KEYS) == PINNED[preset]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_study_sweep_reports_into_its_parent_run_and_no_other_preset_does(name):
    callbacks = composed(name, hydra=True).hydra.callbacks
    expected = {"sweep_run", "report"} if name.startswith("study_") else {"sweep_run"}
    assert set(callbacks) == expected
    if name.startswith("study_"):
        assert callbacks.report._target_ == "experiments.report.ReportCallback"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_the_studies_of_stackable_networks_train_their_seeds_as_populations(name):
    launcher = composed(name, hydra=True).hydra.launcher._target_
    stackable = name.startswith("study_") and name not in ("study_zoo", "study_length")  # decoders, lengths
    assert launcher.endswith("PopulationLauncher") == stackable, launcher


@pytest.mark.slow
def test_the_tutorial_full_echo_preset_reaches_the_tutorials_accuracy():
    summary = train(make_cfg("experiment=tutorial_full_echo", "logger=none"))
    assert summary["epochs"] == 500
    assert summary["test/exact_match"] >= 0.99
