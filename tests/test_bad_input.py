"""Bad input, every key: one clear line and exit 2 before anything is built or tracked; tracking
failures exit non-zero and keep what they could not write, to upload later."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import RUN_PY, TINY, all_runs, artifacts, make_cfg, run_py, start_run_py

from echo.config import CHECKS, LIGHTNING_TRAINER_ARGS, TRAINER_REFUSED, TRAINER_SUPPORTED, ConfigError, validate
from echo.policy import check_threads

# Every key a user may set, with bad values, and what the one line says. Most run in this process
# (validate, then the checks a run makes before it is tracked); ISSUE's rows run as `python run.py`.
BAD = {
    "seed=1.5": "seed=1.5 must be a whole number",
    "seed=abc": "seed='abc' must be a whole number",
    "threads=0": "threads=0 must be auto or a whole number >= 1",
    "threads=many": "threads='many' must be auto or a whole number >= 1",
    "cuda_graph=maybe": "cuda_graph='maybe' must be true or false",
    "target=0": "target=0 must be a fraction in (0, 1]",
    "target=1.5": "target=1.5 must be a fraction in (0, 1]",
    "stop_at=2": "stop_at=2 must be a fraction in (0, 1] or null",
    "progress=1": "progress=1 must be true or false",
    "objective=train/loss": "objective='train/loss' is unknown",
    "checkpoint_every=0": "checkpoint_every=0 must be a whole number >= 1 or null",
    "resume=true": "resume=True must be an MLflow run id",
    "evaluate=true": "evaluate=True must be an MLflow run id",
    "task.length=0": "task.length=0 must be a whole number >= 1",
    "task.length=2.5": "task.length=2.5 must be a whole number >= 1",
    "task.n_unique=-3": "task.n_unique=-3 must be a whole number >= 2",
    "task.n_in=0": "task.n_in=0 must be a whole number >= 1",
    "task.n_out=0": "task.n_out=0 must be a whole number >= 1",
    "task.n_out=6": "task.n_out=6 is larger than task.n_in=5",
    "task.n_in=30": "task.n_in=30 is longer than the sequence",
    "task.representation=words": "task.representation='words' is unknown",
    "task.framing=pad": "task.framing='pad' is unknown",
    "task.sequences_per_epoch=0": "task.sequences_per_epoch=0 must be a whole number >= 1",
    "task.eval_windows=-1": "task.eval_windows=-1 must be a whole number >= 1",
    "task.val_seed=x": "task.val_seed='x' must be a whole number",
    "task.test_seed=0.5": "task.test_seed=0.5 must be a whole number",
    "model.name=transformerz": "model.name='transformerz' is unknown",
    "model.hidden_size=0": "model.hidden_size=0 must be a whole number >= 1",
    "model.stateful=yes_please": "model.stateful='yes_please' must be true or false",
    "model.batch_size=5": "model.batch_size=5 does not divide the 21 windows",
    "model.batch_size=-7": "model.batch_size=-7 must be a whole number >= 1",
    "model.lr=-1": "model.lr=-1 must be a positive number",
    "model.lr=nan": "model.lr=nan must be a positive number",
    "model.cell=rnn": "model.cell='rnn' is unknown",
    "model.num_layers=0": "model.num_layers=0 must be a whole number >= 1",
    "model.optimizer=sgd": "model.optimizer='sgd' is unknown: choose model.optimizer=adam or model.optimizer=rmsprop",
    "task.reverse_input=maybe": "task.reverse_input='maybe' must be true or false",
    "task.reverse_target=2": "task.reverse_target=2 must be true or false",
    "task.train_lengths=[5,1]": "task.train_lengths=[5, 1] must be [lo,hi] with 1 <= lo <= hi or null",
    "task.test_lengths=[0,3]": "task.test_lengths=[0, 3] must be [lo,hi] with 1 <= lo <= hi or null",
    "model=transformer model.n_heads=3": "model.n_heads=3 does not divide model.d_model",
    "model=autoregressive model.teacher_forcing=1.5": "model.teacher_forcing=1.5 must be a probability in [0, 1]",
    "trainer.max_epochs=0": "trainer.max_epochs=0 must be a whole number >= 1",
    "trainer.check_val_every_n_epoch=0": "trainer.check_val_every_n_epoch=0 must be a whole number >= 1",
    "trainer.accelerator=ipu": "trainer.accelerator='ipu' is unknown",
    "trainer.devices=0": "trainer.devices=0 is not supported by echo (a run trains in one process on one device",
    "+trainer.precision=banana": "trainer.precision='banana' is unknown: choose trainer.precision=32 or",
    "+trainer.gradient_clip_val=-1": "trainer.gradient_clip_val=-1 must be a number >= 0",
    "+trainer.gradient_clip_algorithm=max": "trainer.gradient_clip_algorithm='max' is unknown",
    "+trainer.accumulate_grad_batches=0": "trainer.accumulate_grad_batches=0 must be a whole number >= 1",
    "+trainer.strategy=ddp": "trainer.strategy='ddp' is not supported by echo",
    "+trainer.max_time=5": "trainer.max_time=5 must be a time as days:hours:minutes:seconds or null: e.g.",
    "+trainer.deterministic=warn": "trainer.deterministic='warn' must be true or false",
    "+trainer.profiler=simple": "trainer.profiler is not supported by echo (Lightning's profiler reports to its",
    "+trainer.num_nodes=2": "trainer.num_nodes=2 is not supported by echo",
    "+trainer.no_such_flag=1": "trainer.no_such_flag is not an argument of Lightning's Trainer",
    "logger.name=wandb": "logger.name='wandb' is unknown: choose logger=mlflow, logger=csv or logger=none",
    "logger.experiment=''": "logger.experiment='' must be a name",
    "logger.experiment=2024": "logger.experiment=2024 must be a name",
    "task.eval_windows=100000000": "this run needs about .* of memory .* more than the",
}

# The issue's table, each tried as a user does: `python run.py <override>`.
ISSUE = {
    "logger.experiment=": "logger.experiment='' must be a name",
    "model.stateful=maybe": "model.stateful='maybe' must be true or false",
    "progress=maybe": "progress='maybe' must be true or false",
    "objective=foo": "objective='foo' is unknown",
    "trainer.accelerator=tpu": "trainer.accelerator='tpu' is unknown",
    "model.hidden_size=100000000": "this run needs about .* PB of memory",
    "threads=999": "threads=999 is more than the .* cores this process may use",
    "model.lr=inf": "model.lr=inf must be a positive number",
    "task.n_unique=1": "task.n_unique=1 must be a whole number >= 2",
}


def pattern(expected: str) -> str:
    """The expected text as a regular expression: literal, except that `.*` matches anything."""
    return ".*".join(re.escape(part) for part in expected.split(".*"))


def checked(cfg) -> None:
    """What a run checks before it builds or tracks anything."""
    from echo.preflight import preflight

    validate(cfg)
    check_threads(cfg)
    preflight(cfg)


def test_every_key_of_the_config_has_a_check_and_a_bad_value_here():
    cfg = make_cfg()
    from omegaconf import OmegaConf

    keys = {k for k in _leaves(OmegaConf.to_container(cfg)) if not k.startswith("trainer.")}
    assert keys - set(CHECKS) == set()
    tried = {override.lstrip("+").split("=")[0] for override in BAD}
    assert keys - tried == set()


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        out += _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return out


@pytest.mark.parametrize("override", BAD)
def test_a_bad_value_is_refused_in_one_line_before_anything_is_built(override):
    with pytest.raises(ConfigError, match=pattern(BAD[override])) as raised:
        checked(make_cfg(*override.split()))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("accelerator", "says"),
    [
        (
            "gpu",
            "trainer.accelerator=gpu: torch sees no CUDA GPU on this machine: "
            "use trainer.accelerator=cpu or trainer.accelerator=auto",
        ),
        ("mps", "trainer.accelerator=mps: this machine has no Apple GPU: use trainer.accelerator=auto"),
    ],
)
def test_an_accelerator_this_machine_lacks_is_refused_in_one_line(accelerator, says):
    import torch

    if torch.cuda.is_available() if accelerator == "gpu" else torch.backends.mps.is_available():
        pytest.skip(f"this machine has trainer.accelerator={accelerator}")
    with pytest.raises(ConfigError) as raised:
        checked(make_cfg(f"trainer.accelerator={accelerator}"))
    assert str(raised.value) == says


def test_good_values_pass():
    for overrides in ([], ["model=encdec", "task.n_out=2"], ["seed=-3", "threads=1", "logger.experiment=x y"]):
        checked(make_cfg(*overrides))


@pytest.mark.slow
def test_the_issues_table_each_ends_with_exit_2_and_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for override, expected in ISSUE.items():
        result = run_py(override, cwd=tmp_path, uri=uri, timeout=600)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (override, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("echo: bad config: "), (override, result.stderr[-2000:])
        assert re.search(pattern(expected), lines[0]), (override, lines[0])
        assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "echo-unsent").exists()  # nothing tracked


# -- Lightning's Trainer arguments: supported (docs/bad-input.md) or refused in one line ------------

# One value of each Trainer argument echo refuses, and the values of supported ones it cannot honour.
REFUSED_VALUES = {
    **{key: "1" for key in TRAINER_REFUSED},
    "fast_dev_run": "true",
    "limit_train_batches": "0",
    "limit_val_batches": "0.5",
    "profiler": "simple",
    "strategy": "ddp",
    "num_nodes": "2",
    "devices": "2",
    "precision": "bf16-mixed",
}


def test_echos_list_of_lightnings_trainer_arguments_is_lightnings():
    import inspect

    import pytorch_lightning as pl

    assert set(LIGHTNING_TRAINER_ARGS) == set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
    assert set(TRAINER_SUPPORTED) | set(TRAINER_REFUSED) == set(LIGHTNING_TRAINER_ARGS)
    assert {f"trainer.{key}" for key in TRAINER_SUPPORTED} <= set(CHECKS)  # every supported value is checked


@pytest.mark.parametrize("key", sorted(REFUSED_VALUES))
def test_a_trainer_argument_echo_cannot_honour_is_refused_in_one_line(key):
    override = f"trainer.{key}={REFUSED_VALUES[key]}"
    with pytest.raises(ConfigError, match=rf"^trainer\.{key}(=\S+)? is not supported by echo \(") as raised:
        validate(make_cfg(override if key in ("devices",) else f"+{override}"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("precision", ["16", "bf16", "16-mixed", "bf16-mixed", "16-true", "bf16-true"])
def test_half_and_mixed_precision_are_refused_with_the_reason(precision):
    with pytest.raises(ConfigError, match="echo trains in float32 or float64: half and mixed precision need"):
        validate(make_cfg(f"+trainer.precision={precision}"))


@pytest.mark.parametrize(
    "overrides",
    [
        ["+trainer.precision=64", "trainer.devices=auto"],
        ["+trainer.precision=32-true", "+trainer.strategy=auto", "+trainer.num_nodes=1"],
        ["+trainer.gradient_clip_val=0.5", "+trainer.gradient_clip_algorithm=value"],
        ["+trainer.gradient_clip_val=null", "+trainer.accumulate_grad_batches=4"],
        ["+trainer.max_time=01:00:30:00", "+trainer.deterministic=true", "+trainer.detect_anomaly=false"],
        ["+trainer.max_time=null", "+trainer.benchmark=null"],
    ],
)
def test_the_supported_trainer_arguments_pass_every_check(overrides):
    checked(make_cfg(*overrides))


# Each class of refusal as a user meets it, `python run.py <override>` (and a population's sweep).
REFUSED_RUNS = {
    ("+trainer.num_nodes=2",): "echo: bad config: trainer.num_nodes=2 is not supported by echo",
    ("trainer.devices=2",): "echo: bad config: trainer.devices=2 is not supported by echo",
    ("+trainer.precision=bf16",): "echo: bad config: trainer.precision='bf16' is not supported by echo (echo trains",
    ("+trainer.fast_dev_run=true",): "echo: bad config: trainer.fast_dev_run is not supported by echo (",
    ("+trainer.limit_train_batches=0",): "echo: bad config: trainer.limit_train_batches is not supported by echo (",
    ("-m", "hydra/launcher=population", "seed=0,1", "+trainer.precision=16-mixed"): (
        "echo: bad sweep: job #0 (seed=0 +trainer.precision=16-mixed"
    ),
}


@pytest.mark.parametrize("args", REFUSED_RUNS, ids=[" ".join(a) for a in REFUSED_RUNS])
def test_a_refused_trainer_argument_exits_2_with_one_line_and_nothing_tracked(tmp_path, args):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_py(*args, *TINY, cwd=tmp_path, uri=uri)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line(result).startswith(REFUSED_RUNS[args]), result.stderr
    assert "Expected:" not in result.stdout  # nothing trained
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "echo-unsent").exists()


@pytest.mark.slow
def test_gradient_clipping_runs_and_is_logged_as_a_param(store):
    from echo.train import train

    summary = train(make_cfg("+trainer.gradient_clip_val=1.0", "trainer.max_epochs=20"), run_name="clipped")
    (run,) = all_runs(store)
    assert run.info.status == "FINISHED" and summary["epochs"] == 20
    assert run.data.params["trainer.gradient_clip_val"] == "1.0"


def test_an_interpolation_that_cannot_resolve_is_one_line(tmp_path):
    result = run_py("task.n_in=${nope}", cwd=tmp_path, uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == "echo: bad config: Interpolation key 'nope' not found"
    assert not (tmp_path / "mlflow.db").exists()


# -- tracking failures ---------------------------------------------------------------------------


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("echo: "), result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.slow
def test_an_experiment_mlflow_will_not_write_to_stops_the_run_before_training(store, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment("gone"))
    result = run_py("logger.experiment=gone", *TINY, cwd=tmp_path, uri=store)
    assert result.returncode == 2
    line = one_line(result)
    assert line.startswith("echo: tracking failed: could not start an MLflow run in experiment 'gone'"), line
    assert "must be in the 'active' state" in line
    assert "Expected:" not in result.stdout  # nothing was trained
    assert not (tmp_path / "echo-unsent").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_stops_the_run_before_training(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    result = run_py(*TINY, cwd=tmp_path, uri=url)
    assert result.returncode == 2
    assert one_line(result).startswith(f"echo: tracking failed: the tracking server {url} is unreachable")
    assert "Expected:" not in result.stdout


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free port, over the SQLite store and artifacts in `folder`."""
    port = _free_port()
    log = open(folder / f"server-{port}.log", "w")
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "art")]
    server = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, (folder / f"server-{port}.log").read_text()
        time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def kept_in(output: str) -> tuple[str, Path]:
    """A run's one `echo: ` line, and the folder it says the run's writes are kept in."""
    line = [line for line in output.splitlines() if line.startswith("echo: ")]
    assert len(line) == 1 and "Traceback" not in output, output[-3000:]
    return line[0], Path(line[0].split("is kept in ")[1].split(":")[0])


