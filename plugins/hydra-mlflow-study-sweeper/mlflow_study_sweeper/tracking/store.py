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
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_study_sweeper.databases import (
    DatabaseUnreachable,
    check_store_file,
    create_whole,
    probe,
    sqlite_path,
)
from mlflow_study_sweeper.errors import (
    SweepConfigError,
    SweepStopped,
    TrackingUnavailableError,
    mask_url,
)
from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.tracking.offline import TrackingOffline, unreachable
from mlflow_study_sweeper.tracking.relay.delivery import Relay
from mlflow_study_sweeper.tracking.relay.stores import install

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
    key = "hydra.sweeper.tracking_uri"
    named = f"the MLflow tracking URI {tracking_uri}"
    if not check_store_file(path, "MLflow store", named, key, MLFLOW_TABLES):
        return
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


def check_database(tracking_uri: str, timeout_s: float) -> None:
    """One connection attempt (databases.probe), refused as the tracking store's."""
    try:
        probe(tracking_uri, timeout_s)
    except DatabaseUnreachable as err:
        raise TrackingUnavailableError(
            f"cannot open the MLflow tracking database {mask_url(tracking_uri)}: {err}. Check "
            f"the URI, that the database exists (createdb ...) and that its server runs"
        ) from None


@dataclass(frozen=True)
class TrackingSettings:
    """Where the sweep's runs go, checked: the store's URI (absolute) and the experiment."""

    uri: str
    experiment_name: str


@dataclass
class TrackingStore:
    """The MLflow store this process tracks into: a client, and for a tracking server the relay
    that keeps this process's writes while the server is away (None for a database or file).

    Made by `connect` and handed to whoever needs the store; nothing reads it from a module.
    """

    uri: str
    client: MlflowClient
    relay: Relay | None = None

    def away(self, err: BaseException) -> bool:
        """Whether `err` says that the tracking server could not be reached."""
        if not self.uri.startswith(("http://", "https://")):
            return False
        return isinstance(err, TrackingOffline) or unreachable(err)

    def answers(self) -> bool:
        """Whether the tracking server answers now, and nothing is kept for it."""
        try:
            check_server(self.uri)
        except (TrackingUnavailableError, SweepConfigError):
            return False
        return self.relay is None or not self.relay.queued()

    def until_reachable(
        self, step: Callable[[], T], quiet: bool = False, what: str = "start the sweep"
    ) -> T:
        """step(), again once the tracking server answers and has what was kept for it, when
        it could not be reached (reads the relay cannot answer while it is away, the model
        registry: a sweep or worker starting during an outage, an end during one)."""
        said, answered = quiet, 0
        while True:
            try:
                return step()
            except Exception as err:
                if not self.away(err):
                    raise
                # the server answers, and the step still finds something unreachable (a service
                # of the app's own, say): not an outage of the server
                answered = answered + 1 if self.answers() else 0
                if answered >= 3:
                    raise
                if not said:
                    print(
                        f"The MLflow server {mask_url(self.uri)} is unreachable; waiting for it "
                        f"to {what}",
                        file=sys.stderr,
                        flush=True,
                    )
                    said = True
                wait_for_server(self.uri)
                if self.relay is not None:
                    self.relay.wait()

    def deliver_kept(
        self, deadline: float | None, ended: str | None = None, after: str = ""
    ) -> None:
        """Wait until the server has taken every write this process (and processes of this
        machine that died) kept while it was away, until `deadline` (time.time()) when given;
        Ctrl-C or SIGTERM stops the wait. A wait that runs out is SweepStopped (one Error line,
        exit 1), which says how many writes are kept, where, and what sends them: `ended` names
        who ended with writes kept, else `after` says what to do."""
        relay = self.relay
        if relay is None:
            return
        if relay.queued():
            until = "until the time budget ends" if deadline else "Ctrl-C stops; a rerun sends them"
            print(
                f"Waiting for the MLflow server {mask_url(relay.uri)} to take the "
                f"{len(relay.pending)} writes kept while it was away ({until})",
                flush=True,
            )
        try:
            delivered = relay.wait(deadline) and (
                not relay.deliver_orphans() or relay.wait(deadline)
            )
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the sweep raises it for SIGTERM)
            delivered = False
        if delivered:
            return
        relay.explained = True  # this line says where they are: not the relay's farewell too
        kept = f"{len(relay.pending)} writes for the MLflow server {mask_url(relay.uri)}"
        within = " within hydra.sweeper.timeout" if deadline else ""
        if ended:
            raise SweepStopped(
                f"{ended} {kept} are still kept in {relay.folder} (the server did not come "
                f"back{within}): rerun the same command, or any sweep command on this machine "
                f"that tracks into that server, once it answers, and they are sent first"
            )
        raise SweepStopped(
            f"the MLflow server {mask_url(relay.uri)} did not come back{within}; the {kept} are "
            f"kept in {relay.folder}, and the next sweep to this server from this machine sends "
            f"them first: {after}"
        )

    def require_server(self, what: str) -> None:
        """Before a read whose empty answer would be taken for the truth (the best run's logged
        models, say): while the relay keeps writes, the server is away and the relay answers
        such reads with nothing, so this raises TrackingOffline (until_reachable waits)."""
        if self.relay is not None and self.relay.queued():
            raise TrackingOffline(f"{what} needs the MLflow server, which is away")

    def real_id(self, run_id: str | None) -> str | None:
        """A run's id on the server: a provisional one (given while the server was away) is
        replaced once its run was delivered."""
        return self.relay.real(run_id) if self.relay is not None else run_id

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when it does not exist yet."""
        return experiment_id(self.client, name)


def connect(tracking_uri: str, worker: bool = False) -> TrackingStore:
    """This process's handle on the store, creating a new sqlite store whole. A tracking
    server's writes from this process go through the relay, which keeps them while the server
    is away; a worker (`worker`) started during an outage waits it out instead of failing."""
    if tracking_uri.startswith("sqlite:///"):
        create_sqlite_store(tracking_uri)
    if worker:
        wait_for_server(tracking_uri)
    else:
        check_server(tracking_uri)
    relay = None
    if tracking_uri.startswith(("http://", "https://")):
        relay = install(tracking_uri, quiet=worker)
    return TrackingStore(tracking_uri, MlflowClient(tracking_uri=tracking_uri), relay)


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
