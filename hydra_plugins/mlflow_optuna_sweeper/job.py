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
nothing. Imported by Hydra's plugin scan, so it imports only the standard library.
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


@dataclass(frozen=True)
class TrialInfo:
    study_name: str
    trial_id: int
    number: int
    run_id: str | None


class Reporter(Protocol):
    def report(self, value: float, step: int, total: int | None) -> bool: ...


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
    reporter = _IN_PROCESS.get(trial.trial_id)
    if reporter is None:  # a launcher that runs jobs in another process: through the storage
        from hydra_plugins.mlflow_optuna_sweeper._study import StorageReporter

        reporter = _IN_PROCESS.setdefault(trial.trial_id, StorageReporter.from_environment(trial))
    return reporter.report(float(value), int(step), total)


def __getattr__(name: str) -> Any:
    if name == "PruningCallback":  # Lightning is imported only by jobs that ask for it
        from hydra_plugins.mlflow_optuna_sweeper._lightning import PruningCallback

        return PruningCallback
    raise AttributeError(name)
