"""The toy app's sweep in a folder of its own, and the lifecycle invariant read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

TOY = Path(__file__).parent / "toy_app"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class ToySweep:
    """The toy app's sweep in a folder of its own, run as a user would."""

    def __init__(self, path: Path, storage: str | None = None) -> None:
        self.path = path
        self.storage = storage or f"sqlite:///{path}/optuna.db"
        self.tracking_uri = f"sqlite:///{path}/mlflow.db"
        self._opened: optuna.storages.RDBStorage | None = None

    def opened_storage(self) -> optuna.storages.RDBStorage:
        """One storage (one connection pool) for all reads of this test; `close` releases it."""
        if self._opened is None:
            self._opened = optuna.storages.RDBStorage(self.storage)
        return self._opened

    def close(self) -> None:
        """Close the pooled connections (a PostgreSQL one left open warns when collected)."""
        if self._opened is not None:
            self._opened.remove_session()
            self._opened.engine.dispose()
            self._opened = None

    def command(self, *overrides: str) -> list[str]:
        return [
            sys.executable,
            str(TOY / "curve_app.py"),
            "-m",
            f"hydra.sweep.dir={self.path}/multirun",
            f"hydra.sweeper.storage={self.storage}",
            f"hydra.sweeper.tracking_uri={self.tracking_uri}",
            "hydra.sweeper.experiment_name=toy",
            "+hydra.sweeper.publish._target_=publish.publish",
            "hydra.sweeper.registry.model=model",
            "hydra.sweeper.registry.name=toy-model",
            "hydra.sweeper.registry.metric=score",
            "hydra.sweeper.registry.direction=maximize",
            "hydra.sweeper.n_trials=3",
            "epochs=3",
            *overrides,
        ]

    def env(self, **extra: str) -> dict[str, str]:
        path = f"{TOY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"  # the publish hook
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_"))}
        return dict(env, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)

    def run(self, *overrides: str, timeout: float = 300, **env: str):
        return subprocess.run(
            self.command(*overrides),
            cwd=self.path,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *overrides: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*overrides),
            cwd=self.path,
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def study(self) -> optuna.Study:
        return self.study_named("toy")

    def study_named(self, name: str) -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.opened_storage())

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def runs(self):
        client = self.client()
        experiment = client.get_experiment_by_name("toy")
        return client.search_runs([experiment.experiment_id], max_results=1000)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def check_invariant(toy: ToySweep, n_trials: int = 3, ends: int = 1) -> None:
    """The promise of the README's "whatever dies" section, read back from both stores."""
    study = toy.study()
    trials = study.get_trials()
    assert [t for t in trials if t.state == TrialState.RUNNING] == []
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert optuna.get_all_study_names(toy.opened_storage()) == ["toy"]  # no helper studies
    runs = toy.runs()
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_id = {r.info.run_id: r for r in runs}
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": ("FAILED", "KILLED")}
    for trial in trials:
        run = by_id.get(trial.user_attrs.get("mlflow_run_id"))
        if run is None:  # killed before its run existed
            assert trial.state == TrialState.FAIL
            continue
        assert run.data.tags["optuna.state"] == trial.state.name, trial.number
        assert run.info.status in expected[trial.state.name], (trial.number, run.info.status)
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    best = [r for r in runs if r.data.tags.get("best_run") == "true"]
    assert len(best) == 1
    assert best[0].info.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    client = toy.client()
    versions = client.search_model_versions("name='toy-model'")
    assert len(versions) == ends, [v.version for v in versions]  # each end ran exactly once
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.run_id == best[0].info.run_id
    if ends == 1:
        assert str(client.get_model_version_by_alias("toy-model", "champion").version) == "1"
    attrs = study._storage.get_study_system_attrs(study._study_id)
    claims = {k: v for k, v in attrs.items() if k.startswith("mlflow_optuna.end.")}
    assert [c["state"] for c in claims.values()] == ["done"] * ends
