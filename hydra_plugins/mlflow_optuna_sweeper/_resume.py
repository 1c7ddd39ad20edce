"""Interrupted trials continue from their last checkpoint instead of starting over.

A job that saves its state after each epoch (under its run's `resume/` artifacts) and says so
with `job.checkpoint_saved(step)` can lose its worker (a kill, a preemption's SIGTERM, the time
budget) without losing its epochs. Optuna cannot reopen a finished trial, so the next command
enqueues a new trial with the same parameters; when it runs, the sweeper first gives it the
earlier trial's per-epoch values (the pruner judges the whole curve) and metric histories (its
run shows the whole curve, tagged `continues_run`), and tells the job where to load from
(`job.continues()`), so that only the remaining epochs are trained.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from mlflow.entities import Metric
from optuna.trial import TrialState

from hydra_plugins.mlflow_optuna_sweeper import job
from hydra_plugins.mlflow_optuna_sweeper._claim import insert_once
from hydra_plugins.mlflow_optuna_sweeper._console import IMPORTED
from hydra_plugins.mlflow_optuna_sweeper._objectives import CURVE
from hydra_plugins.mlflow_optuna_sweeper._study import CHECKPOINT_AT, CHECKPOINT_RUN, FAILURE

log = logging.getLogger(__name__)

CONTINUES = "continues_trial"  # user attribute of a new trial: the number of the one it continues
# a study system attribute per interrupted trial whose continuation was enqueued, set by
# exactly one worker (a finished trial's own attributes cannot change)
CONTINUED = "mlflow_optuna.continued.{number}"
# how a trial stopped that may continue: its worker died, a signal, the time budget
CONTINUABLE = ("orphaned", "interrupted", "time_budget")


def continuable(trial: optuna.trial.FrozenTrial) -> bool:
    attrs = trial.system_attrs
    return (
        trial.state == TrialState.FAIL
        and attrs.get(FAILURE) in CONTINUABLE
        and CHECKPOINT_AT in attrs
        and IMPORTED not in trial.user_attrs
    )


def enqueue_continuations(study: optuna.Study) -> list[str]:
    """Enqueue, once each, a trial that continues every interrupted trial with a checkpoint."""
    notes = []
    done = study._storage.get_study_system_attrs(study._study_id)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        key = CONTINUED.format(number=trial.number)
        if not continuable(trial) or key in done:
            continue
        if not insert_once(study, key, True):  # another worker enqueued it just now
            continue
        study.enqueue_trial(trial.params, user_attrs={CONTINUES: trial.number})
        step = trial.system_attrs[CHECKPOINT_AT]
        notes.append(
            f"trial {trial.number} was interrupted after epoch {step + 1}: a new trial with its "
            f"parameters continues from that checkpoint"
        )
    return notes


def prepare(study: optuna.Study, client: Any, trial: optuna.Trial, run_id: str) -> dict[str, str]:
    """For a trial that continues another: its curve so far, tags; the job's environment."""
    number = trial.user_attrs.get(CONTINUES)
    if number is None:
        return {}
    storage = study._storage
    earlier = study.get_trials(deepcopy=False)[number]
    step = int(earlier.system_attrs[CHECKPOINT_AT])
    earlier_run = earlier.user_attrs.get("mlflow_run_id")
    # an earlier run's, if that trial was itself a continuation interrupted before its own
    source = earlier.system_attrs.get(CHECKPOINT_RUN) or earlier_run
    # the pruner sees the whole curve: Optuna's per-epoch values, or the sweeper's (CURVE)
    for s, value in sorted(earlier.intermediate_values.items()):
        if s <= step:
            storage.set_trial_intermediate_value(trial._trial_id, s, value)
    if CURVE in earlier.system_attrs:
        kept = {k: v for k, v in earlier.system_attrs[CURVE].items() if int(k) <= step}
        storage.set_trial_system_attr(trial._trial_id, CURVE, kept)
    # interrupted again before its first checkpoint, this one continues from the same
    storage.set_trial_system_attr(trial._trial_id, CHECKPOINT_RUN, source)
    storage.set_trial_system_attr(trial._trial_id, CHECKPOINT_AT, step)
    if earlier_run:
        copy_history(client, earlier_run, run_id, step)
        client.set_tag(run_id, "continues_run", earlier_run)
    client.set_tag(run_id, "continues_trial", str(number))
    return {job.ENV_CONTINUE_RUN: source or "", job.ENV_CONTINUE_STEP: str(step)}


def copy_history(client: Any, source: str, target: str, step: int) -> None:
    """The earlier run's metrics up to `step`, so the continuing run carries the whole curve."""
    metrics: list[Metric] = []
    for key in client.get_run(source).data.metrics:
        metrics += [m for m in client.get_metric_history(source, key) if m.step <= step]
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(target, metrics=metrics[start : start + 1000])


def tidy_checkpoints(client: Any, study: optuna.Study, trial_id: int, keep: bool) -> None:
    """A finished trial's checkpoints: all removed, or (keep) only each run's last one kept.

    A trial that continued others also tidies the checkpoints of those it continued.
    """
    trial = study._storage.get_trial(trial_id)
    runs, number = [trial], trial.user_attrs.get(CONTINUES)
    while number is not None:  # the chain of trials it continues
        runs.append(study.get_trials(deepcopy=False)[number])
        number = runs[-1].user_attrs.get(CONTINUES)
    for each in runs:
        run_id = each.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        last = job.checkpoint_artifact(each.system_attrs.get(CHECKPOINT_AT, -1))
        try:
            files = [f.path for f in client.list_artifacts(run_id, job.CHECKPOINT_DIR)]
            if not files:
                continue
            repository = artifact_repository(client, run_id)
            if not keep:
                repository.delete_artifacts(job.CHECKPOINT_DIR)  # the folder with its files
            for path in files if keep else []:
                if path != last:
                    repository.delete_artifacts(path)
        except Exception as err:  # a store that cannot delete: the files stay, the sweep goes on
            log.warning("could not remove the checkpoints of run %s: %s", run_id, err)


def drop_older(run_id: str, step: int) -> None:
    """A training run's checkpoints other than that of `step` (which is recorded by now)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()  # the job's own: the sweeper's tracking URI, in the environment
    keep = job.checkpoint_artifact(step)
    try:
        older = [f.path for f in client.list_artifacts(run_id, job.CHECKPOINT_DIR)]
        older = [path for path in older if path != keep]
        if older:
            repository = artifact_repository(client, run_id)
            for path in older:
                repository.delete_artifacts(path)
    except Exception as err:  # a store that cannot delete: the sweep's end tidies, or not
        log.warning("could not remove older checkpoints of run %s: %s", run_id, err)


def artifact_repository(client: Any, run_id: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(client.get_run(run_id).info.artifact_uri)
