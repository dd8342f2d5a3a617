"""What a store hands back is data. A stored config (evaluate=, resume=, echo.load_run) is never
resolved, holds only known keys and passes every check a command line gets; a stored network or
checkpoint must fit the network it describes. Each is refused in one line, before anything is
allocated or tracked. The tests plant artifacts in a copy of a real run of a real SQLite store."""

import uuid
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, all_runs, make_cfg, run_py, store_client, train_in_new_store

import echo
from echo.checkpoints import resumed_config
from echo.config import ConfigError, validate
from echo.reuse import evaluated_config
from echo.train import train

SMALL = [*TINY, "task.n_unique=5", "task.n_in=2", "task.n_out=2", "task.length=22", "model.batch_size=3"]
SMALL += ["threads=1", "checkpoint_every=10"]  # a checkpoint as well as the stored network
SECRET = "hunter2-do-not-log"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run of SMALL in its own store: (its folder, store uri, run)."""
    folder = tmp_path_factory.mktemp("trained")
    return folder, *train_in_new_store(folder, *SMALL)


@pytest.fixture
def in_store(trained, monkeypatch):
    folder, uri, run = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SECRET", SECRET)
    return folder, uri, run


def _plant(uri, run, tmp_path, changes: dict) -> str:
    """A new run holding a copy of `run`'s artifacts, with each file named in `changes` replaced by
    the change's result on its contents (None: removed). `a as b`: the change of a's contents is b."""
    client = store_client(uri)
    files = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / uuid.uuid4().hex)))
    for names, change in changes.items():
        source, _, target = names.partition(" as ")
        source, target = files / source, files / (target or source)
        if source.suffix == ".yaml":
            contents = change(yaml.safe_load(source.read_text()))
        else:
            contents = change(torch.load(source, weights_only=True))
        source.unlink()
        if contents is not None and target.suffix == ".yaml":
            target.write_text(yaml.safe_dump(contents))
        elif contents is not None:
            torch.save(contents, target)
    planted = client.create_run(run.info.experiment_id, run_name="planted").info.run_id
    client.log_artifacts(planted, str(files))
    client.set_terminated(planted, "KILLED")
    return planted


def _both_configs(change) -> dict:
    return {"model/config.yaml": change, "checkpoints/config.yaml": change}


def _refusal(entry: str, run_id: str, *overrides: str) -> str:
    """What `python run.py <entry>=<run id> <overrides>` (or `echo.load_run`, entry `run`) refuses,
    run in this process as run.py runs it: the ConfigError's one line."""
    with pytest.raises(ConfigError) as raised:
        if entry == "run":
            echo.load_run(run_id)
        else:
            args = [f"{entry}={run_id}", *overrides]
            cfg = make_cfg(*args)
            cfg = evaluated_config(cfg, args) if entry == "evaluate" else resumed_config(cfg, args)
            validate(cfg)
            train(cfg)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


def _one_line(result) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("echo: bad config: "), result.stderr[-3000:]
    return lines[0]


def _with(path: str, value):
    """A change setting dotted `path` of a config to `value`."""

    def change(config: dict) -> dict:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
        return config

    return change


# -- a stored config is data ----------------------------------------------------------------------


def _leaky(config: dict) -> dict:
    config["leak_secret"], config["leak_uri"] = "${oc.env:SECRET}", "${oc.env:MLFLOW_TRACKING_URI}"
    config["logger"]["experiment"] = "${oc.env:HOME}"
    return config


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["evaluate", "resume", "run"])
def test_a_stored_interpolation_is_refused_and_never_resolved(in_store, tmp_path, entry):
    folder, uri, run = in_store
    planted = _plant(uri, run, tmp_path, _both_configs(_leaky))
    before = len(all_runs(uri, None))
    if entry == "run":
        line = _refusal(entry, planted)
    else:
        result = run_py(f"{entry}={planted}", cwd=tmp_path, uri=uri, timeout=180)
        line = _one_line(result)
        assert SECRET not in result.stdout + result.stderr
    assert f"{entry}={planted}: the stored config holds an interpolation (${{...}}) at " in line
    assert "a stored config is data" in line and SECRET not in line and str(Path.home()) not in line
    assert len(all_runs(uri, None)) == before  # no run, so no param, tag or artifact
    names = {e.name for e in store_client(uri).search_experiments()}
    assert str(Path.home()) not in names and SECRET not in names, names
    for path in [*folder.rglob("*"), *tmp_path.rglob("*")]:
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path


