"""`hydra/launcher=population`: a multirun's jobs that differ only in settings that leave every shape
alone train as one stacked model in this process, the others one after another (docs/populations.md).
Hydra imports this module whenever it starts: it imports nothing heavy."""

import copy
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class PopulationLauncherConf:
    _target_: str = "hydra_plugins.echo_population.population_launcher.PopulationLauncher"
    max_members: int = 64  # the most runs trained as one population; more form further populations


ConfigStore.instance().store(group="hydra/launcher", name="population_base", node=PopulationLauncherConf)


@dataclass
class _Job:
    num: int
    overrides: list[str]
    config: DictConfig  # hydra node included
    task_cfg: DictConfig  # what the task function would get
    tags: dict = field(default_factory=dict)  # more tags for its run (echo/continuation.py)
    restore: dict | None = None  # a continued member's checkpoint


class PopulationLauncher(Launcher):
    def __init__(self, max_members: int = 64) -> None:
        if not isinstance(max_members, int) or max_members < 1:
            print(
                f"echo: bad config: hydra.launcher.max_members={max_members!r} must be a whole number >= 1",
                file=sys.stderr,
            )
            sys.exit(2)
        self.max_members = max_members

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        from echo.continuation import continued_parent

        returns: dict[int, JobReturn] = {}
        units, rest = self._continue(jobs, returns) if continued_parent() else ([], jobs)
        for unit in units + self._plan(rest):
            if len(unit) == 1 and unit[0].restore is None:
                returns[unit[0].num] = self._run_alone(unit[0])
            else:
                returns.update(self._run_population(unit))
        return [returns[job.num] for job in jobs]

    def _job(self, num: int, overrides: list[str]) -> _Job:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        task_cfg = copy.deepcopy(config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        return _Job(num, overrides, config, task_cfg)

    def _plan(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Populations of jobs with one population key (at most max_members each), and jobs that run
        alone, in the order of their first job."""
        from echo.config import ConfigError, validate
        from echo.population import population_key, why_not_stackable

        open_units: dict[str, list[_Job]] = {}  # the population being filled, per key
        units: list[list[_Job]] = []
        for job in jobs:
            HydraConfig.instance().set_config(job.config)
            try:
                validate(job.task_cfg)
            except ConfigError as error:
                print(f"echo: bad config: job #{job.num} ({' '.join(job.overrides)}): {error}", file=sys.stderr)
                sys.exit(2)
            if (reason := why_not_stackable(job.task_cfg)) is not None:
                print(f"echo: population: job #{job.num} ({_said(job)}) runs on its own: {reason}", file=sys.stderr)
                units.append([job])
                continue
            key = population_key(job.task_cfg)
            unit = open_units.get(key)
            if unit is None or len(unit) >= self.max_members:
                unit = open_units[key] = []
                units.append(unit)
            unit.append(job)
        return units

    def _continue(self, jobs: list[_Job], returns: dict[int, JobReturn]) -> tuple[list[list[_Job]], list[_Job]]:
        """A continued sweep's jobs (echo/continuation.py): kept ones answered in `returns`; members that
        resume from checkpoints saved together as populations again; and the jobs left to plan."""
        from echo.checkpoints import RESUMED_FROM, download_checkpoint
        from echo.continuation import continued_parent, decide
        from echo.population import CHECKPOINT, population_key, restored_together
        from echo.reuse import read_weights_only

        parent, units, rest, groups = continued_parent(), [], [], {}
        for job in jobs:
            HydraConfig.instance().set_config(job.config)
            decision = decide(parent, job.task_cfg)
            if line := decision.line(f"#{job.num} ({_said(job)})"):
                print(line, file=sys.stderr)
            if decision.action == "keep":
                returns[job.num] = self._returned(job, decision.run.data.metrics)
            elif decision.action == "resume" and decision.checkpoint == CHECKPOINT:
                path = download_checkpoint(decision.run_id, job.task_cfg)
                job.restore = read_weights_only(path, f"run {decision.run_id}'s checkpoints/{CHECKPOINT}")
                key = (population_key(job.task_cfg), restored_together(job.restore))  # before its own `resume`
                with open_dict(job.task_cfg):
                    job.task_cfg.resume = decision.run_id
                job.tags = {RESUMED_FROM: decision.run_id}
                groups.setdefault(key, []).append(job)
            elif decision.action == "resume":  # a Lightning checkpoint: run.py resumes it
                units.append([job])
            else:
                job.tags = decision.tags()
                rest.append(job)
        for group in groups.values():
            units += [group[i : i + self.max_members] for i in range(0, len(group), self.max_members)]
        return units, rest

    def _returned(self, job: _Job, metrics: dict) -> JobReturn:
        """The job's return to the sweeper: its objective from `metrics`."""
        from echo.sweeps import objective_value

        result = JobReturn(
            overrides=job.overrides,
            cfg=job.task_cfg,
            hydra_cfg=job.config,
            working_dir=os.getcwd(),
            task_name=job.config.hydra.job.name,
            status=JobStatus.COMPLETED,
        )
        result.return_value = objective_value(metrics, job.task_cfg.get("objective", "val/exact_match"))
        return result

    def _run_alone(self, job: _Job) -> JobReturn:
        """As the basic launcher runs a job: run.py's task function, in this process."""
        log.info(f"\t#{job.num} : {' '.join(filter_overrides(job.overrides))}")
        result = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=job.config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return result

    def _run_population(self, jobs: list[_Job]) -> dict[int, JobReturn]:
        from echo.logger import Member
        from echo.policy import cpu_threads, resolve_threads
        from echo.population import train_population
        from echo.sweeps import job_name_and_tags

        threads = cpu_threads(jobs[0].task_cfg, members=len(jobs))
        members = []
        for job in jobs:
            HydraConfig.instance().set_config(job.config)
            resolve_threads(job.task_cfg)  # each run records an independent run's count
            name, tags = job_name_and_tags(job.config.hydra, job.task_cfg)
            members.append(Member(job.task_cfg, name, {**tags, **job.tags}))
        population_id = f"{Path(str(self.config.hydra.sweep.dir)).name}-{jobs[0].num}" if len(jobs) > 1 else None
        restore = [job.restore for job in jobs] if jobs[0].restore is not None else None
        said = f"#{', #'.join(str(j.num) for j in jobs)} ({'; '.join(_said(j) for j in jobs)})"
        if population_id is None:
            what = f"job {said} continues alone"
        else:
            what = f"population {population_id}: jobs {said} {'continue' if restore else 'train'} as one stacked model"
        print(f"echo: {what}, {threads} thread(s)", file=sys.stderr)
        try:
            train_population(members, population_id, threads, restore)
        except KeyboardInterrupt:
            print("echo: population interrupted: its runs ended KILLED", file=sys.stderr)
            sys.exit(1)
        # a diverged member scores worst and the sweep goes on, as for a failed job
        return {
            job.num: self._returned(job, member.summary if member.status == "FINISHED" else {})
            for job, member in zip(jobs, members)
        }


def _said(job: _Job) -> str:
    return " ".join(filter_overrides(job.overrides)) or "defaults"
