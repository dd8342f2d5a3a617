"""SLURM: which job a run is (tags), and a requeued job continuing its own run by itself
(docs/clusters.md)."""

from __future__ import annotations

import os
import socket
import sys

SLURM_JOB_TAG = "echo.slurm_job_id"
SLURM_NODE_TAG = "echo.slurm_node"


def slurm_job_id() -> str | None:
    """This process's SLURM job id as `squeue` shows it, or None outside SLURM."""
    if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_tags() -> dict[str, str]:
    job = slurm_job_id()
    if job is None:
        return {}
    return {SLURM_JOB_TAG: job, SLURM_NODE_TAG: os.environ.get("SLURMD_NODENAME") or socket.gethostname()}


def restart_count() -> int:
    """How many times SLURM has rerun this job (0 on its first run, or outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def requeued_from(experiment: str, run_name: str) -> str | None:
    """In a rerun of a requeued SLURM job: the run id of its last attempt if that left a checkpoint, else
    None; exits (0) if that attempt had finished its run."""
    job = slurm_job_id()
    if job is None or restart_count() == 0:
        return None
    from echo.checkpoints import FOLDER
    from echo.tracking import mlflow_client, tracking_uri

    client = mlflow_client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    name = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`{SLURM_JOB_TAG}` = '{job}' and attributes.run_name = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    last = runs[0]
    if last.info.status == "RUNNING":  # its attempt was killed before it could say so
        client.set_terminated(last.info.run_id, "KILLED")
    if last.info.status == "FINISHED":
        # SLURM's time-limit signal can come after the work was done, and submitit requeues the job all the same.
        print(f"echo: SLURM job {job} restarted, but its run {last.info.run_id} had finished", file=sys.stderr)
        sys.exit(0)
    if "last.ckpt" not in {os.path.basename(a.path) for a in client.list_artifacts(last.info.run_id, FOLDER)}:
        print(
            f"echo: SLURM job {job} restarted (restart {restart_count()}); its last run {last.info.run_id} "
            f"({last.info.status}) left no checkpoint in {tracking_uri()}: starting over",
            file=sys.stderr,
        )
        return None
    print(f"echo: SLURM job {job} restarted; continuing run {last.info.run_id} from its checkpoint", file=sys.stderr)
    return last.info.run_id
