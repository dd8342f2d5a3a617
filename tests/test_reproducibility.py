"""Runs say which code made them, keep their trained network, and load it back safely."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, all_runs, artifacts, make_cfg, run_py, store_client, train_in_new_store

import echo
from echo.data import held_out, to_batches
from echo.encoding import REPRESENTATIONS
from echo.reuse import LoadError

ROOT = Path(__file__).resolve().parents[1]
# A small task a few epochs teach something: 2-item windows of 5 values, whole-window exact match
# about 0.58 (well above chance, 0.04, and below 1). Batches of 3 divide the 21 windows of a
# sequence of 22 and the 39 of one of 40.
SMALL = [*TINY, "task.n_unique=5", "task.n_in=2", "task.n_out=2", "task.length=22", "model.batch_size=3"]
SMALL += ["model.lr=3e-3", "stop_at=null", "threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run of SMALL in its own store: (store uri, run)."""
    return train_in_new_store(tmp_path_factory.mktemp("trained"), *SMALL)


@pytest.fixture
def in_store(trained, monkeypatch):
    uri, run = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri, run


# -- where a run came from ----------------------------------------------------------------


def _checkout_copy(folder: Path) -> Path:
    """This checkout's files (committed or not, ignored ones left out) as a fresh git repository, one commit."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    git = ["git", "-c", "user.name=echo", "-c", "user.email=echo@example.org"]
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["git", "add", "-A"], cwd=folder, check=True)
    subprocess.run([*git, "commit", "-qm", "a commit"], cwd=folder, check=True)
    return folder


@pytest.mark.slow
def test_a_run_records_the_commit_and_a_dirty_tree_its_diff(tmp_path):
    repo = _checkout_copy(tmp_path / "checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_py_here = [sys.executable, "run.py", *TINY]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    clean = subprocess.run(run_py_here, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    with open(repo / "echo" / "models.py", "a") as models:
        models.write("# an uncommitted change\n")
    dirty = subprocess.run([*run_py_here, "seed=1"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert dirty.returncode == 0, dirty.stderr[-3000:]

    runs = {r.data.params["seed"]: r for r in all_runs(uri)}
    first, second = runs["0"], runs["1"]
    tags = first.data.tags
    assert tags["mlflow.source.git.commit"] == head and tags["echo.git_dirty"] == "false"
    assert tags["mlflow.source.name"] == "run.py" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["echo.command"] == "python run.py " + " ".join(TINY)
    assert tags["echo.version.torch"] == torch.__version__
    assert tags["echo.version.python"] == ".".join(map(str, sys.version_info[:3]))
    import mlflow
    import pytorch_lightning

    assert tags["echo.version.mlflow"] == mlflow.__version__
    assert tags["echo.version.pytorch_lightning"] == pytorch_lightning.__version__
    assert tags["echo.device"] == "cpu" and tags["echo.device.threads"] == first.data.params["threads"]
    assert tags["echo.device.cpu"] and int(tags["echo.device.cores"]) >= 1
    assert "git_diff.patch" not in artifacts(uri, first.info.run_id)

    assert second.data.tags["mlflow.source.git.commit"] == head and second.data.tags["echo.git_dirty"] == "true"
    patch = store_client(uri).download_artifacts(second.info.run_id, "git_diff.patch", str(tmp_path))
    assert "+# an uncommitted change" in Path(patch).read_text()
    # The line a run ends with is the address of its page in `mlflow ui`.
    experiment = first.info.experiment_id
    assert f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{first.info.run_id}" in clean.stdout


def test_importing_echo_loads_no_torch():
    code = "import sys, echo; print(callable(echo.load_run), 'torch' in sys.modules, 'mlflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["True", "False", "False"], result.stderr


# -- the trained network, reused ----------------------------------------------------------


@pytest.mark.slow
def test_a_finished_run_keeps_its_network_and_config(in_store):
    uri, run = in_store
    assert set(artifacts(uri, run.info.run_id, "model")) == {"model/weights.pt", "model/config.yaml"}
    stored = torch.load(
        store_client(uri).download_artifacts(run.info.run_id, "model/weights.pt"), weights_only=True
    )  # tensors and plain values only
    assert stored["network"]["name"] == "seq2seq" and stored["network"]["hidden_size"] == 20
    assert all(isinstance(v, torch.Tensor) for v in stored["state_dict"].values())


def test_load_run_gives_the_network_that_reproduces_the_runs_test_scores(in_store):
    """The network, run by hand as the tutorial runs it (stateful, batch by batch, state reset
    first), echoes the run's held-out test windows exactly as well as the run reported."""
    uri, run = in_store
    net, cfg = echo.load_run(run.info.run_id)
    assert not net.training and cfg.task.n_unique == 5 and cfg.model.batch_size == 3
    task = cfg.task
    n_seq = -(-task.eval_windows // (task.length - task.n_in + 1))
    x, y = held_out(task, n_seq, seed=task.test_seed)
    rep = REPRESENTATIONS[task.representation](task.n_unique)
    torch.set_num_threads(cfg.threads)
    batches = to_batches(x, y, cfg.model.batch_size, stateful=True)
    predicted, state = [], None
    with torch.no_grad():
        for xb, _ in batches:
            scores, state = net(rep.encode(xb), state)
            predicted.append(rep.decode(scores))
    predicted, targets = torch.cat(predicted), torch.cat([yb for _, yb in batches])
    correct = predicted == targets
    exact, token = correct.all(-1).sum().item() / len(correct), correct.sum().item() / correct.numel()
    assert 0.1 < run.data.metrics["test/exact_match"] < 1  # it learned something, not everything
    assert exact == pytest.approx(run.data.metrics["test/exact_match"], abs=1e-9)
    assert token == pytest.approx(run.data.metrics["test/token_acc"], abs=1e-9)


@pytest.mark.slow
def test_evaluate_logs_a_linked_run_with_the_same_test_scores_or_on_longer_sequences(in_store, tmp_path):
    uri, run = in_store
    same = run_py(f"evaluate={run.info.run_id}", "progress=false", cwd=tmp_path, uri=uri)
    assert same.returncode == 0, same.stderr[-3000:]
    longer = run_py(f"evaluate={run.info.run_id}", "task.length=40", "progress=false", cwd=tmp_path, uri=uri)
    assert longer.returncode == 0, longer.stderr[-3000:]

    linked = [r for r in all_runs(uri) if r.data.tags.get("echo.evaluated_from") == run.info.run_id]
    by_length = {r.data.params["task.length"]: r for r in linked}
    assert set(by_length) == {"22", "40"}
    again = by_length["22"]
    assert again.info.status == "FINISHED"
    for metric in ("test/exact_match", "test/token_acc"):
        assert again.data.metrics[metric] == run.data.metrics[metric]
    assert "train/loss" not in again.data.metrics  # nothing was trained
    assert f"/runs/{again.info.run_id}" in same.stdout
    table = store_client(uri).download_artifacts(by_length["40"].info.run_id, "expected_predicted.txt", str(tmp_path))
    assert len(Path(table).read_text().splitlines()) == 40 - 2 + 1  # the windows of one longer sequence


def _one_line_refusal(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    line = lines[0]
    for fragment in fragments:
        assert fragment in line
    return line


@pytest.mark.slow
def test_evaluate_refuses_a_bad_id_a_run_without_network_and_shapes_that_do_not_fit(in_store, tmp_path):
    uri, run = in_store
    before = len(all_runs(uri))
    bad = run_py("evaluate=0123456789abcdef", cwd=tmp_path, uri=uri)
    _one_line_refusal(bad, "evaluate=0123456789abcdef: no such MLflow run")

    client = store_client(uri)
    empty = client.create_run(run.info.experiment_id, run_name="no network").info.run_id
    client.set_terminated(empty)
    missing = run_py(f"evaluate={empty}", cwd=tmp_path, uri=uri)
    _one_line_refusal(missing, f"evaluate={empty}: the run has no stored network")

    wider = run_py(f"evaluate={run.info.run_id}", "task.n_unique=7", cwd=tmp_path, uri=uri)
    _one_line_refusal(wider, "does not fit windows", "task.n_unique=7")
    network = run_py(f"evaluate={run.info.run_id}", "model.hidden_size=30", cwd=tmp_path, uri=uri)
    _one_line_refusal(network, "model.hidden_size=30: evaluate= tests the stored network")
    both = run_py(f"evaluate={run.info.run_id}", f"resume={empty}", cwd=tmp_path, uri=uri)
    _one_line_refusal(both, f"resume={empty} and evaluate={run.info.run_id}: choose one")
    assert len(all_runs(uri)) == before + 1  # the empty run; no evaluation was tracked

    with pytest.raises(LoadError, match="run=0123456789abcdef: no such MLflow run"):
        echo.load_run("0123456789abcdef")
    with pytest.raises(LoadError, match=f"run={empty}: the run has no stored network"):
        echo.load_run(empty)


# -- nothing read back from a store runs code ---------------------------------------------


class Planted:
    """Unpickling this runs a shell command, which leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_planted_checkpoint_or_network_is_refused_by_resume_evaluate_and_load_run(in_store, tmp_path):
    uri, run = in_store
    client = store_client(uri)
    marker = tmp_path / "the planted file ran"
    files = tmp_path / "planted"
    for folder in ("checkpoints", "model"):
        (files / folder).mkdir(parents=True)
        shutil.copy(client.download_artifacts(run.info.run_id, "model/config.yaml", str(tmp_path)), files / folder)
    torch.save(Planted(marker), files / "checkpoints" / "last.ckpt")
    torch.save(Planted(marker), files / "model" / "weights.pt")
    planted = client.create_run(run.info.experiment_id, run_name="planted").info.run_id
    client.log_artifacts(planted, str(files))
    client.set_terminated(planted, "KILLED")
    before = len(all_runs(uri))

    resumed = run_py(f"resume={planted}", cwd=tmp_path, uri=uri)
    _one_line_refusal(resumed, f"resume={planted}: the run's checkpoints/last.ckpt holds more than tensors", "refused")
    evaluated = run_py(f"evaluate={planted}", cwd=tmp_path, uri=uri)
    _one_line_refusal(evaluated, f"evaluate={planted}: the run's model/weights.pt holds more than tensors")
    with pytest.raises(LoadError, match=f"run={planted}: the run's model/weights.pt holds more than tensors"):
        echo.load_run(planted)
    assert not marker.exists()
    assert len(all_runs(uri)) == before  # nothing tracked


def test_a_malformed_network_file_is_refused(in_store, tmp_path):
    uri, run = in_store
    client = store_client(uri)
    files = tmp_path / "broken"
    files.mkdir()
    shutil.copy(client.download_artifacts(run.info.run_id, "model/config.yaml", str(tmp_path)), files)
    (files / "weights.pt").write_bytes(b"not a torch file")
    broken = client.create_run(run.info.experiment_id, run_name="broken").info.run_id
    client.log_artifacts(broken, str(files), "model")
    with pytest.raises(LoadError, match=f"run={broken}: the run's model/weights.pt is not a readable torch file"):
        echo.load_run(broken)


def test_evaluate_keeps_whole_sequence_batches_whole_on_another_length(in_store, tmp_path):
    """A stateful network trained on one batch per sequence (listing B) never carried state from
    batch to batch: on longer sequences it is evaluated on one batch per sequence too."""
    from omegaconf import OmegaConf

    from echo.reuse import evaluated_config

    uri, run = in_store
    client = store_client(uri)
    saved = OmegaConf.load(client.download_artifacts(run.info.run_id, "model/config.yaml", str(tmp_path)))
    saved.model.batch_size = 21  # the 21 windows of a sequence of 22
    (tmp_path / "whole").mkdir()
    OmegaConf.save(saved, tmp_path / "whole" / "config.yaml")
    whole = client.create_run(run.info.experiment_id, run_name="whole sequences").info.run_id
    client.log_artifacts(whole, str(tmp_path / "whole"), "model")
    longer = [f"evaluate={whole}", "task.length=40"]
    assert evaluated_config(make_cfg(*longer), longer).model.batch_size == 39
    chosen = [*longer, "model.batch_size=13"]
    assert evaluated_config(make_cfg(*chosen), chosen).model.batch_size == 13
    assert evaluated_config(make_cfg(f"evaluate={run.info.run_id}", "task.length=40"), longer[1:]).model.batch_size == 3
