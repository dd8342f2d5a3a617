"""Where a run came from: the code version (git), the command, the packages and the machine.
Standard library only: the tracking worker collects these in its own process, off training's way."""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import os
import platform
import shlex
import subprocess
from pathlib import Path

CODE = Path(__file__).resolve().parents[2]  # the checkout that holds this echo package (when it is one)
DIFF_LIMIT = 1_000_000  # characters of `git diff` kept as the run's git_diff.patch
PACKAGES = {"torch": "torch", "pytorch_lightning": "pytorch-lightning", "hydra": "hydra-core", "mlflow": "mlflow"}

GIT_COMMIT, GIT_DIRTY, DIFF_ARTIFACT = "mlflow.source.git.commit", "echo.git_dirty", "git_diff.patch"


def _git(repo: Path, *args: str) -> str | None:
    """`git <args>` in `repo`: its output, or None if git or the repository is not there."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, errors="replace", check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def git_state() -> dict | None:
    """{"root", "commit", "dirty", "diff"} of the git checkout holding this echo, or None if it is not one.
    Untracked files make it dirty too, and are listed after `git diff HEAD` in `diff`."""
    top = _git(CODE, "rev-parse", "--show-toplevel", "HEAD")
    if top is None or len(top.split()) != 2:
        return None
    root, commit = top.split()
    status = _git(Path(root), "status", "--porcelain") or ""
    state = {"root": root, "commit": commit, "dirty": bool(status.strip()), "diff": ""}
    if state["dirty"]:
        diff = _git(Path(root), "diff", "HEAD", "--no-color", "--no-ext-diff") or ""
        untracked = [line[3:] for line in status.splitlines() if line.startswith("??")]
        if untracked:
            diff += "# untracked files (not in the diff above):\n" + "".join(f"#   {name}\n" for name in untracked)
        if len(diff) > DIFF_LIMIT:
            diff = diff[:DIFF_LIMIT] + f"\n# ... cut at {DIFF_LIMIT} of {len(diff)} characters\n"
        state["diff"] = diff
    return state


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def source_tags(argv: list[str]) -> tuple[dict[str, str], str]:
    """The tags that say where a run of `argv` (its sys.argv) came from, MLflow's own where they exist
    (its UI shows them), and the diff of a dirty tree ("" when clean)."""
    script = Path(argv[0]).resolve() if argv and argv[0] else None
    state = git_state()
    name = str(argv[0]) if argv else "python"
    if script is not None and state is not None and script.is_relative_to(state["root"]):
        name = str(script.relative_to(state["root"]))  # the script, relative to the checkout when in it
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL", "mlflow.user": user}
    tags["echo.command"] = shlex.join(["python", *argv])  # as typed
    if state is not None:
        tags |= {GIT_COMMIT: state["commit"], GIT_DIRTY: str(state["dirty"]).lower()}
    tags["echo.version.python"] = platform.python_version()
    for key, distribution in PACKAGES.items():  # from their metadata: nothing imported
        try:
            tags[f"echo.version.{key}"] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            tags[f"echo.version.{key}"] = "not installed"
    tags |= {"echo.device.cpu": cpu_model(), "echo.device.cores": str(cores()), "echo.host": platform.node()}
    return tags, state["diff"] if state else ""


def code_version_note(run_id: str, tags: dict[str, str]) -> str | None:
    """One line when the run's code version is not this checkout's (None when they agree or this is
    not a git checkout)."""
    here = _git(CODE, "rev-parse", "HEAD")
    if not here:
        return None
    here = here.strip()
    made = tags.get(GIT_COMMIT)
    if made is None:
        return f"echo: run {run_id} records no code version; this checkout is {here[:12]}"
    dirty = " with uncommitted changes (its git_diff.patch)" if tags.get(GIT_DIRTY) == "true" else ""
    if made != here:
        return f"echo: run {run_id} was made by commit {made[:12]}{dirty}; this checkout is {here[:12]}"
    if dirty:
        return f"echo: run {run_id} was made from commit {made[:12]}{dirty}"
    return None
