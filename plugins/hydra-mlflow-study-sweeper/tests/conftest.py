"""Fixtures: toy apps' sweep folders (stores made where a sweep would make them), real servers,
a Slurm cluster."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import ToyApp, toy_app
from mlflow.tracking import MlflowClient
from servers import (  # noqa: F401 (fixtures)
    mlflow_server,
    postgres,
    stoppable_mlflow_server,
    stoppable_postgres,
)
from slurm_cluster import slurm, slurm_cluster  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow store with its tables made (what a first sweep in a folder makes)."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sphere(tmp_path, empty_mlflow_store) -> ToyApp:
    """The README's app (apps/app.py: x**2 + y**2, logs nothing itself) in tmp_path."""
    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")
    app = ToyApp(tmp_path, "app.py")
    yield app
    app.close()


@pytest.fixture
def curve(sphere) -> ToyApp:
    """The same folder with curve_app.py: per-epoch reports, failures, objectives by switch."""
    sphere.app = "curve_app.py"
    return sphere


@pytest.fixture
def toy(tmp_path, empty_mlflow_store) -> ToyApp:
    """The curve app in experiment `toy`, 3 trials of 3 epochs, publishing its best model
    as `toy-model` (what the lifecycle invariant checks)."""
    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")
    app = toy_app(tmp_path)
    yield app
    app.close()
