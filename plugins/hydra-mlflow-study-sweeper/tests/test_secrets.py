"""No secret in any output: a password in the store URLs stays out of everything a sweep shows,
writes or starts, whether the URLs are typed on the command line or come from the environment.

The sweep runs the toy app with n_jobs=2 against a real PostgreSQL (Optuna storage and MLflow
tracking store), as a role whose password is a string made for this test; afterwards every
output is searched for that string: the console, every file under the sweep's folder (multirun/,
optimization_results.yaml, the MLflow artifacts in ./mlruns, the report), every MLflow
experiment, run, logged model and registered model version, the study's attributes, and the
command line of every process the sweep started (read from /proc while it ran).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import optuna
import psycopg
import pytest
from harness import check_invariant, toy_app
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

N_TRIALS = 4
# the worker lives for seconds: long enough to read its command line while it trains
SWEEP = ("hydra.sweeper.n_jobs=2", f"hydra.sweeper.n_trials={N_TRIALS}", "epoch_seconds=0.5")


@dataclass
class Stores:
    secret: str
    role: str
    optuna: str
    mlflow: str

    @property
    def masked(self) -> str:
        return f"postgresql://{self.role}:***@"


@pytest.fixture
def stores(postgres) -> Stores:
    """A role with a password of its own, owning an Optuna and an MLflow database.

    The server trusts loopback, so the password is never checked: what matters is where the
    string ends up.
    """
    secret = f"Pw{uuid.uuid4().hex}"
    role = f"sweeper_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as connection:
        connection.execute(f"create role {role} login password '{secret}'")
        for store in ("optuna", "mlflow"):
            connection.execute(f"create database {role}_{store} owner {role}")
    host = postgres.split("@", 1)[1]
    base = f"postgresql://{role}:{secret}@{host}"
    return Stores(secret, role, f"{base}/{role}_optuna", f"{base}/{role}_mlflow")


class CommandLines(threading.Thread):
    """The command line of every process below `root`, read from /proc while it runs."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: dict[int, set[tuple[str, ...]]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.snapshot()
            self.done.wait(0.1)

    def stop(self) -> None:
        self.done.set()
        self.join()

    def snapshot(self) -> None:
        parent_of: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:  # the command may hold ')': the fields after the last one are plain
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # it ended
                parent_of[int(entry.name)] = int(stat[1])
        tree, grown = {self.root}, True
        while grown:
            below = {pid for pid, parent in parent_of.items() if parent in tree} - tree
            tree |= below
            grown = bool(below)
        for pid in tree - {self.root}:
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if raw:
                argv = tuple(raw.decode(errors="replace").rstrip("\0").split("\0"))
                self.seen.setdefault(pid, set()).add(argv)


def run_sweep(tmp_path: Path, arguments: dict[str, str], env: dict[str, str], backend: str):
    """The toy sweep with these store arguments; its console and its processes' command lines."""
    toy = toy_app(tmp_path)
    command = [
        arguments.get(a.split("=", 1)[0], a) if a.startswith("hydra.sweeper.") else a
        for a in toy.command(*SWEEP, f"hydra.sweeper.backend={backend}")
    ]
    environment = toy.env(**env)
    if "SWEEP_STORAGE_URL" not in env:  # typed: nothing from the test's own environment
        environment.pop("SWEEP_STORAGE_URL", None)
        environment.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its workers too are stopped if it hangs
    )
    watcher = CommandLines(proc.pid)
    watcher.start()
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        watcher.stop()
    assert proc.returncode == 0, output[-4000:]
    return command, output, watcher.seen


def files_with(folder: Path, secret: str) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and secret.encode() in path.read_bytes():
            found.append(str(path.relative_to(folder)))
    return found


def hydra_records(path: str) -> bool:
    """What Hydra itself writes of the typed command line: .hydra/*.yaml and multirun.yaml."""
    return ".hydra" in Path(path).parts or Path(path).name == "multirun.yaml"


def store_contents(stores: Stores, storage: optuna.storages.BaseStorage) -> tuple[str, int]:
    """Everything the sweep put in MLflow and in the study, as one text; and the run count."""
    client = MlflowClient(stores.mlflow)
    everything: list = []
    runs = 0
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for experiment in experiments:
        everything.append([experiment.name, experiment.artifact_location, experiment.tags])
        ids = [experiment.experiment_id]
        for run in client.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000):
            runs += 1
            everything.append([run.info.run_name, run.info.artifact_uri, run.data.params])
            everything.append([run.data.tags, sorted(run.data.metrics)])
        for model in client.search_logged_models(experiment_ids=ids):
            everything.append([model.name, model.artifact_location, model.params, model.tags])
    for registered in client.search_registered_models():
        everything.append([registered.name, registered.description, registered.tags])
        for version in client.search_model_versions(f"name='{registered.name}'"):
            everything.append([version.source, version.run_link, version.description])
            everything.append(version.tags)
    for name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        everything.append(study.user_attrs)
        everything.append(study._storage.get_study_system_attrs(study._study_id))
        for trial in study.get_trials():
            everything.append([trial.params, trial.user_attrs, trial.system_attrs])
    return json.dumps(everything, default=str), runs