def upload(folder: Path, uri: str) -> None:
    """`python -m echo.upload <folder> --to <uri>`, which succeeds."""
    command = [sys.executable, "-m", "echo.upload", str(folder), "--to", uri]
    result = subprocess.run(command, cwd=Path(RUN_PY).parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_a_server_killed_mid_run_fails_the_run_keeps_its_metrics_and_they_upload_later(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    server, url = start_server(tmp_path)
    try:
        epochs = ["trainer.max_epochs=300", "trainer.check_val_every_n_epoch=10", "stop_at=null", "progress=false"]
        process = start_run_py(*epochs, "checkpoint_every=100", cwd=work, uri=url)
        from mlflow import MlflowClient

        client = MlflowClient(url)
        deadline = time.monotonic() + 300
        while not all_runs(url):  # the run is created: training starts now
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        run_id = all_runs(url)[0].info.run_id
    finally:
        stop_server(server)  # SIGKILL: gone, mid-run
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 3, output[-3000:]
    line, folder = kept_in(output)
    assert line.startswith("echo: tracking failed: could not write run"), output[-3000:]
    assert folder.parent == work / "echo-unsent" and folder.is_dir()
    assert f"`python -m echo.upload {folder} --to {url}`" in line
    kept = [json.loads(row) for row in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {row[0] for row in kept} >= {"train/loss", "val/exact_match", "test/exact_match"}
    assert (folder / "artifacts" / "learning_curve.png").exists()
    assert json.loads((folder / "end.json").read_text()) == {"status": "FINISHED"}

    server, url = start_server(tmp_path)  # back, on the same store
    try:
        upload(folder, url)
        assert not folder.exists()  # uploaded, then removed
        client = MlflowClient(url)
        run = client.get_run(run_id)  # the same run, complete again
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 301))
        assert [m.step for m in client.get_metric_history(run_id, "val/exact_match")] == list(range(10, 301, 10))
        assert {"test/exact_match", "train_time_s"} <= set(run.data.metrics)
        assert {"learning_curve.png", "expected_predicted.txt", "config.yaml", "checkpoints"} <= set(
            artifacts(url, run_id)
        )
    finally:
        stop_server(server)


@pytest.mark.slow
def test_an_out_of_memory_error_that_happens_all_the_same_is_one_line(tmp_path):
    """Under an address-space limit (`ulimit -v`, which the estimate does not count) the network's
    first 576 MB allocation fails: the run ends with one line, exit 1, no traceback."""
    import resource

    peak = "import re, run, echo.train; print(re.search(r'VmPeak:\\s+(\\d+)', open('/proc/self/status').read())[1])"
    baseline = subprocess.run([sys.executable, "-c", peak], cwd=Path(RUN_PY).parent, capture_output=True, text=True)
    limit = int(baseline.stdout.strip()) * 1024 + 400_000_000  # room to start, not for the network

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    args = ["logger=none", "model.hidden_size=6000", *TINY]
    result = run_py(*args, cwd=tmp_path, uri=f"sqlite:///{tmp_path}/mlflow.db", preexec_fn=limited)
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_line(result)
    assert line.startswith("echo: run failed: out of memory (") and "can't allocate memory" in line, line


@pytest.mark.slow
def test_a_sweep_whose_job_lost_its_server_mid_run_does_not_end_as_a_success(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    server, url = start_server(tmp_path)
    try:
        epochs = ["trainer.max_epochs=300", "trainer.check_val_every_n_epoch=10", "stop_at=null", "progress=false"]
        process = start_run_py("-m", "model.hidden_size=8", *epochs, cwd=work, uri=url)
        deadline = time.monotonic() + 300
        while len(all_runs(url)) < 2:  # the sweep's parent and its job's run: the job trains now
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
    finally:
        stop_server(server)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 3, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("echo: ")]
    assert lines[0].startswith("echo: tracking failed: could not write run 'model.hidden_size=8"), output[-3000:]
    assert lines[-1].startswith("echo: tracking failed: 1 of the sweep's runs could not be written"), output[-3000:]
    assert "Traceback" not in output
    assert len(list((work / "echo-unsent").iterdir())) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB filesystem (tmpfs), which a test can fill; skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small filesystem here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_mid_run_keeps_the_run_in_the_temporary_directory(small_disk, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    uri = f"sqlite:///{small_disk}/mlflow.db"
    all_runs(uri)  # the store's schema, made here: reading a fresh store while the run makes it races
    epochs = ["trainer.max_epochs=300", "trainer.check_val_every_n_epoch=10", "stop_at=null", "progress=false"]
    process = start_run_py(*epochs, cwd=small_disk, uri=uri)
    deadline = time.monotonic() + 300
    while not (runs := all_runs(uri)) or "echo.git_dirty" not in runs[0].data.tags:  # started: mid-run from here
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.2)
    run_id = runs[0].info.run_id
    filler = small_disk / "filler"
    with open(filler, "wb") as file:  # the disk is full now
        try:
            while True:
                file.write(b"\0" * (1 << 20))
                file.flush()
        except OSError:
            pass
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 3, output[-3000:]
    line, folder = kept_in(output)
    assert folder.parent == tmp_path / "tmp" / "echo-unsent", line  # ./echo-unsent is on the full disk
    filler.unlink()
    upload(folder, uri)
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 301))


