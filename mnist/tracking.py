"""MLflow side of a sweep: the parent run, one child run per trial, the best-run tags."""

from __future__ import annotations

import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist.errors import UserFacingError

PARENT_ROLE = "sweep"
TRIAL_ROLE = "trial"


class TrackingUnavailableError(UserFacingError, ConnectionError):
    """The MLflow tracking server did not answer."""


def absolute_uri(uri: str, start_dir: str | os.PathLike | None = None) -> str:
    """sqlite:///rel.db -> sqlite:////abs/rel.db, against the directory the user started in."""
    base = Path(start_dir or os.getcwd())
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and ":memory:" not in uri:
        return prefix + str((base / uri[len(prefix) :]).resolve())
    if "://" not in uri:  # a plain folder: MLflow's file store
        return str((base / uri).resolve())
    return uri


def connect(tracking_uri: str, timeout_s: float = 10.0) -> MlflowClient:
    """A client for this store; fail fast (instead of minutes of retries) if a server is down."""
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingUnavailableError(
                f"the MLflow tracking server at {tracking_uri} does not answer ({reason}): "
                f"start it (mlflow server --backend-store-uri sqlite:///mlflow.db --port ...) "
                f"or set mlflow.tracking_uri to a reachable server or a sqlite:/// file"
            ) from None
    return MlflowClient(tracking_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore) "
                f"or choose another mlflow.experiment_name"
            )
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another worker created it in the meantime
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
    items = [Param(k, param_value(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    ts = mlflow.utils.time.get_current_time_millis()
    batch = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
    client.log_batch(run_id, metrics=batch)


def end_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, str]) -> None:
    """Tags first, then the status: a reader never sees a finished run without its outcome."""
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    client.set_terminated(run_id, status=status)


def is_running(client: MlflowClient, run_id: str) -> bool:
    return client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING)


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


def mark_best(
    client: MlflowClient,
    parent_run_id: str,
    best_run_id: str,
    best_trial: int,
    best_params: dict[str, Any],
    metric: str,
    best_value: float,
    extra_metrics: dict[str, float] | None = None,
) -> list[str]:
    """Tag the one best child run, and copy its result onto the parent. Returns notes."""
    notes = []
    experiment = client.get_run(parent_run_id).info.experiment_id
    tagged = client.search_runs(
        [experiment],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' "
        "and tags.best_run = 'true'",
    )
    for run in tagged:  # a resumed sweep can have a new winner: exactly one run keeps the tag
        if run.info.run_id != best_run_id:
            client.delete_tag(run.info.run_id, "best_run")
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
    metrics = [Metric(f"best_{metric}", float(best_value), ts, 0)]
    for key, value in (extra_metrics or {}).items():
        if value is not None and math.isfinite(value):
            metrics.append(Metric(key, float(value), ts, 0))
    client.log_batch(
        parent_run_id,
        metrics=metrics,
        params=params,
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    return notes
