"""The best run's MLflow model in the registry, and an alias that moves only on improvement."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mlflow_study_sweeper import keys


@dataclass
class Published:
    name: str
    model_uri: str
    version: str
    metric: str
    value: float | None
    alias: str
    moved: bool
    previous: str | None
    previous_value: float | None

    def line(self) -> str:
        shown = f"{self.metric}={self.value:.4f}" if self.value is not None else "no metric"
        head = f"model: {self.name} version {self.version} ({self.model_uri}), {shown}; "
        if self.previous is None:
            return head + f"it is the first @{self.alias}: models:/{self.name}@{self.alias}"
        before = f"{self.metric}={self.previous_value:.4f}" if self.previous_value else "?"
        if self.moved:
            return head + f"@{self.alias} moved from version {self.previous} ({before})"
        return head + f"@{self.alias} stays on version {self.previous} ({before} is not beaten)"


def logged_model_uri(client: MlflowClient, run_id: str, name: str) -> str | None:
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{name}'",
    )
    return found[0].model_uri if found else None


def register(
    client: MlflowClient, name: str, model_uri: str, run_id: str, end_key: str, tags: dict
) -> str:
    """A version for this model: the one this sweep end already made, or a new one."""
    for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if version.tags.get(keys.END_OF_VERSION) == end_key:
            return str(version.version)
    version = mlflow.register_model(
        model_uri,
        name,
        tags={**{k: str(v) for k, v in tags.items()}, keys.END_OF_VERSION: end_key},
    )
    return str(version.version)


def move_alias(
    client: MlflowClient,
    name: str,
    alias: str,
    version: str,
    metric: str,
    value: float | None,
    maximize: bool,
) -> Published:
    """Point `alias` at `version` if it beats the current holder on `metric` (or none holds it)."""
    previous, previous_value = None, None
    try:
        current = client.get_model_version_by_alias(name, alias)
        previous = str(current.version)
        previous_value = float(current.tags.get(metric, "nan"))
    except MlflowException:
        pass  # nobody holds the alias yet
    if previous == version:  # a redone end: this version already holds it
        moved = True
    elif previous is None or value is None or not math.isfinite(value):
        moved = previous is None
    else:
        better = value > previous_value if maximize else value < previous_value
        moved = better or not math.isfinite(previous_value)
    if moved:
        client.set_registered_model_alias(name, alias, version)
    return Published(
        name=name,
        model_uri=f"models:/{name}/{version}",
        version=version,
        metric=metric,
        value=value,
        alias=alias,
        moved=moved,
        previous=previous if previous != version else None,
        previous_value=previous_value if previous != version else None,
    )