# Hydra's own refusals, each as `python run.py <args>`: the one line says what and how to fix it.
HYDRA = {
    "model=encdek": "model=encdek is unknown: choose model=attention, autoregressive, .* (did you mean model=encdec?)",
    "experiment=foo": "experiment=foo is unknown: choose experiment=copy_memory, fast_partial_echo, .*tutorial_partial",
    "logger=foo": "logger=foo is unknown: choose logger=csv, mlflow or none",
    "hydra/launcher=foo": "hydra/launcher=foo is unknown: choose hydra/launcher=basic, joblib, population",
    "hparams_search=foo": "hparams_search=foo is unknown: choose hparams_search=optuna or optuna_time",
    "foo=1": "foo=1: the config has no key foo: to add one write +foo=1",
    "model.hiden_size=5": "model.hiden_size=5: the config has no key model.hiden_size: write model.hidden_size=5 "
    "(the closest key), or +model.hiden_size=5 to add a new one",
    "task.n_in=[1": "'task.n_in=[1' cannot be read (no viable alternative at input '[1'): quote a value .* "
    "e.g. \"task.n_in='[1'\"",
    "task.n_in=é": "'task.n_in=é' cannot be read (a character it cannot read unquoted): quote a value that holds "
    "brackets, commas, spaces or non-ASCII characters, e.g. \"task.n_in='é'\"",
    "-m model=encdek": "model=encdek is unknown: choose model=",
    "-m foo=1": "foo=1: the config has no key foo",
}