@pytest.mark.parametrize("backend", ["local", "ray"])
@pytest.mark.parametrize("route", ["typed", "environment"])
def test_no_password_in_any_output_of_a_sweep_with_two_workers(tmp_path, stores, route, backend):
    """With Ray, the workers are actors of a Ray instance the sweep starts (its processes are
    the sweep's descendants, watched too), and Ray's own log files are searched as well."""
    secret = stores.secret
    started = time.time()
    if route == "typed":
        arguments = {
            "hydra.sweeper.storage": f"hydra.sweeper.storage={stores.optuna}",
            "hydra.sweeper.tracking_uri": f"hydra.sweeper.tracking_uri={stores.mlflow}",
        }
        env = {}
    else:
        # the toy app's config names a sqlite storage: read the URL from the environment
        # (an app that keeps the sweeper's default storage needs no argument at all);
        # tracking_uri null: the sweeper uses MLFLOW_TRACKING_URI
        arguments = {
            "hydra.sweeper.storage": "hydra.sweeper.storage=${oc.env:SWEEP_STORAGE_URL}",
            "hydra.sweeper.tracking_uri": "hydra.sweeper.tracking_uri=null",
        }
        env = {"SWEEP_STORAGE_URL": stores.optuna, "MLFLOW_TRACKING_URI": stores.mlflow}
    command, output, command_lines = run_sweep(tmp_path, arguments, env, backend)
    assert (secret in " ".join(command)) == (route == "typed")

    # the console: masked where a URL is shown
    assert secret not in output
    assert f"{stores.masked}{stores.optuna.split('@', 1)[1]}" in output  # the study line
    assert f"{stores.masked}{stores.mlflow.split('@', 1)[1]}" in output  # mlflow ui ...
    # the main process and its worker opened the same study (a worker that lost the typed
    # storage URL with its password would open the app's default storage instead)
    # (each of Ray's lines begins with the actor that wrote it)
    studies = re.findall(r"Study 'toy' \((.*?)\):", output)
    workers = 2 if backend == "local" else 3  # Ray's driver trains nothing, prints its own
    assert studies == [stores.masked + stores.optuna.split("@", 1)[1]] * workers, studies

    # worker processes: seen, and without the password on their command lines
    seen = [argv for argvs in command_lines.values() for argv in argvs]
    assert any("hydra.sweeper.n_jobs=1" in argv for argv in seen), command_lines
    for pid, argvs in command_lines.items():
        for argv in argvs:
            if list(argv) == command:
                continue  # forked, not yet exec'd: a copy of the command typed above
            assert secret not in " ".join(argv), (pid, argv)

    # files: multirun/ (trial folders, logs, optimization_results.yaml), ./mlruns (artifacts,
    # the report, the model), anything else the sweep wrote where it ran
    assert (tmp_path / "multirun" / "optimization_results.yaml").is_file()
    assert list(tmp_path.glob("mlruns/*/*/artifacts/report/*.html"))
    found = files_with(tmp_path, secret)
    if route == "typed":
        # Hydra records the typed command line in .hydra/ (the reason for the
        # environment route); the search does find it there, and nowhere else. (With Ray, the
        # jobs run in the workers, whose command lines carry no password: nothing is found)
        assert all(hydra_records(path) for path in found), found
        assert found or backend == "ray"
    else:
        assert found == []
    if backend == "ray":  # Ray's session logs: what its workers and actors printed
        sessions = [
            d for d in Path("/tmp/ray").glob("session_2*") if d.stat().st_mtime >= started - 1
        ]
        assert sessions, "the sweep's Ray session left no logs"
        assert [f for d in sessions for f in files_with(d, secret)] == []

    # MLflow: experiments, runs (params, tags, metric keys), logged and registered models; and
    # the study's attributes
    storage = optuna.storages.RDBStorage(stores.optuna)  # one pool, closed at the end
    try:
        contents, runs = store_contents(stores, storage)
        assert runs >= N_TRIALS + 1  # the parent and a run per trial were searched
        assert secret not in contents
        for experiment in MlflowClient(stores.mlflow).search_experiments():
            assert str(tmp_path / "mlruns") in experiment.artifact_location  # searched above

    finally:
        storage.engine.dispose()
    toy = toy_app(tmp_path, storage=stores.optuna)
    toy.tracking_uri = stores.mlflow
    try:
        check_invariant(toy, n_trials=N_TRIALS)
    finally:
        toy.close()
