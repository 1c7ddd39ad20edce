"""What a job (one trial) may use, without knowing the sweeper: its trial, and pruning reports.

A job needs none of this to be swept: it returns a float, and logs to MLflow the usual way
(`mlflow.start_run()` resumes the trial's run, which the sweeper hands over as MLFLOW_RUN_ID).
To be pruned, it reports a value per epoch:

    from mlflow_study_sweeper import report

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

A job that trains in several processes (DDP) reports from every rank at the same step (rank 0
records, every rank gets its decision), and logs, saves checkpoints and continues on rank 0
alone: `rank()` says which rank a process is (see trial/ranks.py).

This package is also the sweeper's core (its subpackages: sweep, trial, backends, storage,
tracking, end, search; see the README's "Inside"). Importing it loads the standard library
only: Optuna, MLflow and Lightning load when a job first reports. The Hydra plugin
(`hydra_plugins.mlflow_study_sweeper`) is the thin facade Hydra finds; its `job` module
re-exports this one.
"""

from typing import Any

from mlflow_study_sweeper.contract import (
    CHECKPOINT_DIR,
    Continuation,
    TrialInfo,
    checkpoint_artifact,
    current_trial,
    rank,
)
from mlflow_study_sweeper.contract import continuation as continues

__all__ = [  # and PruningCallback, for Lightning (loaded on first use, see __getattr__)
    "CHECKPOINT_DIR",
    "Continuation",
    "PruningCallback",
    "TrialInfo",
    "checkpoint_artifact",
    "checkpoint_saved",
    "continues",
    "current_trial",
    "rank",
    "report",
]


def report(value: float, step: int, total: "int | None" = None) -> bool:
    """Record `value` at `step` (an epoch, from 0) for this trial; True when it should stop.

    The pruner configured in hydra.sweeper decides. A trial told to stop is recorded as PRUNED
    whatever the job returns afterwards. A NaN or infinite value is not recorded. `total` (the
    number of steps planned) only improves the progress line.
    """
    if current_trial() is None:
        return False
    from mlflow_study_sweeper.trial import job_side

    return job_side.report(value, step, total)


def checkpoint_saved(step: int) -> None:
    """Tell the sweep that the run now holds `checkpoint_artifact(step)`, complete.

    Call it after the upload: a trial interrupted later continues from this step.
    """
    if current_trial() is None:
        return
    from mlflow_study_sweeper.trial import job_side

    job_side.checkpoint_saved(step)


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":  # Lightning is imported only by jobs that ask for it
        from mlflow_study_sweeper.trial.lightning import PruningCallback

        return PruningCallback
    raise AttributeError(name)
