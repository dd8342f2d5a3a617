"""Sweeps in MLflow: one parent run per multirun, its jobs as children, and a summary at the end.

Works with every Hydra launcher (basic, joblib, submitit, Ray) and sweeper (basic, Optuna):
the parent is created as the sweep starts, by a process of the sweep's own (`SweepStore`, which
also writes the summary: the launching process never imports mlflow), before any job's run, and
each job finds its parent through the environment, or, where the environment does not
travel (a remote Ray cluster), through the sweep's tag.
"""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from echo.slurm import slurm_tags
from echo.tracking import (
    PARENT_RUN_ENV,
    SWEEP_TAG,
    TrackingService,
    close_service_connections,
    experiment_id,
    mlflow_client,
    run_name_and_tags,
    tag_provenance,
    tracking_uri,
)
from echo.tracking.naming import PENDING_PARENT
from echo.tracking.outbox import ROOT, UPLOAD, cannot_write, outboxes, read, reason, unreachable
from echo.tracking.worker import ANSWER, open_store
from echo.tracking.worker import client as cached_client  # one per store: opening one costs

PARENT_TAG = "echo.sweep_parent"
# Objectives where lower is better; every other metric is maximised.
LOWER_IS_BETTER = ("time_to_target_s", "epochs_to_target", "samples_to_target", "train_time_s", "val/loss")
# What a run that never reached the target scores on a *_to_target objective (a finite number:
# samplers rank trials, and a missing value would fail the trial instead of ranking it last).
MISSED_TARGET = 1e9
# Params that differ between a sweep's jobs without making them different settings: the seed, and
# what conf/config.yaml leaves out of run names because it does not change results.
NOT_A_SETTING = ("seed", "progress", "threads", "cuda_graph")
# What the per-setting table aggregates over seeds, besides the objective (the *_to_target ones
# where present: only seeds that reached the target have them).
SEED_METRICS = ("test/exact_match", "test/token_acc", "time_to_target_s", "epochs_to_target")
REACHED = "epochs_to_target"  # a run has it when its val/exact_match reached its `target`


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
    """A multirun is one parent MLflow run; its jobs are children (`mlflow.parentRunId`).

    At the end the parent holds the best child (tags `echo.best_run`, `echo.best_run_id`,
    metric `best/<objective>`), a table of all children (`sweep.md`) and a plot of the
    objective against each swept setting (`sweep.png`). A sweep one of whose jobs FAILED ends its
    parent FAILED (after its summary, if it went on); an interrupted one (Ctrl-C, SIGTERM) ends the
    parent and its unfinished children KILLED, never RUNNING (`end_sweep`).
    """

    parent: str | None = None
    service: TrackingService | None = None
    store: SweepStore | None = None
    _pending: Answer | None = None  # the parent run's id, until taken

    def __getstate__(self) -> dict:
        """What a job gets: parallel and remote launchers (joblib, submitit, Ray) pickle this callback
        into every job. Jobs need no MLflow client, and unpickling one imports mlflow (seconds of CPU);
        they find the tracking service and their parent run through the environment."""
        return {key: value for key, value in self.__dict__.items() if key not in ("service", "store", "_pending")}

    def on_multirun_start(self, config, **kwargs) -> None:
        tracked = config.logger.name == "mlflow"
        try:
            if tracked:
                # A store that stops answering: a few retries (about 15 s), not MLflow's minutes (as the jobs' workers)
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
                if _launcher(config) in SHARED_TRACKING:
                    # Parallel jobs on this machine, or a population's members: one tracking process writes
                    # all their runs. It starts first and imports mlflow while this process checks and
                    # composes the jobs and imports torch, instead of every job's worker later (or a
                    # population's, as it trains).
                    self.service = TrackingService()
                    atexit.register(self.service.close)
                # The store opens meanwhile too, ready for the parent run
                self.store = SweepStore(self.service.socket if self.service else None)
                self.store.call("open")
            check_sweep(config)
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
            print(
                f"echo: tracking failed: the tracking server {tracking_uri()} is unreachable ({why})", file=sys.stderr
            )
            self._stop_tracking()
            sys.exit(2)
        if why := cannot_write(tracking_uri()):
            print(f"echo: tracking failed: {why}", file=sys.stderr)
            self._stop_tracking()
            sys.exit(2)
        sweep = self.sweep = Path(config.hydra.sweep.dir).name
        excluded = set(config.hydra.job.config.override_dirname.exclude_keys)  # progress, threads
        overrides = " ".join(o for o in task_overrides(config) if o.split("=")[0] not in excluded)
        self.objective = config.get("objective", "val/exact_match")
        self.ignored = ("seed", *sorted(excluded))  # children that differ only in these are one setting
        tags = {SWEEP_TAG: sweep, PARENT_TAG: "true", "echo.overrides": overrides, "echo.objective": self.objective}
        self._pending = self.store.call(
            "create", experiment=config.logger.experiment, run_name=f"sweep {overrides}", tags=tags
        )
        if _launcher(config) in IN_PROCESS:  # the jobs' runs ask for it as they start, after their imports
            PENDING_PARENT.append(self._take_parent)
        else:  # the jobs, elsewhere, find it in the environment
            self._take_parent()
        atexit.register(self._end_if_reachable, None)  # if the sweep stops before on_multirun_end
        _sigterm_as_interrupt()

    def _stop_tracking(self) -> None:
        """Stop the tracking processes before the sweep's first write (a bad sweep, or one interrupted)."""
        for process in (self.service, self.store):  # the service first: the store's connection then closes at once
            if process is not None:
                process.kill()

    def _take_parent(self) -> None:
        """The parent run, once created (PARENT_RUN_ENV set for the jobs); a line if it could not be."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            self.parent = pending.result()
        except Exception as error:
            print(f"echo: tracking failed: could not create the sweep's parent run ({reason(error)})", file=sys.stderr)
            return
        os.environ[PARENT_RUN_ENV] = self.parent

    def on_multirun_end(self, config, **kwargs) -> None:
        workers_stopped = stop_parallel_workers()  # they exit while the summary is written
        self._take_parent()  # a sweep of no job never asked for it
        problem = None
        if self.parent is not None and (why := unreachable(tracking_uri())):
            problem, self.parent = f"could not write the sweep's summary: {tracking_uri()} is unreachable ({why})", None
        if self.parent is not None:
            try:
                parent, self.parent = self.parent, None
                os.environ.pop(PARENT_RUN_ENV, None)
                ignored = list(self.ignored)
                self.store.call(
                    "finish", parent=parent, objective=self.objective, ignored=ignored, argv=sys.argv
                ).result()
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

    def _end_if_reachable(self, status: str | None) -> None:
        """End the parent with `status`; None: KILLED after an interrupt, else as `end_sweep` finds."""
        if status is None and INTERRUPTED:
            status = "KILLED"
        try:
            self._end(status)
        except Exception as error:  # the store is gone: the jobs' lines said where their runs are kept
            print(f"echo: tracking failed: could not end the sweep's parent run ({reason(error)})", file=sys.stderr)

    def _end(self, status: str | None) -> None:
        self._take_parent()
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_RUN_ENV, None)
        self.store.call("end", parent=parent, status=status).result()


IN_PROCESS = ("BasicLauncher", "PopulationLauncher")  # launchers that run every job in this process
SHARED_TRACKING = ("JoblibLauncher", "PopulationLauncher")  # launchers whose runs one tracking process writes


def _launcher(config) -> str:
    return str(config.hydra.launcher.get("_target_", "")).rsplit(".", 1)[-1]


class SweepStore:
    """The sweep's MLflow work (the parent run, the summary, its end), done by another process, so
    that this one never imports mlflow: the sweep's tracking service where it has one (parallel
    jobs, a population's members: one process then imports mlflow and opens the store for the
    whole sweep), else a process of the store's own. Either imports mlflow and opens the store
    (about 3.5 s on a small machine) while this process imports torch and composes the jobs.
    Requests go as JSON lines, one answer comes back for each; if this process dies first, the
    parent ends KILLED when its requests' stream closes."""

    def __init__(self, service: str | None = None):
        """`service`: the socket of the sweep's tracking service (echo.tracking.TrackingService)."""
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
        self.sent, self.answers = 0, []  # requests are answered in order

    def call(self, op: str, **args) -> Answer:
        """Send request `op` (open, create, finish, end: `SweepRequests`); its answer, read when asked for."""
        self.requests.write(json.dumps({"op": f"sweep.{op}", "uri": tracking_uri(), **args}) + "\n")
        self.requests.flush()
        self.sent += 1
        return Answer(self, self.sent - 1)

    def answer(self, index: int):
        """Request `index`'s answer (RuntimeError if the other process failed it, or exited)."""
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
        try:
            self.sock.shutdown(socket.SHUT_WR)  # the service sees the end of the requests ...
            self.replies.read()  # ... and closes its side
        except OSError:
            pass
        self.sock.close()


