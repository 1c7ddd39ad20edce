"""The MNIST app's test harness: sweep.py run as a user runs it, in a folder of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "plugins" / "hydra-mlflow-study-sweeper" / "tests"))
from harness import Result, run_in_process  # noqa: E402 (the sweeper's tests' harness)


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
        self, *overrides: str, multirun: bool = True, env: dict[str, str] | None = None
    ) -> Result:
        """sweep.py in this process (torch, Lightning and MLflow are imported once per test
        worker, not once per sweep); torch's thread count is put back afterwards."""
        import torch

        threads = torch.get_num_threads()
        try:
            return run_in_process(
                self.command(*overrides, multirun=multirun)[1:], self.path, self.env(env)
            )
        finally:
            torch.set_num_threads(threads)

    def spawn(
        self,
        *overrides: str,
        multirun: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """sweep.py as a process of its own, as a user starts it (to kill it, say)."""
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


def assert_ok(proc: Result | subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
