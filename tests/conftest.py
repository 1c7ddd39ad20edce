"""Shared fixtures: generated MNIST files, and the real sweep.py run as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
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

    def env(self) -> dict[str, str]:
        # two cores: keep torch from oversubscribing them when tests run beside each other
        return dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")

    def run(self, *overrides: str, multirun: bool = True, timeout: float = 600):
        return subprocess.run(
            self.command(*overrides, multirun=multirun),
            cwd=self.path,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*overrides),
            cwd=self.path,
            env=self.env(),
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


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
