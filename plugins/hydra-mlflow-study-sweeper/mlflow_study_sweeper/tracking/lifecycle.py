"""The MLflow side of a sweep: every run's lifecycle (the parent, one per trial).

`SweepRuns` is called at a trial's start and end, and by the end step for the parent; nothing
else in the sweeper creates a run or sets a status. Each trial costs five calls or a few more:
create the run, log its params, read whether the job logged the objective itself, log its
outcome (metric and tags), set its status; params, metrics and tags go to a server in a batch,
and to a database in a batch but for a single item or a metric and one more (see log_few).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mlflow_study_sweeper import contract, keys
from mlflow_study_sweeper.tracking.offline import TrackingOffline, unreachable

log = logging.getLogger(__name__)
MAX_PARAMS, MAX_METRICS = 100, 1000  # MLflow's limits per log_batch
SERVER_SCHEMES = ("http://", "https://", "databricks")  # stores that take a request per call


# ---- values as MLflow keeps them -----------------------------------------------------------------
def param_value(value: Any) -> str:
    # numbers stay bare ("0.001"), so the UI's parallel coordinates treat them as numeric
    if isinstance(value, float):
        return repr(value)
    return str(value)


def as_params(params: dict[str, Any]) -> list[Param]:
    # a trial's `+w` (a key a search-space function added) is the run's param `w`
    return [Param(keys.config_key(k), param_value(v)[:6000]) for k, v in params.items()]


def as_metrics(metrics: dict[str, float | None], step: int = 0) -> list[Metric]:
    ts = mlflow.utils.time.get_current_time_millis()
    return [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(v)
    ]


def as_tags(tags: dict[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)[:5000]) for k, v in tags.items()]


def log_batch(
    client: MlflowClient,
    run_id: str,
    params: list[Param] = (),
    metrics: list[Metric] = (),
    tags: list[RunTag] = (),
) -> None:
    """One call where MLflow's limits allow it, several where they do not."""
    params, metrics, tags = list(params), list(metrics), list(tags)
    while params or metrics or tags:
        client.log_batch(
            run_id, params=params[:MAX_PARAMS], metrics=metrics[:MAX_METRICS], tags=tags[:100]
        )
        params, metrics, tags = params[MAX_PARAMS:], metrics[MAX_METRICS:], tags[100:]


def log_few(
    client: MlflowClient,
    run_id: str,
    params: list[Param] = (),
    metrics: list[Metric] = (),
    tags: list[RunTag] = (),
) -> None:
    """log_batch, or on a database store one call each for a single item, or a metric and
    one more: the database store's log_batch reads the run and opens a session per kind of
    item in it, and a metric's costs more (its model metrics are looked for). On SQLite
    (benchmarks/bench_mlflow_calls.py): two params 5.4 ms batched, 6.2 ms one call each; a
    metric and a tag 8.0 against 6.7 ms; one param 5.3 against 3.2 ms. A server takes a
    request per call."""
    items = len(params) + len(metrics) + len(tags)
    single = items == 1 or (items == 2 and len(metrics) > 0)
    if not single or client.tracking_uri.startswith(SERVER_SCHEMES):
        log_batch(client, run_id, params=params, metrics=metrics, tags=tags)
        return
    for p in params:
        client.log_param(run_id, p.key, p.value)
    for m in metrics:
        client.log_metric(run_id, m.key, m.value, timestamp=m.timestamp, step=m.step)
    for t in tags:
        client.set_tag(run_id, t.key, t.value)


