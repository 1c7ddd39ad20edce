"""Real servers on loopback for tests: PostgreSQL (installed from Debian when missing, as root)
and `mlflow server` on a PostgreSQL backend, which a test may stop and restart. Shared by the
sweeper's tests and the MNIST app's (its conftest imports these fixtures).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, server: subprocess.Popen, output, timeout: float = 180) -> None:
    """Block until `url` answers; fail with the server's output if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            pytest.fail(f"the server exited:\n{output()}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout:.0f} s")
            time.sleep(1)


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _install_postgres() -> Path:
    pg_bin = _postgres_bin()
    if pg_bin is None and os.geteuid() == 0 and shutil.which("apt-get"):
        # waits for another installer (the Slurm fixture's, in another pytest-xdist worker)
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-qq"]
        subprocess.run([*apt, "update"], check=True, capture_output=True)
        subprocess.run(
            [*apt, "install", "-y", "postgresql"],
            check=True,
            capture_output=True,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        pg_bin = _postgres_bin()
    if pg_bin is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (needs root)")
    return pg_bin


class PostgresServer:
    """A PostgreSQL server of its own on loopback (installed from Debian if missing), which a
    test may stop as a crash would (`pg_ctl -m immediate`) and start again on the same port."""

    def __init__(self) -> None:
        self.bin = _install_postgres()
        # its own folder outside pytest's root-only tmp tree: the server runs as user postgres
        self.folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        self.pg(f"{self.bin}/initdb", "-D", f"{self.folder}/data", "-A", "trust", "-U", "postgres")
        self.start()

    def pg(self, *command: str) -> None:
        line = " ".join(command)
        argv = ["su", "postgres", "-c", line] if self.as_postgres else ["bash", "-c", line]
        subprocess.run(argv, check=True, capture_output=True)

    def start(self) -> None:
        self.pg(
            f"{self.bin}/pg_ctl", "-D", f"{self.folder}/data", "-w", "-l", f"{self.folder}/log",
            "-o", f"'-p {self.port} -k {self.folder} -h 127.0.0.1'", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`immediate`: every backend killed, no checkpoint; what a crash or failover does."""
        self.pg(f"{self.bin}/pg_ctl", "-D", f"{self.folder}/data", "-m", mode, "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on loopback for the session (installed from Debian if missing)."""
    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.remove()


@pytest.fixture
def stoppable_postgres():
    """A PostgreSQL server of this test's own, which it may stop and start."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.remove()


def create_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as connection:
        connection.execute(f'create database "{name}"')
    return f"{server_url}/{name}"


class MlflowServer:
    """`mlflow server` on loopback (its backend: a PostgreSQL database or a SQLite file), which a
    test may stop and restart; `with MlflowServer(...) as server:` starts it and stops it."""

    def __init__(self, backend: str, folder: Path) -> None:
        self.backend, self.folder = backend, folder
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log_path = self.folder / "mlflow-server.log"
        with open(log_path, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", str(self.folder / "artifacts"),
                 "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1], "--workers", "2"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                # no background job runners: they cost minutes of start-up and are not used here
                env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                         MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            )  # fmt: skip
        wait_for_http(f"{self.url}/health", self.process, lambda: log_path.read_text())

    def stop(self) -> None:
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture
def stoppable_mlflow_server(postgres, tmp_path):
    """An MlflowServer, started; stopped even if the test fails."""
    database = create_database(postgres, f"mlflow_{tmp_path.name}".lower()[:60])
    with MlflowServer(database, tmp_path) as server:
        yield server


@pytest.fixture
def mlflow_server(stoppable_mlflow_server):
    """The URL of `mlflow server` on loopback with a PostgreSQL backend."""
    return stoppable_mlflow_server.url
