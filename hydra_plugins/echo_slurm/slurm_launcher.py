"""`hydra/launcher=slurm`: Hydra's submitit launcher, where a job that ends without returning stops the
sweep (submitit alone waits forever without accounting) and a continued sweep submits only its
unfinished jobs (docs/sweeps-and-clusters.md#a-sweep-that-stopped)."""

from __future__ import annotations

import sys

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
except ImportError:  # pip install -e ".[submitit]"
    SubmititSlurmLauncher = object


class SlurmLauncher(SubmititSlurmLauncher):
    numbers: dict[int, int] = {}  # the number each submitted job has in the sweep, by its number in the submission

    def launch(self, job_overrides, initial_job_idx):
        from echo.compat import end_slurm_jobs_without_a_result

        kept = self._kept(job_overrides, initial_job_idx)
        rest = [i for i in range(len(job_overrides)) if i not in kept]
        self.numbers = {initial_job_idx + n: initial_job_idx + i for n, i in enumerate(rest)}

        def ended(job) -> JobReturn:  # submitit numbers a job array's tasks as submitted, from 0
            i = rest[int(job.job_id.partition("_")[2] or 0)]
            why = f"echo: job #{initial_job_idx + i} (SLURM job {job.job_id}) ended {job.state} before it returned"
            return JobReturn(overrides=list(job_overrides[i]), status=JobStatus.FAILED, _return_value=SystemExit(why))

        end_slurm_jobs_without_a_result(ended)
        returns = iter(super().launch([job_overrides[i] for i in rest], initial_job_idx) if rest else [])
        return [kept[i] if i in kept else next(returns) for i in range(len(job_overrides))]

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        """The job, in its SLURM job: run as the job of its number in the sweep."""
        return super().__call__(sweep_overrides, job_dir_key, self.numbers[job_num], job_id, singleton_state)

    def _kept(self, job_overrides, initial_job_idx) -> dict[int, JobReturn]:
        """A continued sweep's jobs that finished before (echo.continuation.decide), answered from their runs."""
        from echo.continuation import continued_parent, decide
        from echo.sweeps import objective_value

        kept, parent = {}, continued_parent()
        for i, overrides in enumerate(job_overrides if parent else []):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            decision = decide(parent, OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
            if decision.action == "keep":
                print(decision.line(f"#{initial_job_idx + i}"), file=sys.stderr)
                value = objective_value(decision.run.data.metrics, config.get("objective", "val/exact_match"))
                kept[i] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)
        return kept
