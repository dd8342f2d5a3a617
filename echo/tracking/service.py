"""A parallel sweep's tracking service: one worker process writing the runs of all its local jobs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile

from echo.tracking.client import SERVICE_ENV, start_worker
from echo.tracking.worker import ANSWER


class TrackingService:
    """`worker.py --serve`, started by the launching process before the jobs (echo/sweeps.py). Jobs find
    it through SERVICE_ENV; one whose directory differs, or that runs elsewhere, starts its own worker."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="echo-tracking-")
        path = os.path.join(self.folder, "socket")
        self.process = start_worker("--serve", path)
        self.socket = None  # once it listens
        try:
            ready = self.process.stdout.readline().strip() == ANSWER + "ready"
        except BaseException:  # Ctrl-C as it starts
            self.process.kill()
            raise
        if ready:
            self.socket = path
            os.environ[SERVICE_ENV] = json.dumps({"socket": path, "cwd": os.getcwd()})
        self.process.stdout.close()

    def kill(self) -> None:
        """Stop it at once (before any job or request connected: it has nothing to write)."""
        self.process.kill()
        self.close()

    def close(self) -> None:
        """No more jobs: it exits once every job's connection has closed (waited for up to 30 s)."""
        os.environ.pop(SERVICE_ENV, None)
        if self.process.stdin.closed:
            return
        self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)
        shutil.rmtree(self.folder, ignore_errors=True)
