"""Where a run came from: the code version (git), the command, the packages and the machine.

Plain standard library (no torch, no mlflow): the tracking worker collects these facts in its own
process, next to training rather than in its way, and a process loading a stored network compares
its own code version with the run's.
"""

from __future__ import annotations

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

# Tags: MLflow's own where they exist (its UI shows them as Source and Created by), else echo's.
SOURCE_NAME, SOURCE_TYPE, GIT_COMMIT, USER = (
    "mlflow.source.name",
    "mlflow.source.type",
    "mlflow.source.git.commit",
    "mlflow.user",
)
COMMAND, GIT_DIRTY, DIFF_ARTIFACT = "echo.command", "echo.git_dirty", "git_diff.patch"


def _git(repo: Path, *args: str) -> str | None:
    """`git <args>` in `repo`: its output, or None if git or the repository is not there."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=30, errors="replace", check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout


def git_state(repo: Path = CODE) -> dict | None:
    """{"root", "commit", "dirty", "diff"} of the git checkout holding `repo`, or None if it is not one.

    Dirty means a tracked file differs from the commit or a file git does not ignore is untracked;
    `diff` is then `git diff HEAD` and the list of untracked files, at most DIFF_LIMIT characters."""
    top = _git(repo, "rev-parse", "--show-toplevel", "HEAD")
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


def checkout_commit() -> str | None:
    """The commit of the checkout this echo runs from (None when it is not a git checkout)."""
    state = _git(CODE, "rev-parse", "HEAD")
    return state.strip() if state else None


def versions() -> dict[str, str]:
    """Python's and the main packages' versions, read from their metadata (nothing imported)."""
    found = {"python": platform.python_version()}
    for key, distribution in PACKAGES.items():
        try:
            found[key] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[key] = "not installed"
    return found


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def command_line(argv: list[str]) -> str:
    """The command as typed: `python run.py model=encdec ...`."""
    return shlex.join(["python", *argv])


def source_tags(argv: list[str], repo: Path = CODE) -> tuple[dict[str, str], str]:
    """The tags that say where a run of `argv` (its sys.argv) came from, and the diff of a dirty
    tree ("" when clean). The source is the script, relative to the checkout when it is in it."""
    script = Path(argv[0]).resolve() if argv and argv[0] else None
    state = git_state(repo)
    name = str(argv[0]) if argv else "python"
    if script is not None and state is not None and script.is_relative_to(state["root"]):
        name = str(script.relative_to(state["root"]))
    tags = {SOURCE_NAME: name, SOURCE_TYPE: "LOCAL", USER: _user(), COMMAND: command_line(argv)}
    if state is not None:
        tags |= {GIT_COMMIT: state["commit"], GIT_DIRTY: str(state["dirty"]).lower()}
    tags |= {f"echo.version.{key}": value for key, value in versions().items()}
    tags |= {"echo.device.cpu": cpu_model(), "echo.device.cores": str(cores()), "echo.host": platform.node()}
    return tags, state["diff"] if state else ""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def code_version_note(run_id: str, tags: dict[str, str]) -> str | None:
    """One line when the run's code version is not this checkout's (None when they agree or this is
    not a git checkout): the network still loads if its shapes match."""
    here = checkout_commit()
    if here is None:
        return None
    made = tags.get(GIT_COMMIT)
    if made is None:
        return f"echo: run {run_id} records no code version; this checkout is {here[:12]}"
    dirty = " with uncommitted changes (its git_diff.patch)" if tags.get(GIT_DIRTY) == "true" else ""
    if made != here:
        return f"echo: run {run_id} was made by commit {made[:12]}{dirty}; this checkout is {here[:12]}"
    if dirty:
        return f"echo: run {run_id} was made from commit {made[:12]}{dirty}"
    return None
