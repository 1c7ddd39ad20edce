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
from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import contract, keys
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.storage.studies import enqueue_once
from mlflow_study_sweeper.tracking import lifecycle
from mlflow_study_sweeper.tracking.offline import TrackingOffline

log = logging.getLogger(__name__)

# how a trial stopped that may continue: its worker died, a signal, the time budget
CONTINUABLE = ("orphaned", "interrupted", "time_budget")


def continuable(trial: FrozenTrial) -> bool:
    return (
        trial.state == TrialState.FAIL
        and keys.failure(trial) in CONTINUABLE
        and keys.checkpoint_step(trial) is not None
        and not keys.is_imported(trial)
    )


def enqueue_continuations(study: optuna.Study, trials: list[FrozenTrial]) -> list[str]:
    """Enqueue, once each, a trial that continues every interrupted trial with a checkpoint."""
    waiting = [t for t in trials if continuable(t)]
    if not waiting:
        return []
    notes = []
    for trial in waiting:
        mark = keys.CONTINUED.format(number=trial.number)
        if not enqueue_once(study, mark, trial.params, {keys.CONTINUES: trial.number}):
            continue
        notes.append(
            f"trial {trial.number} was interrupted after epoch {keys.checkpoint_step(trial) + 1}: "
            f"a new trial with its parameters continues from that checkpoint"
        )
    return notes


def prepare(study: optuna.Study, client: Any, trial: optuna.Trial, run_id: str) -> dict[str, str]:
    """For a trial that continues another: its curve so far, tags; the job's environment."""
    number = keys.continues(trial)
    if number is None:
        return {}
    trial_id = optuna_internals.trial_id(trial)
    earlier = study.get_trials(deepcopy=False)[number]
    step = keys.checkpoint_step(earlier)
    earlier_run = keys.run_id(earlier)
    # an earlier run's, if that trial was itself a continuation interrupted before its own
    source = earlier.system_attrs.get(keys.CHECKPOINT_RUN) or earlier_run
    # the pruner sees the whole curve: Optuna's per-epoch values, or the sweeper's (CURVE)
    for s, value in sorted(earlier.intermediate_values.items()):
        if s <= step:
            optuna_internals.set_intermediate_value(study, trial_id, s, value)
    if keys.CURVE in earlier.system_attrs:
        kept = {k: v for k, v in earlier.system_attrs[keys.CURVE].items() if int(k) <= step}
        optuna_internals.set_trial_system_attr(study, trial_id, keys.CURVE, kept)
    # interrupted again before its first checkpoint, this one continues from the same
    optuna_internals.set_trial_system_attr(study, trial_id, keys.CHECKPOINT_RUN, source)
    optuna_internals.set_trial_system_attr(study, trial_id, keys.CHECKPOINT_AT, step)
    if earlier_run:
        try:
            lifecycle.copy_history(client, earlier_run, run_id, step)
        except TrackingOffline:  # the tracking server is away: the curve starts at step + 1
            log.warning(
                "run %s's curve up to epoch %d is not copied: MLflow is away", earlier_run, step + 1
            )
        client.set_tag(run_id, keys.CONTINUES_RUN, earlier_run)
    client.set_tag(run_id, keys.CONTINUES_TRIAL, str(number))
    return {contract.CONTINUE_RUN: source or "", contract.CONTINUE_STEP: str(step)}


def tidy_checkpoints(client: Any, study: optuna.Study, trial: FrozenTrial, keep: bool) -> None:
    """A finished trial's checkpoints: all removed, or (keep) only each run's last one kept.

    A trial that continued others also tidies the checkpoints of those it continued. A trial
    that never saved one costs nothing here.
    """
    chain, number = [trial], keys.continues(trial)
    while number is not None:  # the chain of trials it continues
        chain.append(study.get_trials(deepcopy=False)[number])
        number = keys.continues(chain[-1])
    runs = {
        keys.run_id(t): keys.checkpoint_step(t)
        for t in chain
        if keys.run_id(t) and keys.checkpoint_step(t) is not None
    }
    lifecycle.tidy_checkpoints(client, runs, keep)
