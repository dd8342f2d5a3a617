"""`python run.py -m resume=<sweep parent run id>`: a stopped sweep goes on under the same parent run
(docs/sweeps-and-clusters.md#a-sweep-that-stopped). Imports mlflow only once it asks the store."""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from dataclasses import dataclass

from omegaconf import OmegaConf

from echo.tracking import PARENT_TAG, flatten, tracking_uri

CONTINUE_ENV = "ECHO_CONTINUE_SWEEP"  # the parent run a continued sweep's jobs continue
LOOSE_ENV = "ECHO_CONTINUE_LOOSE"  # the settings this command changes that a resumed job may take (RESUMABLE)
ARGV_TAG = "echo.argv"  # on a sweep's parent: its command line's arguments (JSON), as typed
SWEEP_DIR_TAG = "echo.sweep_dir"  # ... its folder (hydra.sweep.dir, resolved)
SWEEPER_TAG = "echo.sweeper"  # ... its sweeper's class
PID_TAG, HOST_TAG = "echo.launcher_pid", "echo.launcher_host"  # ... the process that launches its jobs
CONTINUED_TAG = "echo.continued"  # ... how its last continuation went: "2 kept, 1 resumed, 1 run"
RESUMED_FROM, RERUN_OF = "echo.resumed_from", "echo.rerun_of"  # on a job's run that continues another
# Keys left out when a job's config is compared with a child's: what a run fills in or sets for this run only.
NOT_COMPARED = ("threads", "resume", "evaluate", "progress")
# Settings a resumed job may take from this command (as `resume=<run id> trainer.max_epochs=...` can).
RESUMABLE = ("trainer.max_epochs", "trainer.check_val_every_n_epoch", "checkpoint_every", "stop_at")
CHECKPOINTS = "checkpoints", ("last.ckpt", "population.pt")  # echo.checkpoints.FOLDER, what a run saves there
VALUE_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c")
VALUE_FLAGS += ("--package", "-p", "--info", "--experimental-rerun")  # Hydra's options that take a value

CONTINUING: dict[str, object] = {}  # this process's continuation: parent, experiment, the sweep's args


class Refused(Exception):
    """A continuation that cannot be: one line for the user."""


def _key(argument: str) -> str:
    return argument.split("=", 1)[0].lstrip("+~")


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's options with their values, the overrides) of command-line arguments `args`."""
    flags, overrides, it = [], [], iter(args)
    for argument in it:
        if argument in VALUE_FLAGS:
            flags += [argument, next(it, "")]
        elif argument.startswith("-"):
            flags.append("-m" if argument == "--multirun" else argument)
        else:
            overrides.append(argument)
    return flags, overrides


def merged(original: list[str], extra: list[str]) -> list[str]:
    """The recorded arguments with this command's on top: one of the same key replaces it in its place."""
    flags, overrides = _split(original)
    more_flags, more = _split(extra)
    for flag in more_flags:
        if flag not in flags:
            flags.append(flag)
    by_key = {_key(o): i for i, o in enumerate(overrides)}
    for override in more:
        if _key(override) in by_key:
            overrides[by_key[_key(override)]] = override
        else:
            by_key[_key(override)] = len(overrides)
            overrides.append(override)
    return flags + overrides


def _quoted(value: str) -> str:
    """`value` as a quoted string in Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def continued_argv(argv: list[str]) -> list[str]:
    """`sys.argv` for Hydra: for `-m resume=<sweep parent run id>`, the sweep's own command line with these
    overrides on top; any other as it is. Exits 2 with one line if the parent cannot be continued."""
    args = argv[1:]
    flags, overrides = _split(args)
    given = [o for o in overrides if _key(o) == "resume" and not o.startswith("~")]
    if not given or not {"-m", "--multirun"} & set(flags):
        return argv
    parent = given[-1].split("=", 1)[1].strip().strip("'\"")
    if parent in ("", "null") or "," in parent:  # none, or a sweep over runs: each job resumes its own
        return argv
    try:
        tags, experiment = _parent(parent)
    except Refused as why:
        print(f"echo: bad sweep: resume={parent}: {why}", file=sys.stderr)
        sys.exit(2)
    extra = [a for a in args if a not in given]
    sweep = merged(json.loads(tags[ARGV_TAG]), extra)
    if not {"-m", "--multirun"} & set(sweep):
        sweep.insert(0, "-m")
    CONTINUING.update(parent=parent, experiment=experiment, args=sweep)
    os.environ[CONTINUE_ENV] = parent
    os.environ[LOOSE_ENV] = ",".join(k for k in map(_key, _split(extra)[1]) if k in RESUMABLE)
    internal = [f"hydra.sweep.dir={_quoted(tags[SWEEP_DIR_TAG])}"] if tags.get(SWEEP_DIR_TAG) else []
    if tags.get(SWEEPER_TAG, "").endswith("OptunaSweeper"):
        internal.append(
            "hydra.sweeper.storage={_target_:echo.continuation.continued_study,"
            f"parent:{_quoted(parent)},study_name:${{hydra.sweeper.study_name}},"
            "direction:${hydra.sweeper.direction}}"
        )
        # The sampler anew with its seed would draw the first trials' params again (enqueued trials draw
        # nothing): it takes another seed, one for each continuation of this search.
        internal.append(f"++hydra.sweeper.sampler.seed={int(parent[:7], 16) + len(_jobs(tracking_uri(), parent))}")
    return [argv[0], *sweep, *internal]


def _parent(parent: str) -> tuple[dict[str, str], str]:
    """The tags and experiment of sweep parent run `parent`; Refused if it cannot be continued."""
    from echo.tracking.store import run_record

    try:
        record = run_record(parent)
    except Exception as error:  # the store cannot be read
        raise Refused(f"could not read {tracking_uri()} ({type(error).__name__}: {error})") from None
    if record is None:
        raise Refused(f"no such MLflow run in {tracking_uri()}; copy the sweep's parent run id from `mlflow ui`")
    tags = record["tags"]
    if tags.get(PARENT_TAG) != "true":
        raise Refused(f"not a sweep's parent run: continue one run with `python run.py resume={parent}` (without -m)")
    if ARGV_TAG not in tags:
        raise Refused("its sweep recorded no command line (it ran before echo recorded one): start it again")
    if record["status"] == "RUNNING" and (why := _still_running(tags)):
        raise Refused(f"the sweep is still running ({why}): stop it first, or let it end")
    return tags, record["experiment"]


def _still_running(tags: dict[str, str]) -> str | None:
    """What holds a RUNNING parent's sweep (its launching process), or None if that process is gone."""
    pid, host = tags.get(PID_TAG), tags.get(HOST_TAG)
    if host is not None and host != socket.gethostname():  # its process cannot be seen from here
        return f"process {pid} on {host}"
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError):
        return "process unknown"
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, another user's
        pass
    return f"process {pid} on {host}"


