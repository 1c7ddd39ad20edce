"""What a job (one trial) may use, without knowing the sweeper: its trial, and pruning reports.

A job needs none of this to be swept: it returns a float, and logs to MLflow the usual way
(`mlflow.start_run()` resumes the trial's run, which the sweeper hands over as MLFLOW_RUN_ID).
To be pruned, it reports a value per epoch:

    from hydra_plugins.mlflow_study_sweeper.job import report

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

Imported by Hydra's plugin scan, so it imports only the standard library; Optuna, MLflow and
Lightning load when a job first reports.
"""

from typing import Any

from hydra_plugins.mlflow_study_sweeper._contract import (
    CHECKPOINT_DIR,
    Continuation,
    TrialInfo,
    checkpoint_artifact,
    current_trial,
)
from hydra_plugins.mlflow_study_sweeper._contract import continuation as continues

__all__ = [  # and PruningCallback, for Lightning (loaded on first use, see __getattr__)
    "CHECKPOINT_DIR",
    "Continuation",
    "TrialInfo",
    "checkpoint_artifact",
    "checkpoint_saved",
    "continues",
    "current_trial",
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
    from hydra_plugins.mlflow_study_sweeper import _trial_side

    return _trial_side.report(value, step, total)


def checkpoint_saved(step: int) -> None:
    """Tell the sweep that the run now holds `checkpoint_artifact(step)`, complete.

    Call it after the upload: a trial interrupted later continues from this step.
    """
    if current_trial() is None:
        return
    from hydra_plugins.mlflow_study_sweeper import _trial_side

    _trial_side.checkpoint_saved(step)


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":  # Lightning is imported only by jobs that ask for it
        from hydra_plugins.mlflow_study_sweeper._lightning import PruningCallback

        return PruningCallback
    raise AttributeError(name)