def run_or_none(client: MlflowClient, run_id: str | None):
    """The run, or None when it was deleted (or never existed in this store)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except TrackingOffline:
        raise  # not known while the server is away: not deleted
    except MlflowException as err:
        if unreachable(err):
            raise
        return None
    return run if run.info.lifecycle_stage == "active" else None


def is_running(client: MlflowClient, run_id: str) -> bool:
    run = run_or_none(client, run_id)
    return run is not None and run.info.status == RunStatus.to_string(RunStatus.RUNNING)


# ---- the runs of a sweep -------------------------------------------------------------------------
class SweepRuns:
    """The parent run of a sweep and a child per trial, whose statuses follow the trials."""

    def __init__(
        self,
        client: MlflowClient,
        experiment_id: str,
        study_name: str,
        real: Callable[[str | None], str | None] = lambda run_id: run_id,
    ) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.study_name = study_name
        self.parent_run_id = ""
        self.real = real  # a provisional run id -> the run's id on the server (the relay's)

    def run_id(self, trial: Any) -> str | None:
        """The trial's run, by its id on the server once it has one."""
        return self.real(keys.run_id(trial))

    # -- the parent --
    def find_parent(self) -> str | None:
        """The oldest parent run of this study (one its creator made before it recorded it)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{keys.ROLE}` = '{keys.PARENT_ROLE}' "
            f"and tags.`{keys.STUDY_NAME}` = '{self.study_name}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def create_parent(self, params: dict[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"sweep-{self.study_name}",
            tags={keys.ROLE: keys.PARENT_ROLE, keys.STUDY_NAME: self.study_name},
        )
        log_few(self.client, run.info.run_id, params=as_params(params))
        return run.info.run_id

    def use_parent(self, run_id: str) -> None:
        """This command's parent: reopened if an earlier command closed it."""
        self.parent_run_id = run_id
        if not is_running(self.client, run_id):
            self.client.update_run(run_id, status="RUNNING")

    def close_parent(self, status: str, tags: dict[str, Any]) -> None:
        if self.parent_run_id:
            end_run(self.client, self.parent_run_id, status, tags)

    # -- a trial --
    def trial_started(
        self, number: int, params: dict[str, Any], tags: dict[str, str] | None = None
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                keys.ROLE: keys.TRIAL_ROLE,
                keys.STUDY_NAME: self.study_name,
                keys.TRIAL_NUMBER: str(number),
                keys.STATE: "RUNNING",
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                **(tags or {}),
            },
        )
        log_few(self.client, run.info.run_id, params=as_params(params))
        return run.info.run_id

    def trial_ended(
        self,
        run_id: str,
        status: str,
        tags: dict[str, Any],
        values: dict[str, float] | None = None,
    ) -> None:
        """Its outcome on its run: the objectives the job did not log itself, tags, status."""
        metrics = []
        if values:  # a key's history is one indexed read; the whole run is four
            unlogged = {
                k: v for k, v in values.items() if not self.client.get_metric_history(run_id, k)
            }
            metrics = as_metrics(unlogged)
        log_few(self.client, run_id, metrics=metrics, tags=as_tags(tags))
        self.client.set_terminated(run_id, status=status)

    def release_job_runs(self, status: str) -> None:
        """Runs a job left active in MLflow's fluent API of this process (it raised between
        `mlflow.start_run()` and `mlflow.end_run()`, without a `with`): ended with `status`, so
        that the next trial's job here resumes its own run instead of failing
        with "Run ... is already active". The trial's run then gets its status from
        trial_ended."""
        while mlflow.active_run() is not None:
            try:
                mlflow.end_run(status)  # off the stack first, then ended
            except Exception as err:  # trial_ended sets the trial's run's status again
                log.warning("a run the job left active could not be ended: %s", err)

    def settle(self, trials: Iterable[Any]) -> int:
        """Every finished trial's run agrees with it (status, optuna.state); returns how many
        changed. Covers a worker killed before it closed its run, one killed between a job
        ending its run FINISHED and the sweeper recording the trial as something else, and one
        killed between creating its run and recording it on the trial (a stray run)."""
        trials = list(trials)
        finished = [t for t in trials if t.state.is_finished() and self.run_id(t)]
        try:
            changed = self.close_strays(trials)
            if not finished:
                return changed
            runs = {r.info.run_id: r for r in self.runs_of(finished)}
        except TrackingOffline:  # the tracking server is away: settled when it is back
            return 0
        for trial in finished:
            run = runs.get(self.run_id(trial))
            status = keys.run_status(trial)
            state = trial.state.name
            if run is None or status is None:
                continue  # deleted, or kept in another store
            if run.info.status == status and run.data.tags.get(keys.STATE) == state:
                continue
            tags = {keys.STATE: state}
            if state == "FAIL":
                tags[keys.FAILURE_REASON] = keys.fail_reason(trial)
            end_run(self.client, run.info.run_id, status, tags)
            changed += 1
        return changed

    def close_strays(self, trials: list[Any]) -> int:
        """RUNNING trial runs of this study that no trial records, whose trial (by number) is
        finished: ended as that trial (FAIL: its worker died before it recorded the run)."""
        by_number = {t.number: t for t in trials if t.state.is_finished()}
        recorded = {self.run_id(t) for t in trials}
        query = (
            f"tags.`{keys.ROLE}` = '{keys.TRIAL_ROLE}' and "
            f"tags.`{keys.STUDY_NAME}` = '{self.study_name}' and attributes.status = 'RUNNING'"
        )
        closed = 0
        for run in search_all(self.client, self.experiment_id, query):
            number = run.data.tags.get(keys.TRIAL_NUMBER, "")
            trial = by_number.get(int(number)) if number.isdigit() else None
            if run.info.run_id in recorded or trial is None:
                continue  # its trial's own run, or a trial being trained (recorded any moment)
            tags = {keys.STATE: trial.state.name}
            if trial.state.name == "FAIL":
                tags[keys.FAILURE_REASON] = "its worker died before it recorded this run"
            end_run(self.client, run.info.run_id, keys.run_status(trial) or "KILLED", tags)
            closed += 1
        return closed

    def runs_of(self, trials: list[Any]) -> list[Any]:
        """The active runs of these trials, read in a few searches instead of one call each."""
        ids = [self.run_id(t) for t in trials]
        found = []
        for start in range(0, len(ids), 100):
            chunk = ", ".join(f"'{i}'" for i in ids[start : start + 100])
            found += search_all(self.client, self.experiment_id, f"attributes.run_id IN ({chunk})")
        return found

    def children(self, where: str = "") -> list[Any]:
        """The parent's child runs (the trials' runs), optionally filtered (MLflow's syntax)."""
        query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{self.parent_run_id}'"
        return search_all(
            self.client, self.experiment_id, f"{query} and {where}" if where else query
        )

    # -- the best run --
    def mark_best(
        self,
        best_run_id: str,
        best_trial: int,
        best_params: dict[str, Any],
        best_values: dict[str, float],
    ) -> list[str]:
        """Tag the one best child run, and copy its result onto the parent. Returns notes."""
        notes = []
        self.clear_best(but=best_run_id)
        self.client.set_tag(best_run_id, keys.BEST_RUN, "true")
        parent = self.client.get_run(self.parent_run_id)
        tags = {keys.BEST_RUN_ID: best_run_id, keys.BEST_TRIAL: str(best_trial)}
        params = {}
        for key, value in best_params.items():
            name = keys.BEST_PARAM.format(key=keys.config_key(key))
            tags[name] = param_value(value)
            logged = parent.data.params.get(name)
            if logged is None:
                params[name] = value
            elif logged != param_value(value):
                # MLflow params are immutable; the best.* tags always hold the current winner
                notes.append(
                    f"parent param {name}={logged} is from an earlier finish; tag is current"
                )
        metrics = {keys.BEST_METRIC.format(name=k): v for k, v in best_values.items()}
        log_batch(
            self.client,
            self.parent_run_id,
            params=as_params(params),
            metrics=as_metrics(metrics),
            tags=as_tags(tags),
        )
        return notes

    def clear_best(self, but: str | None = None) -> None:
        """A resumed sweep can have a new winner, or none: at most one run keeps best_run."""
        for run in self.children(f"tags.{keys.BEST_RUN} = 'true'"):
            if run.info.run_id != but:
                self.client.delete_tag(run.info.run_id, keys.BEST_RUN)

    def mark_front(self, on_front: set[str]) -> None:
        """Tag the Pareto front's runs, and only them (a continued study moves the front)."""
        for run in self.children(f"tags.{keys.PARETO_FRONT} = 'true'"):
            if run.info.run_id not in on_front:
                self.client.delete_tag(run.info.run_id, keys.PARETO_FRONT)
        for run_id in on_front:
            if run_or_none(self.client, run_id) is not None:
                self.client.set_tag(run_id, keys.PARETO_FRONT, "true")


