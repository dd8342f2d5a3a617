"""Sweeps in MLflow: one parent run per multirun, its jobs as children, and a summary at the end.
Works with every Hydra launcher and sweeper: jobs find the parent through the environment, or where
that does not travel (a remote Ray cluster) by the sweep's tag."""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from echo.compat import answer_sweep_jobs_with, stop_loky_workers
from echo.continuation import (
    ARGV_TAG,
    CONTINUED_TAG,
    CONTINUING,
    HOST_TAG,
    PID_TAG,
    SWEEP_DIR_TAG,
    SWEEPER_TAG,
    continued_parent,
    decide,
    recorded_args,
    search_tally,
    tally,
)
from echo.slurm import slurm_tags
from echo.tracking import (
    PARENT_RUN_ENV,
    PARENT_TAG,
    SWEEP_TAG,
    TrackingService,
    close_service_connections,
    mlflow_client,
    run_name_and_tags,
    tracking_uri,
)
from echo.tracking.naming import PENDING_PARENT, run_page, where_line
from echo.tracking.outbox import ROOT, UPLOAD, cannot_write, outboxes, read, reason, unreachable
from echo.tracking.sweep_summary import LOWER_IS_BETTER
from echo.tracking.worker import ANSWER, SweepRequests

# What a run that never reached the target scores on a *_to_target objective (a finite number:
# samplers rank trials, and a missing value would fail the trial instead of ranking it last).
MISSED_TARGET = 1e9


def objective_value(metrics: dict[str, float], objective: str) -> float:
    """The number run.py hands to a sweeper: `metrics[objective]`, or the worst value if missing."""
    value = metrics.get(objective)
    if value is None or not math.isfinite(value):
        return MISSED_TARGET if objective in LOWER_IS_BETTER else 0.0
    return float(value)


