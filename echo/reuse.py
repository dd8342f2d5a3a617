"""A run's trained network: stored when it finishes, loaded by `echo.load_run` and `evaluate=<run id>`.

A store is untrusted (a shared `mlflow server` has no authentication by default): weights-only loading,
configs read as data, sizes and tensors checked on torch's meta device first (docs/reproducibility.md)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from echo.config import CELLS, POSITIONAL, TRAINER_SUPPORTED, ConfigError, first_line
from echo.task import windows_per_sequence

FOLDER = "model"
WEIGHTS, CONFIG = f"{FOLDER}/weights.pt", f"{FOLDER}/config.yaml"
EVALUATED_FROM = "echo.evaluated_from"
GROUPS = ("task", "model", "trainer", "logger", "experiment", "hparams_search")
CONF = Path(__file__).resolve().parents[1] / "conf"  # the config a stored one is checked against
MAX_NODES = 10_000  # values and keys of a stored config: echo's have about 50 (this bounds YAML aliases)
NETWORK_SIZES = ("n_in", "n_features", "hidden_size", "n_classes", "n_out", "d_model", "n_layers", "num_layers")
NETWORK_SIZES += ("n_heads", "max_len")
NETWORK_NAMES = {"cell": CELLS, "positional": POSITIONAL}
# The lines of torch's weights-only error around the unpickler's reason.
TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class LoadError(ConfigError):
    """A run whose network cannot be loaded (one line naming the run)."""


def save_network(net, config_yaml: str, tracker) -> None:
    """Store `net` (from build_net) and its run's config in `tracker`'s run, through its worker."""
    import torch

    folder = tempfile.mkdtemp(prefix="echo-network-")
    stored = {"network": dict(net.build_args), "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}
    torch.save(stored, Path(folder) / "weights.pt")
    tracker.log_artifacts(folder, FOLDER, remove=True)
    tracker.log_text(config_yaml, CONFIG)


def read_weights_only(path: str, what: str):
    """`torch.load(path, weights_only=True)`; LoadError, saying `what` it is, if it holds more or is malformed."""
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, ... by what breaks
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        reasons = [line for line in lines if not line.startswith(TORCH_ADVICE)]  # the unpickler's own words
        detail = (reasons or lines)[0]
        if "GLOBAL" in detail:  # a function or class to call: what makes unpickling run code
            raise LoadError(
                f"{what} holds more than tensors and plain values, refused: loading it could run code ({detail})"
            ) from None
        raise LoadError(
            f"{what} is not a readable torch file of tensors and plain values, refused "
            f"({type(error).__name__}: {detail})"
        ) from None


def read_stored_config(path: str, what: str, cfg: DictConfig | None = None) -> DictConfig:
    """The stored config at `path` as data: plain YAML, no interpolation, no key unknown to `cfg` (this
    command's) or conf/; LoadError otherwise."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as error:
        raise LoadError(f"{what}: the stored config is not readable YAML, refused ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{what}: the stored config is not a mapping of settings, refused")
    leaves = _leaves(data, what)
    known = known_keys(cfg)  # None: an installed echo without conf/ and no command line to compare with
    unknown = next((_first_unknown(key, known) for key in leaves if key not in known), None) if known else None
    if unknown is not None:
        hint = f" (a setting a run added with +{unknown}=... is known when this command adds it too)" if cfg else ""
        raise LoadError(
            f"{what}: the stored config holds {unknown}, a key this checkout's config does not have: a stored "
            f"config is data, and only known keys are taken, refused{hint}"
        )
    try:
        return OmegaConf.create(data)
    except Exception as error:  # a value OmegaConf cannot hold (a YAML date, bytes, a set)
        raise LoadError(
            f"{what}: the stored config holds a value that is not a setting, refused ({first_line(error)})"
        ) from None


def _leaves(data: dict, what: str) -> list[str]:
    """The dotted keys of `data` (a list is one setting); LoadError at a `${` or past MAX_NODES nodes."""
    leaves, seen, todo = [], 0, [("", data, False)]
    while todo:
        path, node, in_list = todo.pop()
        seen += 1
        if seen > MAX_NODES:
            raise LoadError(f"{what}: the stored config holds more than {MAX_NODES} values, refused")
        if "${" in path or (isinstance(node, str) and "${" in node):
            raise LoadError(
                f"{what}: the stored config holds an interpolation (${{...}}) at {path}: a stored config is data, "
                f"and nothing in it is resolved, refused"
            )
        if isinstance(node, dict) and (node or not path):
            todo += [(f"{path}.{k}" if path else str(k), v, in_list) for k, v in reversed(node.items())]
            continue
        if not in_list:
            leaves.append(path)
        if isinstance(node, list):
            todo += [(f"{path}[{i}]", item, True) for i, item in reversed(list(enumerate(node)))]
    return leaves


def _first_unknown(key: str, known: set[str]) -> str:
    """The shortest part of dotted `key` that is neither a key in `known` nor a group of them."""
    parts = key.split(".")
    for n in range(1, len(parts)):
        head = ".".join(parts[:n])
        if head not in known and not any(k.startswith(f"{head}.") for k in known):
            return head
    return key


def known_keys(cfg: DictConfig | None) -> set[str] | None:
    """The dotted keys a config of this checkout may hold: `cfg`'s and conf/'s, every model preset's
    included (a stored run may have used another network)."""
    import yaml

    from echo.tracking.naming import flatten  # dotted keys: a list is one setting

    known = set(flatten(OmegaConf.to_container(cfg, resolve=False))) if cfg is not None else set()
    if not (CONF / "config.yaml").is_file():
        return known or None
    top = yaml.safe_load((CONF / "config.yaml").read_text())
    known |= {key for key in top if key not in ("defaults", "hydra")}
    for group, prefix in (("task", "task."), ("trainer", "trainer."), ("logger", "logger."), ("model", "")):
        for file in sorted((CONF / group).glob("*.yaml")):  # model presets are `# @package _global_`
            known |= {prefix + key for key in flatten(yaml.safe_load(file.read_text()) or {}) if key != "defaults"}
    return known | {f"trainer.{key}" for key in TRAINER_SUPPORTED}  # (a preset or +trainer.key=... sets them)


def _run_tags(run_id: str, key: str) -> dict[str, str]:
    from echo.tracking import run_tags, tracking_uri

    tags = run_tags(run_id)
    if tags is None:
        raise LoadError(f"{key}={run_id}: no such MLflow run in {tracking_uri()}; copy a run id from `mlflow ui`")
    return tags


def _download(run_id: str, path: str, folder: str, tags: dict[str, str], key: str) -> str:
    from echo.tracking import download_artifact

    local = download_artifact(run_id, path, folder)
    if local is None:
        hint = "runs store it when they finish"
        if source := tags.get(EVALUATED_FROM):
            hint = f"it evaluated the network of run {source}: use that run"
        raise LoadError(f"{key}={run_id}: the run has no stored network ({path} missing; {hint})")
    return local


def _stored(run_id: str, key: str) -> tuple[dict, DictConfig, dict[str, str]]:
    tags = _run_tags(run_id, key)
    folder = tempfile.mkdtemp(prefix="echo-load-")
    try:
        weights = _download(run_id, WEIGHTS, folder, tags, key)
        config = read_stored_config(_download(run_id, CONFIG, folder, tags, key), f"{key}={run_id}")
        stored = read_weights_only(weights, f"{key}={run_id}: the run's {WEIGHTS}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if not (
        isinstance(stored, dict)
        and isinstance(stored.get("network"), dict)
        and isinstance(stored.get("state_dict"), dict)
        and isinstance(stored["network"].get("name"), str)
    ):
        raise LoadError(f"{key}={run_id}: the run's {WEIGHTS} is not a stored echo network, refused")
    return stored, config, tags


def _build(stored: dict, run_id: str, key: str):
    """The stored network with its weights, its sizes and tensors checked first on torch's meta device."""
    import torch

    from echo.models import MODELS, build_net
    from echo.preflight import _size, host_free_bytes

    args = dict(stored["network"])
    name = args.pop("name")
    what = f"{key}={run_id}: the run's {WEIGHTS}"
    if name not in MODELS:
        known = ", ".join(MODELS)
        raise LoadError(f"{key}={run_id}: the run's network {name!r} is not one this checkout has ({known})")
    _check_sizes(args, stored["state_dict"], what)
    built = ", ".join(f"{k}={v}" for k, v in args.items())
    try:
        with torch.device("meta"):
            shapes = build_net(name, **args)
    except (TypeError, RuntimeError, KeyError, ValueError, AssertionError) as error:
        raise LoadError(
            f"{what} describes a {name} network ({built}) that cannot be built ({first_line(error)})"
        ) from None
    need = 4 * sum(p.numel() for p in shapes.parameters())  # float32, as echo's networks are built
    free = host_free_bytes()
    if free is not None and need > free:
        raise LoadError(
            f"{what} describes a {name} network ({built}) that needs about {_size(need)} of memory for its "
            f"weights, more than the {_size(free)} available on this machine, refused"
        )
    if why := misfit(stored["state_dict"], shapes.state_dict()):
        raise LoadError(f"{what} does not fit the {name} network it describes ({built}): {why}, refused")
    try:
        net = build_net(name, **args)
        net.load_state_dict(stored["state_dict"])
    except (TypeError, RuntimeError, KeyError) as error:
        first = first_line(error)
        raise LoadError(f"{key}={run_id}: the stored {name} network does not fit this checkout's ({first})") from None
    return net.eval()


def _check_sizes(args: dict, state_dict: dict, what: str) -> None:
    """build_net's arguments, sizes >= 1, no more layers than tensors (each costs time to build, even on meta)."""
    for arg, value in args.items():
        if arg in NETWORK_SIZES:
            ok = not isinstance(value, bool) and isinstance(value, int) and value >= 1
            if ok and arg in ("n_layers", "num_layers") and value > len(state_dict):
                raise LoadError(
                    f"{what} describes {value} layers, more than its {len(state_dict)} tensors hold, refused"
                )
        elif arg in NETWORK_NAMES:
            ok = value in NETWORK_NAMES[arg]
        else:
            ok = arg == "teacher_forcing" and not isinstance(value, bool) and isinstance(value, (int, float))
            ok = ok and 0 <= value <= 1
        if not ok:
            raise LoadError(f"{what} describes its network with {arg}={value!r}, which no echo network has, refused")


def misfit(stored: dict, expected: dict) -> str | None:
    """How tensors `stored` first differ from `expected` (both name -> tensor); None if they fit."""
    import torch

    for key, tensor in expected.items():
        if key not in stored:
            return f"missing key {key}"
        value = stored[key]
        if not isinstance(value, torch.Tensor):
            return f"{key} is not a tensor"
        if value.shape != tensor.shape:
            return f"{key} has shape {tuple(value.shape)}, the network's is {tuple(tensor.shape)}"
    if unexpected := next((key for key in stored if key not in expected), None):
        return f"unexpected key {unexpected}"
    return None


def _say_code_version(run_id: str, tags: dict[str, str]) -> None:
    from echo.tracking.provenance import code_version_note

    if note := code_version_note(run_id, tags):
        print(note, file=sys.stderr)


def load_run(run_id: str):
    """(network in eval mode on the CPU, config) of run `run_id` (echo.load_run); LoadError if it cannot be
    loaded, a line on stderr if its code version is not this checkout's."""
    run_id = str(run_id)
    stored, config, tags = _stored(run_id, "run")
    _say_code_version(run_id, tags)
    return _build(stored, run_id, "run"), config


def evaluated_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of `evaluate=<run id>`: the run's stored one over this checkout's defaults, with this
    command's plain overrides on top; the network's settings (but model.batch_size) cannot change."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_id = str(cfg.evaluate)
    tags = _run_tags(run_id, "evaluate")
    with tempfile.TemporaryDirectory() as folder:
        saved = read_stored_config(_download(run_id, CONFIG, folder, tags, "evaluate"), f"evaluate={run_id}", cfg)
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    merged = OmegaConf.merge(base, saved)
    keys = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key == "evaluate" or key.startswith("hydra"):
            continue
        # The network is the stored one; model.batch_size may change (a stateful batch must divide the windows).
        if key in GROUPS or (key.startswith("model.") and key != "model.batch_size"):
            raise ConfigError(
                f"{override.input_line}: evaluate= tests the stored network of run {run_id}, which cannot change; "
                f"settings like task.test_seed=... or task.length=... can (train a new run to change {key})"
            )
        OmegaConf.update(merged, key, override.value(), force_add=True)
        keys.add(key)
    try:  # a stateful run whose batches were whole sequences (listing B): so it sees another length's too
        whole = bool(saved.model.stateful) and saved.model.batch_size == windows_per_sequence(saved.task)
    except (AttributeError, KeyError, TypeError):  # a config from another version of echo
        whole = False
    if whole and "model.batch_size" not in keys:
        merged.model.batch_size = windows_per_sequence(merged.task)
    merged.evaluate, merged.resume = run_id, None
    return merged


def network_to_evaluate(cfg: DictConfig):
    """The stored network of run `cfg.evaluate`; LoadError unless it gives n_out items of the right width
    for two windows of `cfg`'s task."""
    import torch

    from echo.encoding import representation

    run_id = str(cfg.evaluate)
    stored, _, tags = _stored(run_id, "evaluate")
    net = _build(stored, run_id, "evaluate")
    task = cfg.task
    rep = representation(task)
    tokens = torch.zeros(2, task.n_in, dtype=torch.long)
    kwargs = {"mask": tokens >= 0} if task.framing == "mask" else {}
    if getattr(net, "variable_length", False) and task.n_out != net.build_args.get("n_out"):
        kwargs["n_out"] = task.n_out
    built = ", ".join(f"{k}={v}" for k, v in net.build_args.items())
    try:
        with torch.no_grad():
            scores, _ = net(rep.encode(tokens), None, **kwargs)
        fits = tuple(scores.shape) == (2, task.n_out, rep.n_outputs)
        why = f"it gives {tuple(scores.shape[1:])} scores per window, the task needs {(task.n_out, rep.n_outputs)}"
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        fits, why = False, first_line(error)
    if not fits:
        raise LoadError(
            f"evaluate={run_id}: the stored network ({built}) does not fit windows of task.n_in={task.n_in}, "
            f"task.n_out={task.n_out}, task.n_unique={task.n_unique} ({why})"
        )
    _say_code_version(run_id, tags)
    return net
