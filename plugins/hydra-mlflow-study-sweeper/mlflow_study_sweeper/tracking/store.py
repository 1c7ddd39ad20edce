"""The MLflow store a sweep tracks into: made whole, checked before anything is created,
opened; the sweep's experiment."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.databases import (
    create_whole,
    sqlite_path,
    tables,
    writable_place,
)
from mlflow_study_sweeper.errors import (
    SweepConfigError,
    TrackingUnavailableError,
    mask_url,
)
from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.tracking.relay import stores
from mlflow_study_sweeper.tracking.relay.delivery import unreachable

# tracking URIs MLflow opens with SQLAlchemy (postgresql+psycopg://... included)
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
T = TypeVar("T")


def absolute_uri(uri: str, start_dir: str | os.PathLike | None = None) -> str:
    """sqlite:///rel.db -> sqlite:////abs/rel.db, against the directory the user started in."""
    base = Path(start_dir or os.getcwd())
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str((base / uri[len(prefix) :]).resolve())
    if "://" not in uri:  # a plain folder: MLflow's file store
        return str((base / uri).resolve())
    return uri


def create_sqlite_store(tracking_uri: str) -> None:
    """A new sqlite store appears complete or not at all (see _sqlite_files)."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return

    def build(file: Path) -> None:
        MlflowClient(f"sqlite:///{file}").search_experiments(max_results=1)
        with contextlib.closing(sqlite3.connect(file)) as db, db:
            # the default experiment records the folder it was made in: MLflow makes it again,
            # for the store's own folder, when a copy is first opened
            db.execute("DELETE FROM experiments WHERE experiment_id = 0")

    def ready(file: Path) -> None:
        MlflowClient(f"sqlite:///{file}").search_experiments(max_results=1)
        crash_point("mlflow-store-built")

    create_whole(path, f"mlflow-{mlflow.__version__}-empty.db", build, ready)


TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks")
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}


def check_store(tracking_uri: str, probe_server: bool = True) -> None:
    """The store can be used, found out without creating or changing anything in it (a
    server's answer is not asked by a worker: the sweep asked it, and the worker waits for it)."""
    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0] if "://" in tracking_uri else "file"
    if scheme not in TRACKING_SCHEMES:
        raise SweepConfigError(
            f"the MLflow tracking URI {mask_url(tracking_uri)!r} has an unknown scheme "
            f"{scheme!r}: use sqlite:///mlflow.db, http://host:5000 or postgresql://..."
        )
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise SweepConfigError(
            f"the MLflow tracking URI {tracking_uri!r} is a folder: MLflow 3 keeps its file store "
            f"for reading old runs only. Use sqlite:///mlflow.db (or a server), or set "
            f"MLFLOW_ALLOW_FILE_STORE=true to write there anyway"
        )
    path = sqlite_path(tracking_uri)
    if path is not None:
        check_sqlite_store(tracking_uri, path)
    if probe_server:
        check_server(tracking_uri)