def test_hydras_own_refusals_each_end_with_exit_2_and_one_line(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for args, expected in HYDRA.items():
        result = run_py(*args.split(), "logger.experiment=x", cwd=tmp_path, uri=uri)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("echo: bad config: "), (args, result.stderr[-2000:])
        assert re.fullmatch(pattern(f"echo: bad config: {expected}.*"), lines[0]), (args, lines[0])
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "multirun").exists()
    from hydra.errors import ConfigCompositionException

    from echo.hydra_errors import refused_by_hydra

    def task():
        raise ConfigCompositionException("a bug of the task's own")

    with pytest.raises(ConfigCompositionException) as raised:
        task()
    assert not refused_by_hydra(raised.value, task)  # propagates, with its traceback
    assert refused_by_hydra(ConfigCompositionException("Hydra's"), task)


@pytest.mark.slow
def test_a_bad_job_of_a_sweep_names_the_job_and_what_hydra_refused(tmp_path):
    result = run_py("-m", "model=seq2seq,encdek", "logger=none", cwd=tmp_path, uri=f"sqlite:///{tmp_path}/m.db")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "echo: bad sweep: job #1 (model=encdek logger=none): model=encdek is unknown: choose model=attention, "
        "autoregressive, encdec, many_to_one, one_to_one, seq2seq or transformer (did you mean model=encdec?)"
    ]