UNKNOWN = [  # (change to the stored config, the key the refusal names)
    (_with("exploit", {"_target_": "os.system", "command": "touch planted"}), "exploit"),
    (_with("model.hiden_size", 5), "model.hiden_size"),
    (_with("task.n_in", {"nested": 2}), "task.n_in.nested"),
]


@pytest.mark.parametrize("entry", ["evaluate", "resume", "run"])
@pytest.mark.parametrize(("change", "key"), UNKNOWN, ids=[key for _, key in UNKNOWN])
def test_a_stored_key_this_checkout_does_not_know_is_refused(in_store, tmp_path, entry, change, key):
    _, uri, run = in_store
    planted = _plant(uri, run, tmp_path, _both_configs(change))
    before = len(all_runs(uri, None))
    line = _refusal(entry, planted)
    assert f"{entry}={planted}: the stored config holds {key}, a key this checkout's config does not have" in line
    assert len(all_runs(uri, None)) == before


CHECKED = [  # (entry, change to the stored config, what the refusal says)
    ("evaluate", _with("task.n_out", 3), "task.n_out=3 is larger than task.n_in=2"),
    ("resume", _with("model.stateful", "maybe"), "model.stateful='maybe' must be true or false"),
    ("resume", _with("model.hidden_size", 10**7), "this run needs about"),
    ("resume", _with("trainer.max_epochs", 0), "trainer.max_epochs=0 must be a whole number >= 1"),
]


@pytest.mark.parametrize(("entry", "change", "says"), CHECKED, ids=[s for *_, s in CHECKED])
def test_a_stored_config_gets_every_check_a_command_line_gets(in_store, tmp_path, entry, change, says):
    _, uri, run = in_store
    planted = _plant(uri, run, tmp_path, _both_configs(change))
    before = len(all_runs(uri, None))
    assert says in _refusal(entry, planted)
    assert len(all_runs(uri, None)) == before


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["evaluate", "resume"])
def test_a_stored_trainer_argument_is_refused_without_a_hang(in_store, tmp_path, entry):
    """A planted trainer.num_nodes=2 made evaluate= wait for a second node for ever."""
    _, uri, run = in_store
    planted = _plant(uri, run, tmp_path, _both_configs(_with("trainer.num_nodes", 2)))
    before = len(all_runs(uri, None))
    line = _one_line(run_py(f"{entry}={planted}", cwd=tmp_path, uri=uri, timeout=180))
    assert line.startswith("echo: bad config: trainer.num_nodes=2") and "one process" in line, line
    assert len(all_runs(uri, None)) == before


# -- stored tensors must fit the network they describe --------------------------------------------


def _first(state: dict, prefix: str = "") -> str:
    return next(key for key in state if key.startswith(prefix))


def _reshaped(key: str):
    def change(state: dict) -> dict:
        state[key] = torch.zeros(state[key].shape[0], state[key].shape[-1] + 1)
        return state

    return change


def _without(key: str):
    def change(state: dict) -> dict:
        del state[key]
        return state

    return change


def _in(part: str, change):
    """`change` applied to the part `part` (state_dict, network, ...) of a stored file."""

    def in_part(stored: dict) -> dict:
        stored[part] = change(stored[part])
        return stored

    return in_part


def _as_member(change):
    """A population member's checkpoint (echo.population.MEMBER_STATE) made from a Lightning one, then `change`d."""

    def member(checkpoint: dict) -> dict:
        weights = checkpoint["state_dict"]
        moments = {name.removeprefix("net."): torch.zeros_like(w) for name, w in weights.items()}
        state = {"state_dict": weights, "adam": {"step": 1, "exp_avg": moments, "exp_avg_sq": dict(moments)}}
        state |= {"generator": torch.Generator().get_state(), "epochs_done": 10, "summary": {}}
        return change(state)

    return member