def check_sqlite_store(tracking_uri: str, path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        if not writable_place(path):
            raise SweepConfigError(
                f"cannot create the MLflow store {path}: its folder is not writable"
            )
        return
    try:
        found = tables(path)
    except ValueError as err:
        raise SweepConfigError(
            f"the MLflow tracking URI {tracking_uri} is not an MLflow store: {err}. Point "
            f"hydra.sweeper.tracking_uri at another file"
        ) from None
    if found and not found >= MLFLOW_TABLES:
        raise SweepConfigError(
            f"{path} is a SQLite database of something else (tables {', '.join(sorted(found)[:4])}"
            f", ...), not an MLflow store: point hydra.sweeper.tracking_uri at another file "
            f"(the Optuna storage and the MLflow store cannot share one)"
        )
    try:  # opening an existing store checks its schema and writes nothing
        MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as err:
        raise SweepConfigError(
            f"the MLflow store {tracking_uri} cannot be opened ({str(err).splitlines()[0][:200]}): "
            f"if a process was killed while MLflow built it and it holds no runs, delete it and "
            f"rerun; an older store upgrades with `mlflow db upgrade {tracking_uri}`"
        ) from None


def check_server(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast (instead of minutes of MLflow's retries) when a tracking server is down."""
    if tracking_uri.startswith(DATABASE_SCHEMES):
        check_database(tracking_uri, timeout_s)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnavailableError(
            f"the MLflow tracking server at {tracking_uri} does not answer ({reason}): "
            f"start it (mlflow server --backend-store-uri sqlite:///mlflow.db --port ...) "
            f"or set hydra.sweeper.tracking_uri to a reachable server or a sqlite:/// file"
        ) from None


def wait_for_server(tracking_uri: str, pause_s: float = 2.0) -> None:
    """Until the tracking server (or database) answers."""
    while True:
        try:
            check_server(tracking_uri)
            return
        except (TrackingUnavailableError, SweepConfigError):
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 10.0)


def until_reachable(
    tracking_uri: str, step: Callable[[], T], quiet: bool = False, what: str = "start the sweep"
) -> T:
    """step(), again once the tracking server answers and has what was kept for it, when it
    could not be reached (reads the relay cannot answer while it is away, the model registry:
    a sweep or worker starting during an outage, an end during one)."""
    said, answered = quiet, 0
    while True:
        try:
            return step()
        except Exception as err:
            if not tracking_away(tracking_uri, err):
                raise
            # the server answers, and the step still finds something unreachable (a service of
            # the app's own, say): not an outage of the server
            answered = answered + 1 if check_answers(tracking_uri) else 0
            if answered >= 3:
                raise
            if not said:
                print(
                    f"The MLflow server {mask_url(tracking_uri)} is unreachable; waiting for it "
                    f"to {what}",
                    file=sys.stderr,
                    flush=True,
                )
                said = True
            wait_for_server(tracking_uri)
            if stores.ACTIVE is not None:
                stores.ACTIVE.wait()


def tracking_away(tracking_uri: str, err: BaseException) -> bool:
    """Whether `err` says that the tracking server at `tracking_uri` could not be reached."""
    if not tracking_uri.startswith(("http://", "https://")):
        return False
    return isinstance(err, stores.TrackingOffline) or unreachable(err)


def check_answers(tracking_uri: str) -> bool:
    """Whether the tracking server answers now, and nothing is kept for it."""
    try:
        check_server(tracking_uri)
    except (TrackingUnavailableError, SweepConfigError):
        return False
    return stores.ACTIVE is None or not stores.ACTIVE.queued()


def check_database(tracking_uri: str, timeout_s: float) -> None:
    """One connection attempt: MLflow itself retries a missing database for about 2 minutes."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    connect_args = {"connect_timeout": int(timeout_s)} if "postgres" in tracking_uri else {}
    try:
        engine = sqlalchemy.create_engine(
            tracking_uri, poolclass=NullPool, connect_args=connect_args
        )
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as err:  # no server, no such database, a refused login, no driver
        lines = str(err).strip().splitlines()
        first = lines[0] if lines else type(err).__name__
        raise TrackingUnavailableError(
            f"cannot open the MLflow tracking database {mask_url(tracking_uri)}: "
            f"{mask_url(first)[:300]}. Check the URI, that the database exists (createdb ...) "
            f"and that its server runs"
        ) from None


def connect(tracking_uri: str) -> MlflowClient:
    """A client for this store, creating a new sqlite store whole. A tracking server's writes
    from this process go through the relay, which keeps them while the server is away."""
    if tracking_uri.startswith("sqlite:///"):
        create_sqlite_store(tracking_uri)
    if contract.is_worker():
        wait_for_server(tracking_uri)  # a worker started during an outage waits it out
    else:
        check_server(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        stores.install(tracking_uri, quiet=contract.is_worker())
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    try:
        experiment = client.get_experiment_by_name(name)
    except Exception as err:
        if "alembic" not in str(err) and "no such table" not in str(err):
            raise
        raise SweepConfigError(
            f"the MLflow store {client.tracking_uri} is half-created or half-migrated (a process "
            f"was killed while MLflow built its tables). If a sweep just created it, it holds no "
            f"runs: delete the file and rerun. Otherwise restore it from a backup, or try "
            f"`mlflow db upgrade {client.tracking_uri}`"
        ) from None
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise SweepConfigError(
                f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) "
                f"or choose another experiment name"
            )
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another worker created it in the meantime
        return client.get_experiment_by_name(name).experiment_id
