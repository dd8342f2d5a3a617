"""What a run could not write to its tracking store, kept in `./echo-unsent/<run name>.<run id>/`
(this user's alone) to upload later with `python -m echo.upload`: docs/bad-input.md."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = "echo-unsent"
UPLOAD = "python -m echo.upload"


class TrackingError(RuntimeError):
    """A run could not be tracked; the message says what happened and what to do."""

    exit_code = 3


class TrackingStartError(TrackingError):
    """The store could not take the run at its start: nothing was trained."""

    exit_code = 2


class TrackingFailed(TrackingError):
    """The store failed during the run: what it could not write is in a local folder."""


def unreachable(uri: str) -> str | None:
    """Why the tracking server at `uri` cannot be reached (None for a reachable one, or a local store)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5.0):
            return None
    except OSError as error:
        return error.strerror or str(error) or type(error).__name__


def cannot_write(uri: str) -> str | None:
    """Why the SQLite store at `uri` cannot be written, with the fix, in one line (None if it can be, or
    is not SQLite). Checked before the run: MLflow would retry for about 100 s."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    if not path.name or path.name == ":memory:":
        return None
    folder = path.parent  # SQLite writes its journal beside the file; MLflow creates missing folders
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        if path.exists():
            os.close(os.open(path, os.O_RDWR))  # opened for writing, nothing written
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".echo-write-check-")
        os.close(fd)
        os.unlink(probe)
        return None
    except OSError as error:
        why = f"{error.filename if error.filename == str(path) else folder}: {error.strerror or error}"
    fix = "run from a folder you can write, set MLFLOW_TRACKING_URI"
    if os.environ.get("MLFLOW_TRACKING_URI"):
        fix = "set MLFLOW_TRACKING_URI to a store you can write"
    return f"cannot write the tracking store {uri} ({why}): {fix}, or run with logger=none"


def reason(error: BaseException) -> str:
    """An exception in one line."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


class Outbox:
    """The folder keeping one run's unwritten writes: folders 0700, files 0600, never reached through
    a link that was there before (`private_folder`)."""

    def __init__(self, run: dict, why: str, root: str | os.PathLike | None = None):
        suffix = (run.get("run_id") or "")[:8] or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
        safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", run.get("run_name") or "run")[:80] or "run"
        name = f"{safe}.{suffix}"
        self.run, self.why, self.lost = dict(run), why, None
        for base in (Path(root) if root else Path.cwd() / ROOT, Path(tempfile.gettempdir()) / ROOT):
            try:
                self.folder = private_folder(private_folder(Path(os.path.abspath(base))) / name)
                _mkdirs(self.folder / "artifacts")
                self._write_json("run.json", {**self.run, "why": why})
                return
            except OSError as error:  # e.g. the disk is full: try the temporary directory
                self.lost = reason(error)
        self.folder = None

    def _write_json(self, name: str, data) -> None:
        _write(self.folder / name, json.dumps(data, indent=1, default=str))

    def _guard(self, write) -> None:
        if self.folder is None:
            return
        try:
            write()
        except OSError as error:
            self.lost = reason(error)

    def metrics(self, rows: list[tuple[str, float, int, int]]) -> None:
        """(name, value, timestamp_ms, step) rows."""
        if rows:
            text = "".join(json.dumps(list(row)) + "\n" for row in rows)
            self._guard(lambda: _write(self.folder / "metrics.jsonl", text, append=True))

    def _update(self, name: str, values: dict[str, str]) -> None:
        self._guard(lambda: self._write_json(name, {**_read_json(self.folder / name, {}), **values}))

    def tags(self, tags: dict[str, str]) -> None:
        self._update("tags.json", tags)

    def params(self, params: dict[str, str]) -> None:
        """Params sent after the run started (its first ones are in run.json)."""
        self._update("params.json", params)

    def text(self, text: str | bytes, name: str) -> None:
        self._guard(lambda: _write(self.folder / "artifacts" / name, text))

    def figure(self, figure, name: str) -> None:
        image = io.BytesIO()
        figure.savefig(image, format=Path(name).suffix.lstrip(".") or "png")
        self.text(image.getvalue(), name)

    def artifacts(self, folder: str, path: str) -> None:
        self._guard(lambda: _copy_tree(Path(folder), self.folder / "artifacts" / path))

    def end(self, status: str) -> None:
        self._guard(lambda: self._write_json("end.json", {"status": status}))

    def summary(self) -> dict:
        return {"folder": str(self.folder) if self.folder else None, "why": self.why, "lost": self.lost}


def private_folder(path: Path) -> Path:
    """`path` as a folder of this user's alone (0700); where something else is there (a link, another
    user's folder, a file), a new folder beside it instead."""
    try:
        os.mkdir(path, 0o700)
        return path
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():  # not a link: lstat does not follow one
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
        return path
    return Path(tempfile.mkdtemp(prefix=f"{path.name}-", dir=path.parent))  # 0700, a new name


def _mkdirs(path: Path) -> None:
    """`path` and the folders above it, each 0700."""
    if not path.is_dir():
        _mkdirs(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def _open(path: Path, append: bool = False) -> int:
    """A file opened for writing: 0600 if new, never through a link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    return os.open(path, flags, 0o600)


def _write(path: Path, data: str | bytes, append: bool = False) -> None:
    _mkdirs(path.parent)
    with os.fdopen(_open(path, append), "ab" if append else "wb") as file:
        file.write(data.encode() if isinstance(data, str) else data)


def _copy_tree(source: Path, target: Path) -> None:
    """The files under `source` into `target`, with the outbox's modes, not the source's."""
    for folder, _, files in os.walk(source):
        into = target / Path(folder).relative_to(source)
        _mkdirs(into)
        for name in files:
            with open(Path(folder) / name, "rb") as src, os.fdopen(_open(into / name), "wb") as dst:
                shutil.copyfileobj(src, dst)


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def read(folder: str | os.PathLike) -> dict:
    """An outbox folder's contents."""
    folder = Path(folder)
    run = json.loads((folder / "run.json").read_text())
    metrics = []
    if (folder / "metrics.jsonl").exists():
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            if line.strip():
                name, value, ms, step = json.loads(line)
                metrics.append((name, float(value), int(ms), int(step)))
    artifacts = folder / "artifacts"
    return {
        "run": run,
        "metrics": metrics,
        "tags": _read_json(folder / "tags.json", {}),
        "params": _read_json(folder / "params.json", {}),  # those sent after the run started
        "status": _read_json(folder / "end.json", {}).get("status"),
        "artifacts": artifacts if artifacts.is_dir() and any(artifacts.iterdir()) else None,
    }


def outboxes(path: str | os.PathLike) -> list[Path]:
    """The outbox folders at `path`: itself, or those inside it (e.g. ./echo-unsent)."""
    path = Path(path)
    if (path / "run.json").exists():
        return [path]
    return sorted(p for p in path.glob("*") if (p / "run.json").exists()) if path.is_dir() else []


def failed_message(answer: dict, run_name: str, run_id: str | None, uri: str) -> str:
    """The one line a run whose tracking failed ends with."""
    where = f"run '{run_name}'" + (f" ({run_id})" if run_id else "")
    line = f"could not write {where} to {uri} ({answer.get('why')})"
    if answer.get("folder"):
        kept = answer["folder"]
        line += f"; what it could not write is kept in {kept}: upload it with `{UPLOAD} {kept} --to {uri}`"
        if answer.get("lost"):
            line += f" (some could not be kept either: {answer['lost']})"
    else:
        line += f"; it could not be kept locally either ({answer.get('lost')})"
    return line