@dataclass
class Answer:
    """A request's answer, read from the other process when `result()` is asked for."""

    store: SweepStore
    index: int

    def result(self):
        return self.store.answer(self.index)


class SweepRequests:
    """Does what SweepStore asks, where its requests arrive: in a store process of its own (`serve`)
    or in the sweep's tracking service. `reply(text)` answers one request; `client(uri)` is an MLflow
    client for a store. A parent created and not ended when the requests stop (the launching process
    died) ends KILLED (`abandon`)."""

    def __init__(self, reply, client=cached_client):
        self.reply, self.client = reply, client
        self.open_parent, self.uri = None, None

    def handle(self, line: str) -> None:
        request = json.loads(line)
        self.uri = request.pop("uri")
        op = request.pop("op")
        if op == "sweep.open":  # while the jobs are checked: it writes nothing
            open_store(self.uri, self.client)
            self.reply(json.dumps({"value": None}))
            return
        client = self.client(self.uri)
        try:
            if op == "sweep.create":
                value = self.open_parent = create_parent(client, **request)
            elif op == "sweep.finish":
                value, self.open_parent = finish_sweep(client, **request), None
            else:  # "sweep.end"
                value, self.open_parent = end_sweep(client, **request), None
            self.reply(json.dumps({"value": value}))
        except Exception as error:
            self.reply(json.dumps({"error": reason(error)}))

    def abandon(self) -> None:
        if self.open_parent is None:
            return
        try:
            end_sweep(self.client(self.uri), self.open_parent, "KILLED")
        except Exception:  # the store is gone: the launching process has said so
            pass


