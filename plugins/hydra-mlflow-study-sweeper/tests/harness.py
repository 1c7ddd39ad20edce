"""The sweeper's tests' one harness: a toy app's sweep in a folder of its own, run in this
process (`run`) or as a process of its own (`spawn`, `popen`: for what must die or be signalled),
and both stores read back; the lifecycle invariant.

The toy apps (apps/) need no torch: app.py is the README's sphere, curve_app.py adds switches
for per-epoch reports, failures, several objectives and checkpoints, publish.py a publish hook.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.singleton import Singleton
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from mlflow_study_sweeper.storage import optuna_internals

APPS = Path(__file__).resolve().parent / "apps"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# the curve app's publish hook and its registry settings (the toy fixture's sweeps)
PUBLISHING = [
    "+hydra.sweeper.publish._target_=publish.publish",
    "hydra.sweeper.registry.model=model",
    "hydra.sweeper.registry.name=toy-model",
    "hydra.sweeper.registry.metric=score",
    "hydra.sweeper.registry.direction=maximize",
]


@dataclass
class Result:
    """What a sweep command left: as subprocess.CompletedProcess has it."""

    returncode: int
    stdout: str
    stderr: str


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the variables a sweep reads (or leaves behind)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_", "HYDRA_"))}
    # the publish hook; two cores: toy jobs beside each other need one thread each
    path = f"{APPS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return (
        env | {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"} | (extra or {})
    )


def run_in_process(argv: list[str], cwd: Path, env: dict[str, str]) -> Result:
    """`python <argv>` in this process: Hydra's main, the sweep, its end; every global the
    command changes (environment, working directory, argv, logging, Hydra's singletons) is
    restored afterwards. Seconds of imports cheaper than a process per sweep."""
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_path = list(sys.path)
    singletons = Singleton.get_state()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = list(argv)
    sys.path.insert(0, str(Path(argv[0]).parent))
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as exit_:
                code = (
                    exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                )
    finally:
        GlobalHydra.instance().clear()
        Singleton.set_state(singletons)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        mlflow.set_tracking_uri("")  # the sweep set its own
        for handler in list(logging.root.handlers):  # Hydra's, writing to the captured streams
            logging.root.removeHandler(handler)
            handler.close()
    return Result(code, out.getvalue(), err.getvalue())


class ToyApp:
    """One sweep folder of a toy app: its command, its stores, what they hold."""

    def __init__(
        self,
        path: Path,
        app: str = "app.py",
        storage: str | None = None,
        defaults: tuple[str, ...] = (),
    ) -> None:
        self.path = path
        self.app = app
        self.storage = storage or f"sqlite:///{path}/optuna.db"
        self.tracking_uri = f"sqlite:///{path}/mlflow.db"
        self.sweep_dir = path / "multirun"
        self.defaults = list(defaults)  # overrides every command of this folder starts with
        self._opened: optuna.storages.RDBStorage | None = None

    # -- running it --
    def argv(self, *overrides: str) -> list[str]:
        return [
            str(APPS / self.app),
            "-m",
            f"hydra.sweep.dir={self.sweep_dir}",
            f"hydra.sweeper.storage={self.storage}",
            f"hydra.sweeper.tracking_uri={self.tracking_uri}",
            *self.defaults,
            *overrides,  # last, so that a test's override wins
        ]

    def command(self, *overrides: str) -> list[str]:
        """The sweep's command line, for a test that starts the process itself."""
        return [sys.executable, *self.argv(*overrides)]

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(extra)

    def run(self, *overrides: str, env: dict[str, str] | None = None) -> Result:
        """The sweep, in this process."""
        return run_in_process(self.argv(*overrides), self.path, clean_env(env))

    def spawn(
        self, *overrides: str, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """The sweep as a process of its own (to be killed at a fault point, say)."""
        return subprocess.run(
            [sys.executable, *self.argv(*overrides)],
            cwd=self.path,
            env=clean_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def popen(self, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *self.argv(*overrides)],
            cwd=self.path,
            env=clean_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # -- reading it back --
    def opened_storage(self) -> optuna.storages.BaseStorage:
        """One storage (one connection pool) for all reads of this test; `close` releases it."""
        if self._opened is None and self.storage.endswith(".journal"):
            backend = optuna.storages.journal.JournalFileBackend(self.storage)
            self._opened = optuna.storages.JournalStorage(backend)
        elif self._opened is None:
            self._opened = optuna.storages.RDBStorage(self.storage)
        return self._opened

    def close(self) -> None:
        """Close the pooled connections (a PostgreSQL one left open warns when collected)."""
        if isinstance(self._opened, optuna.storages.RDBStorage):
            self._opened.remove_session()
            self._opened.engine.dispose()
        self._opened = None

    def study(self, name: str = "toy") -> optuna.Study:
        return optuna.load_study(study_name=name, storage=self.opened_storage())

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def all_runs(self) -> list:
        client = self.client()
        ids = [e.experiment_id for e in client.search_experiments()]
        return client.search_runs(ids, max_results=1000)

    def runs(self) -> tuple[list, list]:
        """(parent runs, trial runs) across the store's experiments."""
        runs = self.all_runs()
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
        children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
        return parents, children

    def results(self) -> dict:
        return yaml.safe_load((self.sweep_dir / "optimization_results.yaml").read_text())


def toy_app(path: Path, storage: str | None = None) -> ToyApp:
    """The curve app in experiment `toy`, 3 trials of 3 epochs, publishing its best model as
    `toy-model`: the sweep check_invariant reads back."""
    path.mkdir(parents=True, exist_ok=True)
    return ToyApp(
        path,
        "curve_app.py",
        storage=storage,
        defaults=(
            "hydra.sweeper.experiment_name=toy",
            *PUBLISHING,
            "hydra.sweeper.n_trials=3",
            "epochs=3",
        ),
    )


def ok(proc: Result | subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]


def error_lines(proc: Result | subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("Error:")]


def by_number(children) -> dict:
    return {int(r.data.tags["optuna.trial_number"]): r for r in children}


def check_invariant(
    toy: ToyApp, n_trials: int = 3, ends: int = 1, study_name: str = "toy", model: str = "toy-model"
) -> None:
    """The promise of the README's "whatever dies" section, read back from both stores (the
    MNIST app's tests pass its study and model names)."""
    study = toy.study(study_name)
    trials = study.get_trials()
    assert [t for t in trials if t.state == TrialState.RUNNING] == []
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert optuna.get_all_study_names(toy.opened_storage()) == [study_name]  # no helper studies
    runs = toy.all_runs()
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
    # every trial run, those no trial records included (a worker killed between creating its
    # run and recording it), agrees with the trial of its number
    states = {str(t.number): t.state.name for t in trials}
    for run in runs:
        tags = run.data.tags
        if tags.get("sweep.role") == "trial" and tags.get("optuna.study_name") == study.study_name:
            number = tags["optuna.trial_number"]
            assert tags["optuna.state"] == states[number], (number, run.info.run_id)
    best = [r for r in runs if r.data.tags.get("best_run") == "true"]
    assert len(best) == 1
    assert best[0].info.run_id == study.best_trial.user_attrs["mlflow_run_id"]
    client = toy.client()
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == ends, [v.version for v in versions]  # each end ran exactly once
    newest = max(versions, key=lambda v: int(v.version))
    assert newest.run_id == best[0].info.run_id
    if ends == 1:
        assert str(client.get_model_version_by_alias(model, "champion").version) == "1"
    attrs = optuna_internals.study_system_attrs(study)
    claims = {k: v for k, v in attrs.items() if k.startswith("mlflow_optuna.end.")}
    assert [c["state"] for c in claims.values()] == ["done"] * ends