@pytest.mark.slow
def test_a_store_that_cannot_be_written_stops_the_run_in_one_line_within_seconds(tmp_path):
    """Paths that cannot be written even by root (tests run as root, whom chmod does not stop): MLflow
    alone would retry for about 100 s, printing its retries."""
    (tmp_path / "a_file").touch()
    cases = [  # (uri, cwd, args, what the line says)
        ("", "/proc", [], "sqlite:////proc/mlflow.db (/proc: .*): run from a folder you can write, set "),
        ("sqlite:////proc/nope/mlflow.db", tmp_path, [], "sqlite:////proc/nope/mlflow.db (/proc: "),
        (f"sqlite:///{tmp_path}/a_file/mlflow.db", tmp_path, [], f".* ({tmp_path}/a_file: Not a directory): set "),
        ("", "/proc", ["-m", "seed=0,1"], "sqlite:////proc/mlflow.db (/proc: "),
    ]
    for uri, cwd, args, expected in cases:
        start = time.monotonic()
        result = run_py(*args, *TINY, cwd=cwd, uri=uri)
        assert result.returncode == 2, (uri, result.stderr[-2000:])
        line = one_line(result)
        assert re.match(pattern(f"echo: tracking failed: cannot write the tracking store {expected}"), line), line
        assert line.endswith("or run with logger=none"), line
        assert time.monotonic() - start < 60, "took as long as MLflow's retries"  # ~3 s here
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]


