"""The MLflow side of a sweep: the parent run, one child run per trial, statuses, the best tag."""

from __future__ import annotations

import contextlib
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from hydra_plugins.mlflow_optuna_sweeper._errors import (
    SweepConfigError,
    TrackingUnavailableError,
    mask_url,
)
from hydra_plugins.mlflow_optuna_sweeper._faults import crash_point

PARENT_ROLE = "sweep"
TRIAL_ROLE = "trial"
# what each final trial state leaves on its run
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# tracking URIs MLflow opens with SQLAlchemy (postgresql+psycopg://... included)
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")


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
    """A new sqlite store appears complete or not at all.

    MLflow creates its tables in many migrations, each its own transaction: a process killed
    among them leaves a file that every later start fails on. It is built under a temporary
    name and linked into place when whole.
    """
    path = Path(tracking_uri[len("sqlite:///") :])
    if path.exists() or ":memory:" in tracking_uri:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(f".{path.name}.creating-*"):  # a killed attempt's leftovers
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            left.unlink(missing_ok=True)
    building = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        MlflowClient(f"sqlite:///{building}").search_experiments(max_results=1)
        crash_point("mlflow-store-built")
        with contextlib.suppress(FileExistsError):  # another worker was first: use its store
            os.link(building, path)
    finally:
        building.unlink(missing_ok=True)


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
    """A client for this store, creating a new sqlite store whole."""
    if tracking_uri.startswith("sqlite:///"):
        create_sqlite_store(tracking_uri)
    check_server(tracking_uri)
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


def param_value(value: Any) -> str:
    # numbers stay bare ("0.001"), so the UI's parallel coordinates treat them as numeric
    if isinstance(value, float):
        return repr(value)
    return str(value)


def start_run(
    client: MlflowClient,
    experiment: str,
    name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    all_tags = dict(tags)
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run = client.create_run(experiment, run_name=name, tags=all_tags)
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, param_value(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    ts = mlflow.utils.time.get_current_time_millis()
    batch = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(v)
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def end_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, Any]) -> None:
    """Tags first, then the status: a reader never sees a finished run without its outcome."""
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    client.set_terminated(run_id, status=status)


def run_or_none(client: MlflowClient, run_id: str | None):
    """The run, or None when it was deleted (or never existed in this store)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return run if run.info.lifecycle_stage == "active" else None


def is_running(client: MlflowClient, run_id: str) -> bool:
    run = run_or_none(client, run_id)
    return run is not None and run.info.status == RunStatus.to_string(RunStatus.RUNNING)


def find_parent_run(client: MlflowClient, experiment: str, study_name: str) -> str | None:
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`sweep.role` = '{PARENT_ROLE}' "
        f"and tags.`optuna.study_name` = '{study_name}'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def reopen_run(client: MlflowClient, run_id: str) -> None:
    client.update_run(run_id, status="RUNNING")


def settle_trial_run(client: MlflowClient, trial) -> bool:
    """Make a finished trial's run agree with it (status, optuna.state); True if it changed.

    Covers a worker killed before it closed its run, and one killed between a job ending its
    run FINISHED and the sweeper recording the trial as something else.
    """
    run = run_or_none(client, trial.user_attrs.get("mlflow_run_id"))
    if run is None:
        return False
    state = trial.state.name
    kind = trial.system_attrs.get("failure")
    status = "KILLED" if kind in ("interrupted", "time_budget") else RUN_STATUS.get(state)
    if status is None:
        return False
    tags = {"optuna.state": state}
    if state == "FAIL":
        tags["failure_reason"] = trial.user_attrs.get("fail_reason", "unknown")
    if run.info.status == status and run.data.tags.get("optuna.state") == state:
        return False
    end_run(client, run.info.run_id, status, tags)
    return True


def mark_best(
    client: MlflowClient,
    parent_run_id: str,
    best_run_id: str,
    best_trial: int,
    best_params: dict[str, Any],
    best_values: dict[str, float],
) -> list[str]:
    """Tag the one best child run, and copy its result onto the parent. Returns notes."""
    notes = []
    clear_best(client, parent_run_id, but=best_run_id)
    client.set_tag(best_run_id, "best_run", "true")
    parent = client.get_run(parent_run_id)
    tags = {"best_run_id": best_run_id, "best_trial": str(best_trial)}
    params = []
    for key, value in best_params.items():
        tags[f"best.{key}"] = param_value(value)
        logged = parent.data.params.get(f"best.{key}")
        if logged is None:
            params.append(Param(f"best.{key}", param_value(value)))
        elif logged != param_value(value):
            # MLflow params are immutable; the best.* tags always hold the current winner
            notes.append(
                f"parent param best.{key}={logged} is from an earlier finish; tag is current"
            )
    ts = mlflow.utils.time.get_current_time_millis()
    client.log_batch(
        parent_run_id,
        metrics=[Metric(f"best_{k}", float(v), ts, 0) for k, v in best_values.items()],
        params=params,
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    return notes


def clear_best(client: MlflowClient, parent_run_id: str, but: str | None = None) -> None:
    """A resumed sweep can have a new winner, or none: at most one run keeps best_run."""
    for run in children(client, parent_run_id, "tags.best_run = 'true'"):
        if run.info.run_id != but:
            client.delete_tag(run.info.run_id, "best_run")


def children(client: MlflowClient, parent_run_id: str, where: str = "") -> list:
    """The parent's child runs (the trials' runs), optionally filtered (MLflow's syntax)."""
    experiment = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'"
    return client.search_runs([experiment], f"{query} and {where}" if where else query)


def log_table(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], name: str) -> None:
    """Rows as a table artifact the MLflow UI shows as a table, replaced when logged again.

    (MlflowClient.log_table appends to an existing file: a redone end would double the rows.)
    """
    import json
    import tempfile

    import pandas as pd
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        pd.DataFrame(rows).to_json(path, orient="split", index=False)  # log_table's format
        client.log_artifact(run_id, str(path))
    listed = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": name, "type": "table"}
    if entry not in listed:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*listed, entry]))