def serve() -> None:
    """The sweep's store process (SweepStore, where the sweep has no tracking service): answer
    requests until stdin closes, then end a parent left open KILLED."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = SweepRequests(lambda text: print(ANSWER + text, flush=True))
    for line in sys.stdin:
        requests.handle(line)
    requests.abandon()


def create_parent(client, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    """A sweep's parent run; its id."""
    return client.create_run(experiment_id(client, experiment), run_name=run_name, tags=tags).info.run_id


def finish_sweep(client, parent: str, objective: str, ignored: list[str], argv: list[str]) -> None:
    """The sweep's end: its parent tagged with where it came from (`argv`), its summary, FINISHED, or
    FAILED if one of its jobs failed (a diverged job: the sweep went on)."""
    status = "FINISHED"
    try:
        tag_provenance(client, parent, argv)
        summary = summarize_sweep(client, parent, objective, ignored)
        if summary["failed"]:
            status = "FAILED"
    finally:
        client.set_terminated(parent, status)


def end_sweep(client, parent: str, status: str | None) -> None:
    """End a sweep's parent run, and its children still RUNNING, with `status` (KILLED, FAILED). None:
    a sweep that stopped before its end, for a reason its launching process did not see (an error
    raised from a job, or an interrupt while a job's own handler had the signal): its children
    tell. An interrupted job ended KILLED: KILLED; else one that ended FAILED: FAILED; else KILLED."""
    runs = children(client, parent)
    if status is None:
        statuses = {run.info.status for run in runs}
        status = "FAILED" if "FAILED" in statuses and "KILLED" not in statuses else "KILLED"
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
    client.set_terminated(parent, status)


def _sweep_of(outbox: Path) -> str | None:
    try:
        return read(outbox)["run"]["tags"].get(SWEEP_TAG)
    except (OSError, ValueError, KeyError):
        return None