WEIGHT = "lstm.weight_hh_l0"  # seq2seq's (80, 20) recurrent weights
WEIGHTS, CHECKPOINT = "model/weights.pt", "checkpoints/last.ckpt"
MISFITS = [  # (entry, changes to the run's artifacts, what the refusal says)
    ("evaluate", {WEIGHTS: _in("state_dict", _reshaped(WEIGHT))}, f"{WEIGHT} has shape (80, 21), the network's is"),
    ("evaluate", {WEIGHTS: _in("state_dict", _without(WEIGHT))}, f"missing key {WEIGHT}"),
    ("run", {WEIGHTS: _in("state_dict", _reshaped(WEIGHT))}, "the network's is (80, 20)"),
    ("run", {WEIGHTS: _in("state_dict", lambda s: {**s, "extra": torch.ones(1)})}, "unexpected key extra"),
    ("resume", {CHECKPOINT: _in("state_dict", _reshaped(f"net.{WEIGHT}"))}, f"net.{WEIGHT} has shape (80, 21)"),
    ("resume", {CHECKPOINT: _in("state_dict", _without(f"net.{WEIGHT}"))}, f"missing key net.{WEIGHT}"),
    (
        "resume",
        {CHECKPOINT: _in("optimizer_states", lambda o: [{**o[0], "state": {0: o[0]["state"][1]}}])},
        "Adam's exp_avg of net.lstm.weight_ih_l0 has shape (80, 20), the network's is (80, 5)",
    ),
    (
        "resume",
        {f"{CHECKPOINT} as checkpoints/population.pt": _as_member(_in("state_dict", _reshaped(f"net.{WEIGHT}")))},
        f"checkpoints/population.pt does not fit the network its config builds: net.{WEIGHT} has shape (80, 21)",
    ),
    (
        "resume",
        {f"{CHECKPOINT} as checkpoints/population.pt": _as_member(_in("adam", _in("exp_avg", _without(WEIGHT))))},
        f"checkpoints/population.pt does not fit the network its config builds: Adam's exp_avg: missing key {WEIGHT}",
    ),
    ("resume", {CHECKPOINT: lambda checkpoint: {"weights": checkpoint["state_dict"]}}, "last.ckpt is not a checkpoint"),
    (
        "resume",
        {CHECKPOINT: _in("optimizer_states", lambda o: [{"state": o[0]["state"]}])},
        "last.ckpt is not a checkpoint of this network, refused (KeyError: 'param_groups')",
    ),
]


@pytest.mark.parametrize(("entry", "changes", "says"), MISFITS, ids=[f"{e}-{s}" for e, _, s in MISFITS])
def test_stored_tensors_that_do_not_fit_their_network_are_refused(in_store, tmp_path, entry, changes, says):
    _, uri, run = in_store
    planted = _plant(uri, run, tmp_path, changes)
    before = len(all_runs(uri, None))
    line = _refusal(entry, planted)
    assert says in line and "refused" in line, line
    assert len(all_runs(uri, None)) == before


HUGE = [  # (change to the stored network's arguments, what the refusal says)
    (_with("hidden_size", 10**7), "needs about 1.6 PB of memory for its weights, more than the"),
    (_with("n_layers", 10**9), "describes 1000000000 layers, more than its"),
    (_with("hidden_size", "big"), "describes its network with hidden_size='big', which no echo network has"),
]


@pytest.mark.parametrize("entry", ["evaluate", "run"])
@pytest.mark.parametrize(("change", "says"), HUGE, ids=[s.split(",")[0] for _, s in HUGE])
def test_a_stored_networks_sizes_are_checked_before_anything_is_built(in_store, tmp_path, entry, change, says):
    _, uri, run = in_store
    planted = _plant(uri, run, tmp_path, {"model/weights.pt": _in("network", change)})
    before = len(all_runs(uri, None))
    line = _refusal(entry, planted)
    assert f"{entry}={planted}: the run's model/weights.pt " in line and says in line, line
    assert len(all_runs(uri, None)) == before


def test_a_resume_takes_the_runs_own_command_line_and_refuses_a_changed_setting(in_store):
    """A requeued job gives its command line again, preset and groups included: no change."""
    _, _, run = in_store
    own = [f"resume={run.info.run_id}", *SMALL, "model=seq2seq", "trainer.max_epochs=30"]
    cfg = resumed_config(make_cfg(*own), own)
    assert cfg.trainer.max_epochs == 30 and cfg.model.name == "seq2seq" and cfg.task.n_in == 2
    changed = [f"resume={run.info.run_id}", *SMALL, "model=encdec"]
    with pytest.raises(ConfigError, match="model=encdec: a resumed run keeps its config, and this command's sets "):
        resumed_config(make_cfg(*changed), changed)
    # progress changes nothing trained: a preset that composes another value of it is no change
    shown = [f"resume={run.info.run_id}", *(a for a in SMALL if not a.startswith("progress=")), "model=seq2seq"]
    assert resumed_config(make_cfg(*shown, "progress=true"), shown).progress is False
