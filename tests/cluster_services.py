"""Real services for the tests: a one-node SLURM cluster, a throwaway PostgreSQL, a local Ray cluster.

Each is started once per test session by its script in tests/services/ (which CI shares) and
stopped at the end. A test that needs one is marked (`slurm`, `postgres`, `ray`); where the
service cannot be started (not root, no apt-get, a missing package) the test is skipped with the
reason, except under `CI=true`, where it fails: CI runs them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parent / "services"
ROOT = Path(__file__).resolve().parents[1]


def unavailable(reason: str):
    """Skip the test for `reason`; under CI=true fail it instead (CI must run every service test)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: service tests must run)", pytrace=False)
    pytest.skip(reason)


def need_module(name: str, install: str) -> None:
    """The Python module `name`, or skip (fail in CI) saying how to get it."""
    try:
        __import__(name)
    except ImportError:
        unavailable(f"needs {name}: {install}")


class Service:
    """`tests/services/<name>.sh start DIR` now, `stop DIR` later; its KEY=value lines as `env`."""

    def __init__(self, name: str, path_dirs: list[str] | None = None):
        self.name = name
        self.dir = tempfile.mkdtemp(prefix=f"echo-{name}-")  # short: socket paths must stay short
        self.process_env = dict(os.environ)
        if path_dirs:  # e.g. the virtual environment whose `ray` to run
            self.process_env["PATH"] = os.pathsep.join([*path_dirs, self.process_env.get("PATH", "")])
        self.env: dict[str, str] = {}

    def start(self, timeout: float = 600) -> None:
        if sys.platform != "linux":
            unavailable(f"{self.name}: these service scripts run on Linux")
        script = SERVICES / f"{self.name}.sh"
        try:
            result = subprocess.run(
                ["bash", str(script), "start", self.dir],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.process_env,
                cwd=self.dir,  # where a service's own processes (Ray's workers) start
            )
        except subprocess.TimeoutExpired:
            self.stop()
            unavailable(f"{self.name}: `{script.name} start` did not finish in {timeout:g} s")
        if result.returncode != 0:
            self.stop()
            reason = (result.stderr.strip().splitlines() or ["no message"])[-1]
            unavailable(f"{self.name} could not be started ({script.name} exit {result.returncode}): {reason}")
        for line in result.stdout.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.isupper():
                self.env[key] = value

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(SERVICES / f"{self.name}.sh"), "stop", self.dir],
            capture_output=True,
            timeout=120,
            env=self.process_env,
        )
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _slurm_service():
    service = Service("slurm")
    try:
        service.start()
        yield service
    finally:
        service.stop()


@pytest.fixture
def slurm_cluster(_slurm_service, monkeypatch):
    """A one-node SLURM cluster (slurmctld, slurmd, munged of its own): `SLURM_CONF` is set for the
    test, so sbatch, squeue, scontrol and submitit use it; returns its partition."""
    monkeypatch.setenv("SLURM_CONF", _slurm_service.env["SLURM_CONF"])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return _slurm_service.env["SLURM_PARTITION"]


@pytest.fixture(scope="session")
def postgres_database():
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty database `mlflow`: its URI."""
    service = Service("postgres")
    try:
        service.start()
        yield service.env["POSTGRES_URI"]
    finally:
        service.stop()


def fresh_database(server_uri: str) -> str:
    """A new, empty database on the PostgreSQL server of `server_uri`: its URI (one per test)."""
    import uuid

    import psycopg

    name = f"mlflow_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_uri, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_uri.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster started by `ray start --head` (this environment's `ray`): its address. Stopped after
    the module's tests: while it runs, a plain `ray.init()` on this machine would join it."""
    service = Service("ray", path_dirs=[str(Path(sys.executable).parent)])
    try:
        service.start()
        yield service.env["RAY_ADDRESS"]
    finally:
        service.stop()