def stop_parallel_workers():
    """Tell the joblib launcher's worker processes to exit, now that every job has returned with
    its run written; returns a function that waits until they have.

    Left alone, they are stopped by the interpreter's exit, one after another with the launching
    process's own teardown: seconds after the sweep ended. Stopped here they exit while the
    summary is written, and the launching process, with no children left, exits at once (run.py).
    """
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    executor = getattr(loky, "_executor", None)
    manager = getattr(executor, "_executor_manager_thread", None)  # it joins the workers
    if manager is None:
        return lambda: None
    executor.shutdown(wait=False)
    return manager.join


def task_overrides(config) -> list[str]:
    """The command line's overrides as typed, as Hydra's sweeper reads them: `x=1,${y}` is not resolved."""
    return OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def check_sweep(config) -> None:
    """Check every job of a basic (grid) sweep before any starts; exit with one line on a bad one.

    A sweep whose fourth job has `model.hidden_size=-5` should not train three models first.
    (Raising here would not stop Hydra: it turns exceptions in callbacks into warnings.)
    """
    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return  # other sweepers choose their jobs as they go
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from echo.config import ConfigError, first_line, validate
    from echo.hydra_errors import describe

    params = OmegaConf.to_container(config.hydra.sweeper, resolve=False).get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + task_overrides(config)
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]
    loader = GlobalHydra.instance().config_loader()
    # Where the jobs run in this process, torch and Lightning load here for the first one anyway: each
    # job's memory estimate and Trainer (what a run checks before it starts) are checked here first.
    in_process = _launcher(config) in IN_PROCESS
    composed = {}
    for num, overrides in enumerate(jobs):
        try:
            job = composed[tuple(overrides)] = loader.load_sweep_config(config, sweep_overrides=list(overrides))
            validate(job)
            if in_process:
                from echo.preflight import preflight

                preflight(job)
        except (ConfigError, HydraException, OmegaConfBaseException) as error:  # a bad value, or `${typo}`
            if _interrupted(error):
                raise KeyboardInterrupt from error
            why = describe(error, overrides) if isinstance(error, HydraException) else first_line(error)
            print(f"echo: bad sweep: job #{num} ({' '.join(overrides)}): {why}", file=sys.stderr)
            sys.exit(2)
    if in_process:
        _hand_out_copies(loader, config, composed)


