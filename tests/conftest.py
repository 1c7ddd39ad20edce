"""Fixtures: generated MNIST files and a sweep folder (mnist_sweep.py); the real servers
(PostgreSQL, `mlflow server`) and the Slurm cluster are the sweeper's test fixtures, shared."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_mnist import write_mnist
from mnist_sweep import SweepDir  # (it puts the sweeper's tests' folder on sys.path)
from servers import (  # noqa: F401 (fixtures)
    mlflow_server,
    postgres,
    stoppable_mlflow_server,
    stoppable_postgres,
)
from slurm_cluster import slurm, slurm_cluster  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    return write_mnist(tmp_path_factory.mktemp("mnist"))


@pytest.fixture
def sweep(tmp_path, mnist_root) -> SweepDir:
    return SweepDir(tmp_path, mnist_root)