def search_all(client: MlflowClient, experiment: str, query: str) -> list[Any]:
    found, token = [], None
    while True:
        page = client.search_runs([experiment], query, max_results=1000, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            return found


def end_run(client: MlflowClient, run_id: str, status: str, tags: dict[str, Any]) -> None:
    """Tags first, then the status: a reader never sees a finished run without its outcome."""
    if tags:
        log_batch(client, run_id, tags=as_tags(tags))
    client.set_terminated(run_id, status=status)


def log_table(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], name: str) -> None:
    """Rows as a table artifact the MLflow UI shows as a table, replaced when logged again.

    (MlflowClient.log_table appends to an existing file: a redone end would double the rows.)
    """
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


# ---- checkpoints in runs -------------------------------------------------------------------------
def artifact_repository(client: MlflowClient, run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client.get_run(run_id).info.artifact_uri)


def drop_older_checkpoints(run_id: str, step: int) -> None:
    """A training run's checkpoints other than that of `step` (which is recorded by now)."""
    client = MlflowClient()  # the job's own: the sweeper's tracking URI, in the environment
    keep = contract.checkpoint_artifact(step)
    try:
        older = [f.path for f in client.list_artifacts(run_id, contract.CHECKPOINT_DIR)]
        older = [path for path in older if path != keep]
        if older:
            repository = artifact_repository(client, run_id)
            for path in older:
                repository.delete_artifacts(path)
    except Exception as err:  # a store that cannot delete: the sweep's end tidies, or not
        log.warning("could not remove older checkpoints of run %s: %s", run_id, err)


def tidy_checkpoints(client: MlflowClient, runs: dict[str, int], keep: bool) -> None:
    """Checkpoints of finished runs ({run id: last checkpoint step}): all removed, or (keep)
    only each run's last one kept."""
    for run_id, step in runs.items():
        last = contract.checkpoint_artifact(step)
        try:
            files = [f.path for f in client.list_artifacts(run_id, contract.CHECKPOINT_DIR)]
            if not files:
                continue
            repository = artifact_repository(client, run_id)
            if not keep:
                repository.delete_artifacts(contract.CHECKPOINT_DIR)  # the folder and its files
            for path in files if keep else []:
                if path != last:
                    repository.delete_artifacts(path)
        except Exception as err:  # a store that cannot delete: the files stay, the sweep goes on
            log.warning("could not remove the checkpoints of run %s: %s", run_id, err)


def copy_history(client: MlflowClient, source: str, target: str, step: int) -> None:
    """The earlier run's metrics up to `step`, so the continuing run carries the whole curve."""
    metrics: list[Metric] = []
    for key in client.get_run(source).data.metrics:
        metrics += [m for m in client.get_metric_history(source, key) if m.step <= step]
    log_batch(client, target, metrics=metrics)