def parent_of_sweep(sweep: str, experiment: str) -> str | None:
    """The parent run id of a sweep, from the environment or else by the sweep's tag."""
    if parent := os.environ.get(PARENT_RUN_ENV):
        return parent
    client = mlflow_client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{PARENT_TAG}` = 'true'", max_results=1
    )
    return runs[0].info.run_id if runs else None


class SweepCallback(Callback):
    """A multirun is one parent MLflow run; its jobs are children (`mlflow.parentRunId`). At the end the
    parent holds the best child, a table and a plot (docs/sweeps-and-clusters.md); a sweep with a FAILED
    job ends it FAILED, an interrupted one (Ctrl-C, SIGTERM) KILLED with its unfinished children."""

    parent: str | None = None
    service: TrackingService | None = None
    store: SweepStore | None = None
    _pending: Callable | None = None  # the parent run's id, until taken

    def __getstate__(self) -> dict:
        """Parallel and remote launchers pickle this callback into every job, which needs no MLflow client
        (unpickling one imports mlflow: seconds of CPU)."""
        return {key: value for key, value in self.__dict__.items() if key not in ("service", "store", "_pending")}

    def on_multirun_start(self, config, **kwargs) -> None:
        tracked = config.logger.name == "mlflow"
        try:
            if tracked:
                # A store that stops answering: a few retries (about 15 s), not MLflow's minutes (as the jobs' workers)
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
                if _launcher(config) in SHARED_TRACKING:
                    # One tracking process writes every job's runs: it imports mlflow now, while this
                    # process composes the jobs, not every job's worker later.
                    self.service = TrackingService()
                    atexit.register(self.service.close)
                self.store = SweepStore(self.service.socket if self.service else None)
                self.store.call("open")
            jobs = check_sweep(config)
            continuing = _check_continuation(config, tracked)
        except BaseException as error:  # a bad job, or Ctrl-C: nothing is written; stop the others
            self._stop_tracking()
            if isinstance(error, SystemExit | KeyboardInterrupt):
                raise
            if _interrupted(error):
                raise KeyboardInterrupt from error
            # A bug: Hydra would turn it into a warning and run the sweep untracked
            raise SystemExit(f"echo: could not check the sweep's jobs: {reason(error)}") from error
        if not tracked:
            return
        if why := unreachable(tracking_uri()):
            why = f"the tracking server {tracking_uri()} is unreachable ({why})"
        if why := why or cannot_write(tracking_uri()):
            print(f"echo: tracking failed: {why}", file=sys.stderr)
            self._stop_tracking()
            sys.exit(2)
        sweep = self.sweep = Path(config.hydra.sweep.dir).name
        excluded = set(config.hydra.job.config.override_dirname.exclude_keys)  # progress, threads
        overrides = " ".join(o for o in task_overrides(config) if o.split("=")[0] not in excluded)
        self.objective = config.get("objective", "val/exact_match")
        self.ignored = ("seed", *sorted(excluded))  # children that differ only in these are one setting
        tags = {SWEEP_TAG: sweep, PARENT_TAG: "true", "echo.overrides": overrides, "echo.objective": self.objective}
        tags |= {ARGV_TAG: json.dumps(recorded_args()), SWEEP_DIR_TAG: str(config.hydra.sweep.dir)}
        tags |= {SWEEPER_TAG: str(config.hydra.sweeper.get("_target_", ""))}
        tags |= {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}  # its launching process
        if continuing:  # the same parent run, RUNNING again
            tags[CONTINUED_TAG] = _continuation_plan(config, continuing, jobs)
            self._pending = self.store.call("reopen", parent=continuing, tags=tags)
        else:
            self._pending = self.store.call(
                "create", experiment=config.logger.experiment, run_name=f"sweep {overrides}", tags=tags
            )
        if _launcher(config) in IN_PROCESS:  # the jobs' runs ask for it as they start, after their imports
            PENDING_PARENT.append(self._take_parent)
        else:  # the jobs, elsewhere, find it in the environment
            self._take_parent()
        atexit.register(self._end)  # if the sweep stops before on_multirun_end
        _sigterm_as_interrupt()

    def _stop_tracking(self) -> None:
        """Stop the tracking processes before the sweep's first write."""
        for process in (self.service, self.store):  # the service first: the store's connection then closes at once
            if process is not None:
                process.kill()

    def _take_parent(self) -> None:
        """The parent run, once created (PARENT_RUN_ENV set for the jobs)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self.parent = pending()
        except Exception as error:
            print(f"echo: tracking failed: could not create the sweep's parent run ({reason(error)})", file=sys.stderr)
            return
        os.environ[PARENT_RUN_ENV] = self.parent

    def on_multirun_end(self, config, **kwargs) -> None:
        workers_stopped = stop_loky_workers()  # they exit while the summary is written (echo/compat.py)
        self._take_parent()  # a sweep of no job never asked for it
        problem = None
        if self.parent is not None and (why := unreachable(tracking_uri())):
            problem, self.parent = f"could not write the sweep's summary: {tracking_uri()} is unreachable ({why})", None
        if self.parent is not None:
            try:
                parent, self.parent = self.parent, None
                os.environ.pop(PARENT_RUN_ENV, None)
                ignored = list(self.ignored)
                argv = [sys.argv[0], *recorded_args()]  # a continued sweep's: its command line, rebuilt
                done = self.store.call("finish", parent=parent, objective=self.objective, ignored=ignored, argv=argv)()
                print(_outcome(done, self.objective))
                print(where_line("sweep", done["name"], parent, run_page(done["experiment"], parent)))
            except Exception as error:  # the store went away: the jobs' runs say where theirs are kept
                problem = f"could not write the sweep's summary to {tracking_uri()} ({reason(error)})"
        if self.store is not None:
            self.store.close()
        workers_stopped()
        if self.service is not None:
            close_service_connections()  # an in-process job's (a population member's)
            self.service.close()  # every job's connection has closed
        kept = [box for box in outboxes(Path.cwd() / ROOT) if _sweep_of(box) == getattr(self, "sweep", None)]
        if kept:
            problem = (
                f"{len(kept)} of the sweep's runs could not be written to the tracking store; they are kept in "
                f"{Path.cwd() / ROOT}: upload them with `{UPLOAD} {ROOT}`" + (f"; and {problem}" if problem else "")
            )
        if problem:  # a sweep whose tracking failed is not a success
            print(f"echo: tracking failed: {problem}", file=sys.stderr)
            sys.exit(3)

    def _end(self) -> None:
        """End the parent run: KILLED after an interrupt, else as `end_sweep` finds."""
        try:
            self._take_parent()
            if self.parent is None:
                return
            parent, self.parent = self.parent, None
            os.environ.pop(PARENT_RUN_ENV, None)
            status = self.store.call("end", parent=parent, status="KILLED" if INTERRUPTED else None)()
            print(
                f"echo: sweep stopped, its parent run {parent} ended {status}: continue it with "
                f"`python run.py -m resume={parent}`",
                file=sys.stderr,
            )
        except Exception as error:  # the store is gone: the jobs' lines said where their runs are kept
            print(f"echo: tracking failed: could not end the sweep's parent run ({reason(error)})", file=sys.stderr)


def _outcome(done: dict, objective: str) -> str:
    """How the sweep ended and its best child (`echo.tracking.worker.finish_sweep`'s answer)."""
    line = f"sweep ended {done['status']}"
    if done["best_run"] is None:
        return f"{line}: none of its {done['children']} runs has {objective}"
    return f"{line}: best of {done['children']} runs '{done['best_run']}', {objective} {done['best']:.4f}"


def _check_continuation(config, tracked: bool) -> str | None:
    """The parent run this sweep continues (None if it starts anew); exits 2 with one line if it cannot."""
    parent = continued_parent()
    if parent is None:
        return None
    if not tracked:
        why = f"a continued sweep is tracked in its parent's store: logger={config.logger.name} cannot continue it"
    elif CONTINUING.get("experiment") not in (None, config.logger.experiment):
        why = (
            f"the sweep's parent run is in experiment '{CONTINUING['experiment']}', and this command tracks to "
            f"'{config.logger.experiment}': leave logger.experiment as the sweep had it"
        )
    else:
        return parent
    print(f"echo: bad sweep: resume={parent}: {why}", file=sys.stderr)
    sys.exit(2)


def _continuation_plan(config, parent: str, jobs: list | None) -> str:
    """Print in one line, and return for the parent's tag, what each job or trial of the continued sweep
    will do (echo.continuation.decide)."""
    if jobs is not None:
        said = tally([decide(parent, OmegaConf.masked_copy(job, [k for k in job if k != "hydra"])) for job in jobs])
        what = f"{len(jobs)} jobs"
    else:
        n_trials = int(config.hydra.sweeper.get("n_trials", 0))
        said, what = search_tally(parent, n_trials), f"{n_trials} trials in all"
    print(f"echo: continuing sweep {parent} ({what}): {said}", file=sys.stderr)
    return said


IN_PROCESS = ("BasicLauncher", "PopulationLauncher")  # launchers that run every job in this process
LOCAL_PARALLEL = ("JoblibLauncher", "LocalLauncher")  # other processes on this machine: joblib, submitit_local
SHARED_TRACKING = ("JoblibLauncher", "PopulationLauncher")  # launchers whose runs one tracking process writes


def _launcher(config) -> str:
    return str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]


class SweepStore:
    """The sweep's MLflow work (the parent run, the summary, its end), done by the sweep's tracking
    service (`service`: its socket) or else a process of its own: either imports mlflow and opens the
    store (about 3.5 s on a small machine) while this process imports torch and composes the jobs.
    Requests go as JSON lines, answered in order; if this process dies first, the parent ends KILLED."""

    def __init__(self, service: str | None = None):
        self.process = self.sock = None
        if service is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(service)
            self.requests = self.sock.makefile("w", encoding="utf-8")
            self.replies = self.sock.makefile("r", encoding="utf-8")
        else:
            root = str(Path(__file__).resolve().parents[1])
            code = f"import sys; sys.path.insert(0, {root!r}); from echo.sweeps import serve; serve()"
            self.process = subprocess.Popen(
                [sys.executable, "-c", code],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # Ctrl-C is for this process, which ends the sweep
            )
            self.requests, self.replies = self.process.stdin, self.process.stdout
        self.sent, self.answers = 0, []

    def call(self, op: str, **args) -> Callable:
        """Send request `op` (open, create, finish, end: `SweepRequests`); call the result for its answer."""
        self.requests.write(json.dumps({"op": f"sweep.{op}", "uri": tracking_uri(), **args}) + "\n")
        self.requests.flush()
        self.sent += 1
        return functools.partial(self.answer, self.sent - 1)

    def answer(self, index: int):
        """Request `index`'s answer (RuntimeError if the other process failed it or exited)."""
        while len(self.answers) <= index:
            line = self.replies.readline()
            if line and not line.startswith(ANSWER):  # MLflow prints too (a run's address)
                continue
            self.answers.append(json.loads(line[len(ANSWER) :]) if line else {"error": "the store process exited"})
        if "error" in self.answers[index]:
            raise RuntimeError(self.answers[index]["error"])
        return self.answers[index].get("value")

    def kill(self) -> None:
        """Stop at once (before the sweep's first write)."""
        if self.process is not None:
            self.process.kill()
        self.close()

    def close(self) -> None:
        self.requests.close()
        if self.process is not None:
            self.process.wait()
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)  # the service sees the end of the requests ...
            self.replies.read()  # ... and closes its side
        self.sock.close()


def serve() -> None:
    """The sweep's store process: answer requests until stdin closes, then end a parent left open KILLED."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = SweepRequests(lambda text: print(ANSWER + text, flush=True))
    for line in sys.stdin:
        requests.handle(line)
    requests.abandon()


def _sweep_of(outbox: Path) -> str | None:
    try:
        return read(outbox)["run"]["tags"].get(SWEEP_TAG)
    except (OSError, ValueError, KeyError):
        return None


def task_overrides(config) -> list[str]:
    """The command line's overrides as typed, as Hydra's sweeper reads them: `x=1,${y}` is not resolved."""
    return OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def check_sweep(config) -> list | None:
    """Check every job of a basic (grid) sweep before any starts; exit with one line (Hydra turns a
    callback's exception into a warning). Returns the jobs' configs (None for another sweeper: it
    chooses its jobs as it goes)."""
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return None
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from echo.config import ConfigError, first_line, validate
    from echo.hydra_errors import describe

    params = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + task_overrides(config)
    jobs = grid(OverridesParser.create().parse_overrides(arguments))
    loader = GlobalHydra.instance().config_loader()
    # Jobs in this process have their Trainer and memory checked here; jobs in other processes on this
    # machine their memory (torch loads, about a second, while the tracking service starts); jobs
    # elsewhere (SLURM, Ray) check their own machine's.
    in_process = _launcher(config) in IN_PROCESS
    local = _launcher(config) in LOCAL_PARALLEL
    composed = {}
    for num, overrides in enumerate(jobs):
        try:
            job = composed[tuple(overrides)] = loader.load_sweep_config(config, sweep_overrides=list(overrides))
            validate(job)
            if in_process or local:
                from echo.preflight import check_memory, preflight

                (preflight if in_process else check_memory)(job)
        except (ConfigError, HydraException, OmegaConfBaseException) as error:  # a bad value, or `${typo}`
            if _interrupted(error):
                raise KeyboardInterrupt from error
            why = describe(error, overrides) if isinstance(error, HydraException) else first_line(error)
            print(f"echo: bad sweep: job #{num} ({' '.join(overrides)}): {why}", file=sys.stderr)
            sys.exit(2)
    if in_process:
        answer_sweep_jobs_with(loader, config, composed)  # composed once, not thrice (echo/compat.py)
    return list(composed.values())


def grid(overrides: list) -> list[list[str]]:
    """A basic sweep's jobs, as Hydra's BasicSweeper makes them from the parsed `overrides`: every
    combination of each key's values (a key given twice: its last value, in its first place)."""
    from hydra.errors import HydraException

    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise HydraException(f"BasicSweeper does not support sweep type : {override.value_type.name}")
    return [list(job) for job in itertools.product(*choices.values())]


def _interrupted(error: BaseException) -> bool:
    """Whether Ctrl-C caused `error` (amid Hydra's composing it surfaces as another error)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


INTERRUPTED: list[int] = []  # the signals (SIGINT, SIGTERM) that interrupted the sweep's launching process


def _sigterm_as_interrupt() -> None:
    """SIGTERM to the launching process ends the sweep as Ctrl-C does, so atexit handlers run; both
    are noted (INTERRUPTED) for the parent's status."""

    def interrupt(signum, frame) -> None:
        INTERRUPTED.append(signum)
        signal.default_int_handler(signal.SIGINT, frame)

    with contextlib.suppress(ValueError):  # not the main thread
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, interrupt)


def job_name_and_tags(hydra_cfg, cfg) -> tuple[str, dict[str, str]]:
    """The run name and tags of one Hydra job; a sweep's job is tagged with its parent run."""
    name, tags = run_name_and_tags(hydra_cfg)
    tags.update(slurm_tags())  # echo.slurm_job_id, echo.slurm_node in a SLURM job
    if SWEEP_TAG in tags and cfg.logger.name == "mlflow" and PARENT_RUN_ENV not in os.environ and not PENDING_PARENT:
        if parent := parent_of_sweep(tags[SWEEP_TAG], cfg.logger.experiment):
            tags["mlflow.parentRunId"] = parent
    return name, tags