def _interrupted(error: BaseException) -> bool:
    """Whether Ctrl-C caused `error`: one amid Hydra's composing can surface as an OmegaConf or Hydra
    error (or another), raised while handling the KeyboardInterrupt."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _hand_out_copies(loader, master, composed: dict) -> None:
    """From now on Hydra's config `loader` answers the sweep's jobs with copies of the configs
    `check_sweep` composed (about 5 ms each) instead of composing them again (about 0.1 s each):
    Hydra's sweeper composes every job once more to check it, and an in-process launcher once
    more to run it. A launcher that runs the jobs elsewhere pickles the loader: it is left as it is."""
    compose = loader.load_sweep_config

    def load_sweep_config(master_config, sweep_overrides):
        job = composed.get(tuple(sweep_overrides)) if master_config is master else None
        if job is None:
            return compose(master_config, sweep_overrides)
        job = copy.deepcopy(job)
        # As Hydra's own does: the values resolved once for the sweep since (its ${now:} folder) are the job's.
        OmegaConf.copy_cache(from_config=master_config, to_config=job)
        return job

    loader.load_sweep_config = load_sweep_config


INTERRUPTED: list[int] = []  # the signals (SIGINT, SIGTERM) that interrupted the sweep's launching process


def _sigterm_as_interrupt() -> None:
    """SIGTERM to the launching process ends the sweep as Ctrl-C does, so atexit handlers run; both
    are noted (INTERRUPTED), for the parent's status. (A job's run, in this process, handles SIGTERM
    itself while it trains: `end_sweep` tells that from its children.)"""

    def interrupt(signum, frame) -> None:
        INTERRUPTED.append(signum)
        signal.default_int_handler(signal.SIGINT, frame)

    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread
        pass


def children(client, parent_run_id: str) -> list:
    """The sweep's jobs: its child runs, less those another child continued (`echo.resumed_from`, as a
    requeued SLURM job does), so that a job counts once, as its last run."""
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )
    continued = {run.data.tags.get("echo.resumed_from") for run in runs}
    return [run for run in runs if run.info.run_id not in continued]


def swept_settings(runs: list) -> list[str]:
    """The params whose values differ between runs: what the sweep varied."""
    if len(runs) < 2:
        return []
    keys = set().union(*(run.data.params for run in runs))
    return sorted(k for k in keys if len({run.data.params.get(k) for run in runs}) > 1)


def summarize_sweep(
    client, parent_run_id: str, objective: str = "val/exact_match", ignored: Iterable[str] = NOT_A_SETTING
) -> dict[str, object]:
    """Write the sweep's table, plot and best child onto its parent run; return the summary.

    Children that differ only in the `ignored` params (the seed, and settings that do not change
    results) are one setting; `sweep.md` has a row of seed statistics per setting, then every child.
    A sweep with one setting also logs `mean/<metric>`, `std/<metric>` and `success_rate` on the parent.
    """
    runs = children(client, parent_run_id)
    lower = objective in LOWER_IS_BETTER
    worst = math.inf if lower else -math.inf
    runs.sort(key=lambda r: (r.data.metrics.get(objective, worst) * (1 if lower else -1), r.info.run_name))
    swept = swept_settings(runs)
    ignored = set(ignored)
    keys = [k for k in swept if k not in ignored]
    settings = seed_statistics(runs, keys, objective)
    client.log_text(parent_run_id, sweep_table(runs, swept, objective, settings, keys), "sweep.md")
    summary: dict[str, object] = {"children": len(runs), "swept": swept, "settings": [s.as_dict() for s in settings]}
    summary["failed"] = sum(run.info.status == "FAILED" for run in runs)
    scored = [r for r in runs if objective in r.data.metrics]
    if scored:
        best = scored[0]
        summary.update(best_run=best.info.run_name, best_run_id=best.info.run_id, best=best.data.metrics[objective])
        client.set_tag(parent_run_id, "echo.best_run", best.info.run_name)
        client.set_tag(parent_run_id, "echo.best_run_id", best.info.run_id)
        client.log_metric(parent_run_id, f"best/{objective}", best.data.metrics[objective])
        for key in swept:
            client.set_tag(parent_run_id, f"echo.best.{key}", best.data.params.get(key, ""))
    if len(settings) == 1 and settings[0].finished:
        for name, value in settings[0].parent_metrics().items():
            client.log_metric(parent_run_id, name, value)
    if sum(len(s.stats.get(objective, ())) for s in settings) > 1:
        client.log_figure(parent_run_id, sweep_plot(settings, keys, objective), "sweep.png")
    return summary


@dataclass
class Spread:
    """A metric over a setting's finished seeds: mean, sample standard deviation (n-1), min and max."""

    values: list[float]

    def __len__(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n-1); None for a single seed."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def cell(self, fmt: str) -> str:
        """`mean ± std (min–max)`; one seed: its value."""
        if len(self.values) == 1:
            return format(self.values[0], fmt)
        lo, hi = min(self.values), max(self.values)
        return f"{self.mean:{fmt}} ± {self.std:{fmt}} ({lo:{fmt}}–{hi:{fmt}})"


@dataclass
class Setting:
    """The children of a sweep that differ only in their seed."""

    values: dict[str, str]  # the swept params that make this setting (seed excluded)
    finished: list = field(default_factory=list)  # FINISHED children: the ones the statistics use
    unfinished: list = field(default_factory=list)  # FAILED, KILLED (or still RUNNING): counted, not averaged
    stats: dict[str, Spread] = field(default_factory=dict)  # metric -> its spread over finished seeds

    @property
    def reached(self) -> int:
        """Finished seeds whose val/exact_match reached their run's `target` (they have epochs_to_target)."""
        return sum(REACHED in run.data.metrics for run in self.finished)

    @property
    def success_rate(self) -> float | None:
        return self.reached / len(self.finished) if self.finished else None

    def as_dict(self) -> dict[str, object]:
        """The setting's statistics as plain values (what summarize_sweep returns)."""
        return {
            "setting": dict(self.values),
            "seeds": [run.data.params.get("seed", "") for run in sorted(self.finished, key=_seed)],
            "not_finished": len(self.unfinished),
            "reached": self.reached,
            "success_rate": self.success_rate,
            "stats": {
                name: {"n": len(s), "mean": s.mean, "std": s.std, "min": min(s.values), "max": max(s.values)}
                for name, s in self.stats.items()
            },
        }

    def parent_metrics(self) -> dict[str, float]:
        """`mean/<metric>`, `std/<metric>` (two seeds or more) for every metric in the table, and `success_rate`."""
        logged = {}
        for name, spread in self.stats.items():
            logged[f"mean/{name}"] = spread.mean
            if spread.std is not None:
                logged[f"std/{name}"] = spread.std
        if self.success_rate is not None:
            logged["success_rate"] = self.success_rate
        return logged


