"""What a job (one trial) may use, without knowing the sweeper: its trial, and pruning reports.

A job needs none of this to be swept: it returns a float, and logs to MLflow the usual way
(`mlflow.start_run()` resumes the trial's run, which the sweeper hands over as MLFLOW_RUN_ID).
To be pruned, it reports a value per epoch:

    from hydra_plugins.mlflow_optuna_sweeper.job import report

    for epoch in range(epochs):
        ...
        if report(val_acc, step=epoch, total=epochs):
            break  # the pruner stopped this trial; return the last value as usual

or, in Lightning, passes `PruningCallback("val_acc")` to the Trainer. Outside a sweep both do
nothing.

To continue after its worker was killed, preempted or stopped by the time budget instead of
starting over, a job saves its state after each epoch into its run as
`checkpoint_artifact(epoch)` and then calls `checkpoint_saved(epoch)`; when `continues()`
returns a Continuation, it loads that run's checkpoint and trains the epochs after it (the
sweeper has already put the earlier epochs' values on the new trial and its run).

Imported by Hydra's plugin scan, so it imports only the standard library.
"""

# no `from __future__ import annotations`: Hydra's scan runs this module before it is in
# sys.modules, where dataclasses would look its string annotations up
import os
from dataclasses import dataclass
from typing import Any, Protocol

# set per job through hydra.job.env_set, so they reach a job in any launcher's process
ENV_STUDY = "SWEEP_STUDY_NAME"
ENV_TRIAL_ID = "SWEEP_TRIAL_ID"
ENV_TRIAL_NUMBER = "SWEEP_TRIAL_NUMBER"
# set in the sweeper's own environment (inherited by launcher processes, never on a command line)
ENV_STORAGE = "SWEEP_STORAGE_URL"
ENV_PRUNER = "SWEEP_PRUNER"
ENV_DEADLINE = "SWEEP_DEADLINE"  # the time budget's end, in seconds since the epoch
# set per job for a trial that continues an interrupted one
ENV_CONTINUE_RUN = "SWEEP_CONTINUE_RUN_ID"
ENV_CONTINUE_STEP = "SWEEP_CONTINUE_STEP"
CHECKPOINT_DIR = "resume"  # a run's checkpoints, under its artifacts; the sweeper tidies them


@dataclass(frozen=True)
class TrialInfo:
    study_name: str
    trial_id: int
    number: int
    run_id: str | None


@dataclass(frozen=True)
class Continuation:
    run_id: str  # the interrupted trial's run, which holds the checkpoint
    step: int  # the last step (epoch) the checkpoint holds: training goes on at step + 1


class Reporter(Protocol):
    def report(self, value: float, step: int, total: "int | None") -> bool: ...

    def checkpoint_saved(self, step: int) -> None: ...


# trials of a sweep that runs its jobs in this very process: reports skip the storage round trip
_IN_PROCESS: dict[int, Reporter] = {}


def current_trial() -> TrialInfo | None:
    """The trial this job is, or None outside a sweep."""
    if ENV_TRIAL_ID not in os.environ:
        return None
    return TrialInfo(
        study_name=os.environ[ENV_STUDY],
        trial_id=int(os.environ[ENV_TRIAL_ID]),
        number=int(os.environ[ENV_TRIAL_NUMBER]),
        run_id=os.environ.get("MLFLOW_RUN_ID"),
    )


def report(value: float, step: int, total: "int | None" = None) -> bool:
    """Record `value` at `step` (an epoch, from 0) for this trial; True when it should stop.

    The pruner configured in hydra.sweeper decides. A trial told to stop is recorded as PRUNED
    whatever the job returns afterwards. A NaN or infinite value is not recorded. `total` (the
    number of steps planned) only improves the progress line.
    """
    trial = current_trial()
    if trial is None:
        return False
    return _reporter(trial).report(float(value), int(step), total)


def _reporter(trial: TrialInfo) -> Reporter:
    reporter = _IN_PROCESS.get(trial.trial_id)
    if reporter is None:  # a launcher that runs jobs in another process: through the storage
        from hydra_plugins.mlflow_optuna_sweeper._study import StorageReporter

        reporter = _IN_PROCESS.setdefault(trial.trial_id, StorageReporter.from_environment(trial))
    return reporter


def checkpoint_artifact(step: int) -> str:
    """Where in its run a job stores the checkpoint of `step`, e.g. resume/epoch-3.ckpt."""
    return f"{CHECKPOINT_DIR}/epoch-{step}.ckpt"


def checkpoint_saved(step: int) -> None:
    """Tell the sweep that the run now holds `checkpoint_artifact(step)`, complete.

    Call it after the upload: a trial interrupted later continues from this step.
    """
    trial = current_trial()
    if trial is not None:
        _reporter(trial).checkpoint_saved(int(step))


def continues() -> "Continuation | None":
    """The checkpoint this trial starts from, when it continues an interrupted one."""
    run_id = os.environ.get(ENV_CONTINUE_RUN)
    if current_trial() is None or not run_id:
        return None
    return Continuation(run_id=run_id, step=int(os.environ[ENV_CONTINUE_STEP]))


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":  # Lightning is imported only by jobs that ask for it
        from hydra_plugins.mlflow_optuna_sweeper._lightning import PruningCallback

        return PruningCallback
    raise AttributeError(name)
