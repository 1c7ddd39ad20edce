"""Every key the sweeper writes into a study or an MLflow run, each once, with its accessors.

Trial and study attributes are stored in users' studies: changing a value here breaks resuming
a study made before the change. (The `mlflow_optuna.` prefix predates the package's name.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

# ---- trial system attributes --------------------------------------------------------------------
WORKER = "worker"  # {"host": machine key, "pid": "123"}: who trains it
LEGACY_WORKER_HOST, LEGACY_WORKER_PID = "worker_host", "worker_pid"  # before WORKER
FAILURE = "failure"  # why a trial is FAIL: error, timeout, interrupted, orphaned, time_budget...
TRANSIENT = "transient"  # ... or a listed error with attempts left: it is tried again
PRUNED_AT = "pruned_at_step"
STOPPED_AT = "stopped_by_budget_at_step"
EPOCH_CLOCK = "epoch_clock"  # under a time budget: when a trial's first and last report came
CHECKPOINT_AT = "checkpoint_step"  # the last step the job's checkpoint holds
CHECKPOINT_RUN = "checkpoint_run"  # the run that holds it (an earlier one, for a continuation)
CURVE = "curve"  # a multi-objective trial's first objective per step (Optuna refuses report())

# ---- trial user attributes (shown by optuna-dashboard) ------------------------------------------
RUN_ID = "mlflow_run_id"
FAIL_REASON = "fail_reason"
CONTINUES = "continues_trial"  # the number of the interrupted trial this one continues
RETRY_OF = "retry_of_trial"  # the number of the failed trial this one tries again
ATTEMPT = "attempt"  # 1 for a first try, 2 for the first retry, ...
IMPORTED = "imported_from"  # "<source>#<number>": a warm start's trial, prior knowledge only
IMPORTED_RUN = "imported_run_id"

# ---- study attributes ---------------------------------------------------------------------------
PARENT_RUN = "mlflow_parent_run_id"  # a user attribute: the sweep's parent run
CREATOR = "mlflow_optuna.creator"  # system: the worker that created the study (and its parent)
SEEDED = "mlflow_optuna.seeded"  # system: enqueue and warm start were done, once
RETRIED = "mlflow_optuna.retried.{number}"  # system: this trial's next attempt is enqueued
CONTINUED = "mlflow_optuna.continued.{number}"  # system: this trial's continuation is enqueued
END_CLAIM = "mlflow_optuna.end.{finished}"  # system: the end at this many finished trials
END_CLAIM_PREFIX = END_CLAIM.split("{", 1)[0]
# system: hydra.sweeper.cancel=true asked the sweep to stop ({host, pid, at}; null: resumed)
CANCEL = "mlflow_optuna.cancel"

# ---- MLflow tags --------------------------------------------------------------------------------
ROLE = "sweep.role"
PARENT_ROLE, TRIAL_ROLE = "sweep", "trial"
SWEEP_STATE = "sweep.state"
STUDY_NAME = "optuna.study_name"
TRIAL_NUMBER = "optuna.trial_number"
STATE = "optuna.state"
FAILURE_REASON = "failure_reason"
BEST_RUN = "best_run"
PARETO_FRONT = "pareto_front"
PRUNED_AT_EPOCH = "pruned_at_epoch"
STOPPED_BY = "stopped_by"
CONTINUES_RUN = "continues_run"
CONTINUES_TRIAL = "continues_trial"
RETRY_OF_RUN = "retry_of"  # on a retry's run: the run of the attempt it repeats
ATTEMPT_TAG = "attempt"
BEST_RUN_ID = "best_run_id"
BEST_TRIAL = "best_trial"
BEST_PARAM = "best.{key}"  # a tag (always current) and a param (the first finish's) per key
PUBLISH_ERROR = "publish_error"
MODEL_VERSION = "model_version"
TRIAL_COUNT = "trials.{state}"  # complete, pruned, failed, retried (failed, then tried again)
STOPPED_BY_BUDGET = "stopped_by_budget"
END_OF_VERSION = "sweep.end"  # on a model version: the sweep end that registered it
# the id a sweep process gave a run it created: found again if the server made the run but its
# answer was lost, and the run's id until it exists when the server was away (see _relay)
CLIENT_KEY = "sweep.client_key"

# ---- MLflow params and metrics of the parent run ------------------------------------------------
SWEEPER_PARAM = "sweeper.{name}"
SEARCH_PARAM = "search.{key}"
BEST_METRIC = "best_{name}"
TIME_BUDGET, TIME_USED = "time_budget_s", "time_used_s"

# what each final trial state leaves on its run
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
# a trial stopped by a signal or by the budget did not fail on its own: its run is KILLED
KILLED_FAILURES = ("interrupted", "time_budget")


# ---- accessors ----------------------------------------------------------------------------------
def config_key(name: str) -> str:
    """A searched parameter's key in the config and in its MLflow run: its Optuna name without
    Hydra's `+` or `++` (`+w`, a key the config lacks, is suggested as Hydra's optuna sweeper
    has it; MLflow refuses `+` in a param's name)."""
    return name.lstrip("+")


def run_id(trial: FrozenTrial) -> str | None:
    """The trial's run as the trial records it (a provisional id while the tracking server was
    away and the study could not be told its real one: tracking.lifecycle.SweepRuns.run_id)."""
    return trial.user_attrs.get(RUN_ID)


def failure(trial: FrozenTrial) -> str | None:
    return trial.system_attrs.get(FAILURE)


def fail_reason(trial: FrozenTrial) -> str:
    return trial.user_attrs.get(FAIL_REASON, "unknown")


def is_imported(trial: FrozenTrial) -> bool:
    return IMPORTED in trial.user_attrs


def worker(trial: FrozenTrial) -> tuple[str | None, str | None]:
    """(machine key, pid) of the worker that trains it, or (None, None) if none took it yet."""
    attrs = trial.system_attrs
    label = attrs.get(WORKER)
    if label:
        return label.get("host"), label.get("pid")
    return attrs.get(LEGACY_WORKER_HOST), attrs.get(LEGACY_WORKER_PID)


def checkpoint_step(trial: FrozenTrial) -> int | None:
    step = trial.system_attrs.get(CHECKPOINT_AT)
    return None if step is None else int(step)


def continues(trial: Any) -> int | None:
    """The number of the interrupted trial this (frozen or live) trial continues, if any."""
    return trial.user_attrs.get(CONTINUES)


def curve(trial: FrozenTrial) -> dict[int, float]:
    """A trial's per-step values: Optuna's (one objective) or the sweeper's (several)."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    return {int(step): value for step, value in trial.system_attrs.get(CURVE, {}).items()}


def run_status(trial: FrozenTrial) -> str | None:
    """The MLflow status a finished trial's run must have (None while it runs)."""
    if failure(trial) in KILLED_FAILURES:
        return "KILLED"
    return RUN_STATUS.get(trial.state.name)