def seed_statistics(runs: list, keys: list[str], objective: str) -> list[Setting]:
    """Group children by the params in `keys` (every swept param but the seed) and compute each
    setting's spread of the objective and the test metrics over its finished seeds; best setting first."""
    settings: dict[tuple, Setting] = {}
    for run in runs:
        values = {k: run.data.params.get(k, "") for k in keys}
        setting = settings.setdefault(tuple(values.values()), Setting(values))
        (setting.finished if run.info.status == "FINISHED" else setting.unfinished).append(run)
    metrics = list(dict.fromkeys([objective, *SEED_METRICS]))
    for setting in settings.values():
        for name in metrics:
            values = [run.data.metrics.get(name, math.nan) for run in setting.finished]
            values = [v for v in values if math.isfinite(v)]
            if values:
                setting.stats[name] = Spread(values)
    lower = objective in LOWER_IS_BETTER
    to_target = "_to_target" in objective  # only seeds that reached the target have it: rank by success first

    def rank(setting: Setting) -> tuple:
        spread = setting.stats.get(objective)
        order = [_sortable(v) for v in setting.values.values()]
        if spread is None:
            return (1, 0.0, 0.0, order)
        success = -(setting.success_rate or 0.0) if to_target else 0.0
        return (0, success, spread.mean * (1 if lower else -1), order)

    return sorted(settings.values(), key=rank)


def _sortable(value: str) -> tuple:
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _fmt(metric: str) -> str:
    if metric.endswith("_s"):
        return ".1f"
    if metric.startswith(("epochs", "samples")):
        return ".0f"
    if "exact_match" in metric or "acc" in metric:
        return ".3f"
    return ".4g"