def continued_parent() -> str | None:
    return os.environ.get(CONTINUE_ENV) or None


def recorded_args() -> list[str]:
    """The arguments a sweep's parent records: the rebuilt ones of a continued sweep, else this command's."""
    return list(CONTINUING.get("args") or sys.argv[1:])


@dataclass
class Decision:
    """What a job of a continued sweep does: `keep` or `resume` (from file `checkpoint`) the child `run`,
    or `run` (in the place of `run`, if given)."""

    action: str
    run: object | None = None
    checkpoint: str | None = None

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run is not None else None

    def tags(self) -> dict[str, str]:
        return {RERUN_OF: self.run_id} if self.action == "run" and self.run is not None else {}

    def line(self, said: str) -> str | None:
        if self.action == "keep":
            return f"echo: job {said} finished before: kept its run {self.run_id}, not trained again"
        if self.action == "resume":
            return f"echo: job {said} continues its run {self.run_id} ({self.run.info.status}) from its checkpoint"
        return None


@functools.cache
def _jobs(uri: str, parent: str) -> tuple:
    """The parent's jobs as runs, read once per process: later children are this continuation's own."""
    from echo.tracking.store import sweep_jobs

    return tuple(sweep_jobs(parent))


@functools.cache
def _checkpoint(uri: str, run_id: str) -> str | None:
    from echo.tracking.store import saved_files

    folder, names = CHECKPOINTS
    saved = saved_files(run_id, folder)
    return next((name for name in names if name in saved), None)


def _same(run, wanted: dict[str, str], loose: tuple[str, ...] = ()) -> bool:
    params = run.data.params
    return all(params.get(k) == v for k, v in wanted.items() if k not in loose)


def decide(parent: str, cfg) -> Decision:
    """What the job of config `cfg` (no hydra node) does: keep the child that FINISHED with its config,
    else resume the last unfinished one with a checkpoint (RESUMABLE settings may differ), else run."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))  # as its run's params record it (start_tracker)
    wanted = {k: str(v) for k, v in flat.items() if k.split(".")[0] not in NOT_COMPARED}
    jobs = _jobs(tracking_uri(), parent)
    finished = [run for run in jobs if run.info.status == "FINISHED" and _same(run, wanted)]
    if finished:
        return Decision("keep", finished[-1])
    loose = tuple(k for k in os.environ.get(LOOSE_ENV, "").split(",") if k)
    unfinished = [run for run in jobs if run.info.status != "FINISHED" and _same(run, wanted, loose)]
    for run in reversed(unfinished):  # the last first
        if name := _checkpoint(tracking_uri(), run.info.run_id):
            return Decision("resume", run, name)
    exact = [run for run in unfinished if _same(run, wanted)]
    return Decision("run", exact[-1] if exact else None)


def tally(decisions: list[Decision]) -> str:
    """ "2 kept, 1 resumed, 1 run"."""
    counts = {action: sum(d.action == action for d in decisions) for action in ("keep", "resume", "run")}
    return f"{counts['keep']} kept, {counts['resume']} resumed, {counts['run']} run"


def search_tally(parent: str, n_trials: int) -> str:
    """`tally` for a continued search's trials (`continued_study`)."""
    kept = resumed = 0
    for run in replayed(parent):
        if run.info.status == "FINISHED":
            kept += 1
        elif _checkpoint(tracking_uri(), run.info.run_id):
            resumed += 1
    kept, resumed = min(kept, n_trials), min(resumed, max(n_trials - kept, 0))
    return f"{kept} kept, {resumed} resumed, {max(n_trials - kept - resumed, 0)} run"


def replayed(parent: str) -> list:
    """The parent's trials a continued search asks for again (FINISHED first): not those that FAILED with
    no checkpoint (a diverged run: the sampler's next choice is worth more)."""
    runs = [
        run
        for run in _jobs(tracking_uri(), parent)
        if run.info.status != "FAILED" or _checkpoint(tracking_uri(), run.info.run_id)
    ]
    return sorted(runs, key=lambda run: run.info.status != "FINISHED")


def _value(text: str):
    """A param's text as the value Optuna suggested."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def continued_study(parent: str, study_name: str, direction):
    """The Optuna storage of a continued search (`hydra.sweeper.storage`): a study in memory whose first
    trials are the parent's, so the search ends at `n_trials`."""
    import warnings

    import optuna

    directions = [getattr(d, "name", str(d)) for d in (direction if isinstance(direction, list) else [direction])]
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for run in replayed(parent):
            params = {k: _value(v) for k, v in run.data.params.items() if k.split(".")[0] not in NOT_COMPARED}
            study.enqueue_trial(params)
    return storage
