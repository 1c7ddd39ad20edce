"""Installed beside hydra-optuna-mlflow-sweeper 0.1.3 (which registers `hydra/sweeper:
mlflow_optuna`, this sweeper's former name), each package's example app gets its own sweeper.

The peer's wheel comes from the package registry once (pip download), then from the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
from harness import APPS, clean_env
from mlflow.tracking import MlflowClient

from mlflow_study_sweeper.databases import CACHE

PEER = "hydra-optuna-mlflow-sweeper==0.1.3"


@pytest.fixture(scope="session")
def peer_on_path() -> str:
    """The peer package, unpacked: a folder to put on PYTHONPATH."""
    folder = CACHE / "peer-hydra-optuna-mlflow-sweeper-0.1.3"
    if not (folder / "hydra_plugins").is_dir():
        wheels = CACHE / "wheels"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), PEER],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, f"pip download {PEER} (needs the registry):\n{proc.stderr}"
        (wheel,) = wheels.glob("hydra_optuna_mlflow_sweeper-0.1.3-*.whl")
        with zipfile.ZipFile(wheel) as unpacked:
            unpacked.extractall(folder)
    return str(folder)


def run(app: Path, folder: Path, peer: str) -> subprocess.CompletedProcess:
    env = clean_env()
    env["PYTHONPATH"] = f"{peer}{os.pathsep}{env['PYTHONPATH']}"
    return subprocess.run(
        [sys.executable, str(app), "-m", f"hydra.sweep.dir={folder}/multirun"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_each_app_gets_its_own_sweeper(tmp_path, peer_on_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()

    proc = run(APPS / "app.py", ours, peer_on_path)  # the README's app: mlflow_study
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Study 'toy' (sqlite:///" in proc.stdout  # this sweeper's first line
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{ours}/optuna.db")
    assert len(study.get_trials()) == 10
    client = MlflowClient(f"sqlite:///{ours}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("app").experiment_id])
    assert [r.info.run_name for r in runs if r.data.tags.get("sweep.role") == "sweep"] == [
        "sweep-toy"
    ]

    proc = run(APPS / "peer" / "quadratic.py", theirs, peer_on_path)  # mlflow_optuna: theirs
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "optuna_config" not in proc.stderr  # the error their users met while both clashed
    assert "Study '" not in proc.stdout
    (name,) = optuna.get_all_study_names(f"sqlite:///{theirs}/peer-optuna.db")
    assert name.startswith("quadratic")  # their sweeper's study, named its way
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{theirs}/peer-optuna.db")
    assert len(trials.get_trials()) == 3
    assert not (theirs / "optuna.db").exists() and not (theirs / "mlflow.db").exists()