def sweep_table(runs: list, swept: list[str], objective: str, settings: list[Setting], keys: list[str]) -> str:
    """`sweep.md`: a row per setting (seed statistics), best first, then every child run, best first."""
    targets = sorted({run.data.params.get("target", "") for run in runs} - {""})
    target = f"`target`={targets[0]}" if len(targets) == 1 else "its run's `target`"
    metrics = [m for m in dict.fromkeys([objective, *SEED_METRICS]) if any(m in s.stats for s in settings)]
    header = [*(keys or ["setting"]), "seeds", "not finished", "success", *metrics]
    lines = [
        "# Sweep summary",
        "",
        "## Per setting",
        "",
        "Children that differ only in `seed` are one setting. Each cell is mean ± std (min–max) over the "
        "setting's finished seeds; std is the sample standard deviation (n−1); a single seed shows its value. "
        f"`success`: finished seeds whose val/exact_match reached {target} (they have epochs_to_target), "
        "of all finished seeds. `not finished`: FAILED or KILLED children, left out of every mean, std, "
        "min–max and success rate. time_to_target_s and epochs_to_target are over the seeds that reached "
        "the target.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    for setting in settings:
        seeds = ",".join(run.data.params.get("seed", "?") for run in sorted(setting.finished, key=_seed))
        rate = setting.success_rate
        row = [
            *(setting.values.values() if keys else ["all runs"]),
            f"{len(setting.finished)} ({seeds})" if seeds else "0",
            _unfinished(setting.unfinished),
            f"{setting.reached}/{len(setting.finished)} ({rate:.2f})" if rate is not None else "–",
            *(setting.stats[m].cell(_fmt(m)) if m in setting.stats else "–" for m in metrics),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Runs", "", runs_table(runs, swept, objective)]
    return "\n".join(lines)


def _seed(run) -> tuple:
    return _sortable(run.data.params.get("seed", ""))


def _unfinished(runs: list) -> str:
    if not runs:
        return "0"
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def runs_table(runs: list, swept: list[str], objective: str) -> str:
    """A Markdown table of a sweep's runs in the order given (best first)."""
    metrics = list(
        dict.fromkeys([objective, "val/exact_match", "test/exact_match", "time_to_target_s", "train_time_s"])
    )
    header = ["run", "status", *swept, *metrics]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for run in runs:
        params = [run.data.params.get(k, "") for k in swept]
        values = [f"{run.data.metrics[m]:.4g}" if m in run.data.metrics else "" for m in metrics]
        lines.append("| " + " | ".join([run.info.run_name, run.info.status, *params, *values]) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(settings: list[Setting], keys: list[str], objective: str):
    """The spread over seeds: per setting, a point per finished seed and the mean with ± std error
    bars, for the objective and test/exact_match (a numeric axis when one numeric setting is swept)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in dict.fromkeys([objective, "test/exact_match"]) if any(m in s.stats for s in settings)]
    order = sorted(settings, key=lambda s: [_sortable(v) for v in s.values.values()])
    try:
        x = [float(s.values[keys[0]]) for s in order] if len(keys) == 1 else None
    except ValueError:
        x = None
    numeric = x is not None
    if not numeric:
        x = list(range(len(order)))
    spacing = (max(x) - min(x)) / (len(x) - 1) if len(x) > 1 else 1.0
    logx = numeric and min(x) > 0 and max(x) / min(x) > 50
    fig, axes = plt.subplots(1, len(shown), figsize=(max(4.5, 0.6 * len(order) + 2) * len(shown), 4), squeeze=False)
    for ax, metric in zip(axes[0], shown):
        labelled = False
        for setting, at in zip(order, x):
            spread = setting.stats.get(metric)
            if spread is None:
                continue
            offsets = [(j - (len(spread) - 1) / 2) / len(spread) for j in range(len(spread))]  # within ±0.5
            xs = [at * 1.05**o if logx else at + (0.12 if numeric else 0.3) * spacing * o for o in offsets]
            ax.errorbar(
                [at],
                [spread.mean],
                yerr=[[spread.std or 0.0]],
                fmt="_",
                ms=18,
                mew=2,
                color="C3",
                capsize=6,
                label=None if labelled else "mean ± std",
            )
            ax.scatter(xs, spread.values, s=16, color="C0", alpha=0.7, zorder=3, label=None if labelled else "seeds")
            labelled = True
        if logx:
            ax.set_xscale("log")
        if numeric:
            ax.set_xlabel(keys[0])
            if len(x) <= 12:
                ax.set_xticks(x, [s.values[keys[0]] for s in order])
        else:
            labels = [", ".join(f"{k.split('.')[-1]}={v}" for k, v in s.values.items()) or "all runs" for s in order]
            ax.set_xticks(x, labels, rotation=30 if len(order) > 1 else 0, ha="right" if len(order) > 1 else "center")
            ax.set_xlim(-0.6, len(order) - 0.4)
        if "exact_match" in metric or "acc" in metric:
            ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    unfinished = sum(len(s.unfinished) for s in settings)
    seeds = sum(len(s.finished) for s in settings)
    note = f"; {unfinished} not finished, not shown" if unfinished else ""
    fig.suptitle(f"{len(order)} setting(s), {seeds} finished runs: seeds and mean ± std (n−1){note}")
    fig.tight_layout()
    return fig


def job_name_and_tags(hydra_cfg, cfg) -> tuple[str, dict[str, str]]:
    """The run name and tags of one Hydra job; a sweep's job is tagged with its parent run."""
    name, tags = run_name_and_tags(hydra_cfg)
    tags.update(slurm_tags())  # echo.slurm_job_id, echo.slurm_node in a SLURM job
    if SWEEP_TAG in tags and cfg.logger.name == "mlflow" and PARENT_RUN_ENV not in os.environ and not PENDING_PARENT:
        if parent := parent_of_sweep(tags[SWEEP_TAG], cfg.logger.experiment):
            tags["mlflow.parentRunId"] = parent
    return name, tags