@pytest.mark.slow
def test_upload_writes_only_to_a_store_it_is_given(tmp_path):
    """Never to the store a kept folder's run.json names (anyone who could write the folder chose it)."""
    from echo.tracking.outbox import Outbox

    named, given = f"sqlite:///{tmp_path}/named.db", f"sqlite:///{tmp_path}/given.db"
    run = {"uri": named, "experiment": "echo", "run_name": "r", "run_id": None, "tags": {}, "params": {"a": "1"}}
    box = Outbox(run, "why", root=tmp_path / "echo-unsent")
    box.metrics([("train/loss", 0.5, 1000, 1)])
    box.end("FINISHED")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    upload = [sys.executable, "-m", "echo.upload", str(tmp_path / "echo-unsent")]
    result = subprocess.run(upload, cwd=Path(RUN_PY).parent, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.splitlines() == [
        "echo: upload: no store to write to: name one with --to <uri> (e.g. --to sqlite:///mlflow.db) "
        "or set MLFLOW_TRACKING_URI"
    ]
    assert box.folder.is_dir() and not (tmp_path / "named.db").exists()
    result = subprocess.run(
        [*upload, "--to", given], cwd=Path(RUN_PY).parent, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == f"uploading 1 kept run to {given}"
    (uploaded,) = all_runs(given)
    assert uploaded.info.status == "FINISHED" and uploaded.data.metrics == {"train/loss": 0.5}
    assert not box.folder.exists() and not (tmp_path / "named.db").exists()
