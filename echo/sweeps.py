"""Sweeps in MLflow: one parent run per multirun, its jobs as children, and a summary at the end.

Works with every Hydra launcher (basic, joblib, submitit, Ray) and sweeper (basic, Optuna):
the parent is created in the launching process before any job starts (which also creates the
SQLite schema and the experiment once: parallel jobs racing on a fresh store crash), and each
job finds its parent through the environment, or, where the environment does not travel (a
remote Ray cluster), through the sweep's tag.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from echo.tracking import PARENT_RUN_ENV, SWEEP_TAG, TrackingService, experiment_id, mlflow_client, run_name_and_tags

PARENT_TAG = "echo.sweep_parent"
# Objectives where lower is better; every other metric is maximised.
LOWER_IS_BETTER = ("time_to_target_s", "epochs_to_target", "samples_to_target", "train_time_s", "val/loss")
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
    """A multirun is one parent MLflow run; its jobs are children (`mlflow.parentRunId`).

    At the end the parent holds the best child (tags `echo.best_run`, `echo.best_run_id`,
    metric `best/<objective>`), a table of all children (`sweep.md`) and a plot of the
    objective against each swept setting (`sweep.png`). If the sweep is interrupted (Ctrl-C,
    SIGTERM) or dies, the parent and its unfinished children end KILLED, never RUNNING.
    """

    parent: str | None = None
    service: TrackingService | None = None

    def __getstate__(self) -> dict:
        """What a job gets: parallel and remote launchers (joblib, submitit, Ray) pickle this callback
        into every job. Jobs need no MLflow client, and unpickling one imports mlflow (seconds of CPU);
        they find the tracking service through the environment."""
        return {key: value for key, value in self.__dict__.items() if key not in ("client", "service")}

    def on_multirun_start(self, config, **kwargs) -> None:
        check_sweep(config)
        if config.logger.name != "mlflow":
            return
        if str(config.hydra.launcher.get("_target_", "")).endswith("JoblibLauncher"):
            # Parallel jobs on this machine: one tracking process writes all their runs, and it
            # imports mlflow now, alongside this process, instead of every job's worker later.
            self.service = TrackingService()
            atexit.register(self.service.close)
        sweep = Path(config.hydra.sweep.dir).name
        excluded = set(config.hydra.job.config.override_dirname.exclude_keys)  # progress, threads
        overrides = " ".join(o for o in config.hydra.overrides.task if o.split("=")[0] not in excluded)
        self.objective = config.get("objective", "val/exact_match")
        self.client = mlflow_client()
        run = self.client.create_run(
            experiment_id(self.client, config.logger.experiment),
            run_name=f"sweep {overrides}",
            tags={SWEEP_TAG: sweep, PARENT_TAG: "true", "echo.overrides": overrides, "echo.objective": self.objective},
        )
        self.parent = run.info.run_id
        os.environ[PARENT_RUN_ENV] = self.parent
        atexit.register(self._end, "KILLED")  # if the sweep dies before on_multirun_end
        _sigterm_as_interrupt()

    def on_multirun_end(self, config, **kwargs) -> None:
        workers_stopped = stop_parallel_workers()  # they exit while the summary is written
        if self.parent is not None:
            try:
                summarize_sweep(self.client, self.parent, self.objective)
            finally:
                self._end("FINISHED")
        workers_stopped()
        if self.service is not None:
            self.service.close()  # every job's connection has closed

    def _end(self, status: str) -> None:
        if self.parent is None:
            return
        parent, self.parent = self.parent, None
        os.environ.pop(PARENT_RUN_ENV, None)
        if status != "FINISHED":
            for run in children(self.client, parent):
                if run.info.status == "RUNNING":
                    self.client.set_terminated(run.info.run_id, status)
        self.client.set_terminated(parent, status)


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

    from echo.config import ConfigError, validate

    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None)[0]
    loader = GlobalHydra.instance().config_loader()
    for num, overrides in enumerate(jobs):
        try:
            validate(loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides)))
        except ConfigError as error:
            print(f"echo: bad sweep: job #{num} ({' '.join(overrides)}): {error}", file=sys.stderr)
            sys.exit(2)


def _sigterm_as_interrupt() -> None:
    """SIGTERM to the launching process ends the sweep as Ctrl-C does, so atexit handlers run."""
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, lambda *_: signal.default_int_handler(signal.SIGINT, None))
    except ValueError:  # not the main thread
        pass


def children(client, parent_run_id: str) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=10_000
    )


def swept_settings(runs: list) -> list[str]:
    """The params whose values differ between runs: what the sweep varied."""
    if len(runs) < 2:
        return []
    keys = set().union(*(run.data.params for run in runs))
    return sorted(k for k in keys if len({run.data.params.get(k) for run in runs}) > 1)


def summarize_sweep(client, parent_run_id: str, objective: str = "val/exact_match") -> dict[str, object]:
    """Write the sweep's table, plot and best child onto its parent run; return the summary."""
    runs = children(client, parent_run_id)
    lower = objective in LOWER_IS_BETTER
    worst = math.inf if lower else -math.inf
    runs.sort(key=lambda r: (r.data.metrics.get(objective, worst) * (1 if lower else -1), r.info.run_name))
    swept = swept_settings(runs)
    client.log_text(parent_run_id, sweep_table(runs, swept, objective), "sweep.md")
    summary: dict[str, object] = {"children": len(runs), "swept": swept}
    scored = [r for r in runs if objective in r.data.metrics]
    if scored:
        best = scored[0]
        summary.update(best_run=best.info.run_name, best_run_id=best.info.run_id, best=best.data.metrics[objective])
        client.set_tag(parent_run_id, "echo.best_run", best.info.run_name)
        client.set_tag(parent_run_id, "echo.best_run_id", best.info.run_id)
        client.log_metric(parent_run_id, f"best/{objective}", best.data.metrics[objective])
        for key in swept:
            client.set_tag(parent_run_id, f"echo.best.{key}", best.data.params.get(key, ""))
    if scored and swept:
        client.log_figure(parent_run_id, sweep_plot(scored, swept, objective), "sweep.png")
    return summary


def sweep_table(runs: list, swept: list[str], objective: str) -> str:
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


def sweep_plot(runs: list, swept: list[str], objective: str):
    """The objective against each swept setting (numbers on a numeric axis, else categories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = swept[:4]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.5 * len(shown), 3.8), squeeze=False)
    for ax, key in zip(axes[0], shown):
        raw = [run.data.params.get(key, "") for run in runs]
        y = [run.data.metrics[objective] for run in runs]
        try:
            x = [float(v) for v in raw]
            ax.scatter(x, y)
            if min(x) > 0 and max(x) / min(x) > 50:
                ax.set_xscale("log")
        except ValueError:
            ax.scatter(range(len(raw)), y)
            ax.set_xticks(range(len(raw)), raw, rotation=30)
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{objective} across the sweep ({len(runs)} runs)")
    fig.tight_layout()
    return fig


def job_name_and_tags(hydra_cfg, cfg) -> tuple[str, dict[str, str]]:
    """The run name and tags of one Hydra job; a sweep's job is tagged with its parent run."""
    name, tags = run_name_and_tags(hydra_cfg)
    if SWEEP_TAG in tags and cfg.logger.name == "mlflow" and PARENT_RUN_ENV not in os.environ:
        if parent := parent_of_sweep(tags[SWEEP_TAG], cfg.logger.experiment):
            tags["mlflow.parentRunId"] = parent
    return name, tags
