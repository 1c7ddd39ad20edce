"""From the best trial to a served model: MLflow Models, the registry, serving, MLflow Projects."""

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pytest
import torch
from fake_mnist import patterns
from mlflow.tracking import MlflowClient
from mnist_sweep import REPO, assert_ok
from servers import wait_for_http


def digits(n: int = 16) -> tuple[np.ndarray, np.ndarray]:
    # fresh images from the generator's test distribution: raw 0-255 pixels, as clients send
    images, labels = patterns(n, seed=1)
    return images.astype(np.float32), labels.astype(np.int64)


def best_run(sweep):
    (best,) = [r for r in sweep.runs() if r.data.tags.get("best_run") == "true"]
    return best


def test_best_model_is_logged_tested_registered_and_reported(sweep):
    proc = sweep.run("hydra.sweeper.n_trials=2")
    assert_ok(proc)
    best = best_run(sweep)
    (parent,) = [r for r in sweep.runs() if r.data.tags.get("sweep.role") == "sweep"]
    mlflow.set_tracking_uri(sweep.tracking_uri)
    images, labels = digits()
    for uri in (f"runs:/{best.info.run_id}/model", "models:/mnist-cnn@champion"):
        predicted = mlflow.pyfunc.load_model(uri).predict(images)
        assert predicted.shape == (16,)
        assert (predicted == labels).mean() > 0.8  # chance is 0.1
        module = mlflow.pytorch.load_model(uri)
        assert tuple(module(torch.from_numpy(images)).shape) == (16,)
    # the weights are the trial's own: its checkpoint artifact
    client = MlflowClient(sweep.tracking_uri)
    assert [f.path for f in client.list_artifacts(best.info.run_id, "checkpoint")] == [
        "checkpoint/model.pt"
    ]
    info = mlflow.models.get_model_info(f"runs:/{best.info.run_id}/model")
    assert info.signature is not None and info.saved_input_example_info is not None

    assert 0.8 < best.data.metrics["test_acc"] <= 1.0
    assert parent.data.metrics["test_acc"] == best.data.metrics["test_acc"]
    version = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert str(version.version) == "1"
    assert version.tags["optuna.study_name"] == "mnist-cnn"
    assert version.tags["optuna.trial_number"] == best.data.tags["optuna.trial_number"]
    assert version.tags["parent_run_id"] == parent.info.run_id
    assert version.tags["run_id"] == best.info.run_id
    assert "first @champion" in proc.stdout

    report = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    for name in ("optimization_history", "parallel_coordinate", "intermediate_values"):
        assert f"report/{name}.png" in report
    assert "report/sweep_report.html" in report
    # what the autolog example printed, for the best run
    assert f"run_id: {best.info.run_id}" in proc.stdout and "metrics: {" in proc.stdout


def test_champion_moves_only_when_test_accuracy_improves(sweep):
    worse = ("hydra.sweeper.n_trials=1", "trainer.max_epochs=1", "model.lr=1e-7")
    assert_ok(sweep.run(*worse, "hydra.sweeper.study_name=bad"))
    assert_ok(sweep.run("hydra.sweeper.n_trials=1", "hydra.sweeper.study_name=good"))
    third = sweep.run(*worse, "hydra.sweeper.study_name=bad-again")
    assert_ok(third)
    client = MlflowClient(sweep.tracking_uri)
    versions = {str(v.version): v for v in client.search_model_versions("name='mnist-cnn'")}
    assert sorted(versions) == ["1", "2", "3"]
    acc = {k: float(v.tags["test_acc"]) for k, v in versions.items()}
    assert acc["2"] > acc["1"] and acc["2"] > acc["3"]
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "2"
    assert "@champion stays on version 2" in third.stdout


def venv_env(**extra: str) -> dict[str, str]:
    # mlflow starts `uvicorn` and `python` by name: this venv's, as in an activated venv
    path = f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"
    return dict(os.environ, PATH=path, **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_champion_is_served_over_http(sweep):
    assert_ok(sweep.run("hydra.sweeper.n_trials=1"))
    port = free_port()
    env = venv_env(MLFLOW_TRACKING_URI=sweep.tracking_uri)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist-cnn@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=sweep.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_http(
            f"http://127.0.0.1:{port}/ping", server, lambda: server.stdout.read().decode()
        )
        images, labels = digits()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            predictions = np.array(json.load(response)["predictions"])
        assert predictions.shape == (16,)
        assert (predictions == labels).mean() > 0.8
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        server.stdout.close()


@pytest.mark.slow
def test_mlflow_project_runs_the_sweep(sweep):
    env = venv_env(MLFLOW_TRACKING_URI=f"sqlite:///{sweep.path}/projects.db")
    params = {
        "n_trials": "1",
        "max_epochs": "1",
        "study_name": "project",
        "storage": sweep.storage,
        "tracking_uri": sweep.tracking_uri,
        "data_root": str(sweep.mnist_root),
        "val_size": "100",
        "sweep_dir": str(sweep.sweep_dir),
    }
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "sweep"]
    command += ["--env-manager", "local"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    proc = subprocess.run(
        command, cwd=sweep.path, env=env, capture_output=True, text=True, timeout=600
    )
    assert_ok(proc)
    assert len(sweep.study("project").get_trials()) == 1
    assert (sweep.sweep_dir / "project" / "optimization_results.yaml").exists()
    assert not (REPO / "optuna.db").exists()  # nothing written into the project folder
