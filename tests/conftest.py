"""Shared fixtures: generated MNIST files, and the real sweep.py run as a subprocess."""

from __future__ import annotations

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

import optuna
import pytest
from fake_mnist import write_mnist
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


class SweepDir:
    """One sweep's working folder: the stores in it, and sweep.py run there as a user would."""

    def __init__(self, path: Path, mnist_root: Path) -> None:
        self.path = path
        self.mnist_root = mnist_root
        self.tracking_uri = f"sqlite:///{path}/mlflow.db"
        self.storage = f"sqlite:///{path}/optuna.db"
        self.sweep_dir = path / "multirun"

    def command(self, *overrides: str, multirun: bool = True) -> list[str]:
        return [
            sys.executable,
            str(REPO / "sweep.py"),
            *(["-m"] if multirun else []),
            f"data.root={self.mnist_root}",
            "data.val_size=100",
            "trainer.max_epochs=2",
            f"mlflow.tracking_uri={self.tracking_uri}",
            f"hydra.sweeper.storage={self.storage}",
            f"hydra.sweep.dir={self.sweep_dir}",
            f"hydra.run.dir={self.path}/outputs",
            *overrides,
        ]

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # two cores: keep torch from oversubscribing them when tests run beside each other
        # and none of this process's MLflow settings (mlflow.set_tracking_uri exports one)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_"))}
        return dict(env, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1", **(extra or {}))

    def run(
        self,
        *overrides: str,
        multirun: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ):
        return subprocess.run(
            self.command(*overrides, multirun=multirun),
            cwd=self.path,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*overrides),
            cwd=self.path,
            env=self.env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def runs(self, experiment: str = "mnist-sweep"):
        client = self.client()
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id], max_results=1000) if exp else []

    def study(self, name: str = "mnist-cnn") -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.storage)


@pytest.fixture
def sweep(tmp_path, mnist_root) -> SweepDir:
    return SweepDir(tmp_path, mnist_root)


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow store with its tables made: creating them costs seconds in every sweep."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def toy(tmp_path, empty_mlflow_store):
    """The toy app (tests/toy_app) with its stores in tmp_path (MLflow's tables made)."""
    from toy_sweep import ToySweep

    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")
    toy = ToySweep(tmp_path)
    yield toy
    toy.close()


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )


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


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on loopback for the session (installed from Debian if missing)."""
    pg_bin = _postgres_bin()
    if pg_bin is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "postgresql"],
            check=True,
            capture_output=True,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )
        pg_bin = _postgres_bin()
    if pg_bin is None:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (needs root)")
    # its own folder outside pytest's root-only tmp tree: the server runs as user postgres
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-pg-"))
    as_postgres = os.geteuid() == 0
    if as_postgres:
        shutil.chown(folder, "postgres")

    def pg(*command: str) -> None:
        line = " ".join(command)
        argv = ["su", "postgres", "-c", line] if as_postgres else ["bash", "-c", line]
        subprocess.run(argv, check=True, capture_output=True)

    port = free_port()
    pg(f"{pg_bin}/initdb", "-D", f"{folder}/data", "-A", "trust", "-U", "postgres")
    pg(
        f"{pg_bin}/pg_ctl", "-D", f"{folder}/data", "-w", "-l", f"{folder}/log",
        "-o", f"'-p {port} -k {folder} -h 127.0.0.1'", "start",
    )  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        pg(f"{pg_bin}/pg_ctl", "-D", f"{folder}/data", "-m", "fast", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as connection:
        connection.execute(f'create database "{name}"')
    return f"{server_url}/{name}"


class MlflowServer:
    """`mlflow server` on loopback with a PostgreSQL backend, which a test may stop and restart."""

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


@pytest.fixture
def stoppable_mlflow_server(postgres, tmp_path):
    """An MlflowServer, started; stopped even if the test fails."""
    server = MlflowServer(
        create_database(postgres, f"mlflow_{tmp_path.name}".lower()[:60]), tmp_path
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(stoppable_mlflow_server):
    """The URL of `mlflow server` on loopback with a PostgreSQL backend."""
    return stoppable_mlflow_server.url
