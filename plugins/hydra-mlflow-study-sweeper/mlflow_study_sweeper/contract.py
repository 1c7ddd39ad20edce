"""The job contract: every environment variable between the sweeper, its workers and a job.

A job learns which trial it is, where the study lives and how to continue from these; the
sweeper's own worker processes learn their role. Standard library only: `job.py`, which Hydra's
plugin scan imports, reads it.
"""

# no `from __future__ import annotations`: job.py re-exports these dataclasses, and Hydra's scan
# runs job.py before it is in sys.modules, where dataclasses would look string annotations up
import os
from dataclasses import dataclass

# -- set per job through hydra.job.env_set, so they reach a job in any launcher's process --
STUDY = "SWEEP_STUDY_NAME"
TRIAL_ID = "SWEEP_TRIAL_ID"
TRIAL_NUMBER = "SWEEP_TRIAL_NUMBER"
CONTINUE_RUN = "SWEEP_CONTINUE_RUN_ID"  # a trial that continues an interrupted one: its run
CONTINUE_STEP = "SWEEP_CONTINUE_STEP"  # ... and the last step its checkpoint holds
# MLflow's own variables: the job's `mlflow.start_run()` resumes the trial's run
MLFLOW_RUN_ID = "MLFLOW_RUN_ID"
MLFLOW_EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"

# -- set in the sweeper's own environment: inherited by launcher and worker processes, never
# written on a command line (a URL may hold a password) --
STORAGE_URL = "SWEEP_STORAGE_URL"  # also the default of hydra.sweeper.storage
PRUNER = "SWEEP_PRUNER"  # the pruner's settings, as JSON
STORAGE_OUTAGE_LIMIT = "SWEEP_STORAGE_OUTAGE_LIMIT"  # seconds a storage call waits for a server
DEADLINE = "SWEEP_DEADLINE"  # the time budget's end, in seconds since the epoch
WORKER = "SWEEP_WORKER"  # "1" in an n_jobs worker process: it trains, it does not end the sweep
WORKER_ARG = "SWEEP_ARG_{index}"  # a worker's command-line argument that held a password
JOURNAL_DIR = "SWEEP_JOURNAL_DIR"  # where writes wait for an unreachable tracking server
HOST_ID = "SWEEP_HOST_ID"  # names this machine explicitly (containers that share boot ids)

# -- the named fault points of tests (see _faults.py) --
CRASH_AT = "SWEEP_CRASH_AT"
PAUSE_AT = "SWEEP_PAUSE_AT"
PAUSE_FILE = "SWEEP_PAUSE_FILE"
FAULT_ROLE = "SWEEP_FAULT_ROLE"
FAULT_ONCE = "SWEEP_FAULT_ONCE"

CHECKPOINT_DIR = "resume"  # a run's checkpoints, under its artifacts; the sweeper tidies them


@dataclass(frozen=True)
class TrialInfo:
    study_name: str
    trial_id: int
    number: int
    run_id: "str | None"


@dataclass(frozen=True)
class Continuation:
    run_id: str  # the interrupted trial's run, which holds the checkpoint
    step: int  # the last step (epoch) the checkpoint holds: training goes on at step + 1


def current_trial() -> "TrialInfo | None":
    """The trial this job is, or None outside a sweep."""
    if TRIAL_ID not in os.environ:
        return None
    return TrialInfo(
        study_name=os.environ[STUDY],
        trial_id=int(os.environ[TRIAL_ID]),
        number=int(os.environ[TRIAL_NUMBER]),
        run_id=os.environ.get(MLFLOW_RUN_ID),
    )


def continuation() -> "Continuation | None":
    """The checkpoint this trial starts from, when it continues an interrupted one."""
    run_id = os.environ.get(CONTINUE_RUN)
    if current_trial() is None or not run_id:
        return None
    return Continuation(run_id=run_id, step=int(os.environ[CONTINUE_STEP]))


def checkpoint_artifact(step: int) -> str:
    """Where in its run a job stores the checkpoint of `step`, e.g. resume/epoch-3.ckpt."""
    return f"{CHECKPOINT_DIR}/epoch-{step}.ckpt"


def job_environment(
    run_id: str, experiment_id: str, study_name: str, trial_id: int, number: int
) -> dict[str, str]:
    """What a trial's job finds in its environment (plus a continuation's two, see _resume)."""
    return {
        MLFLOW_RUN_ID: run_id,
        MLFLOW_EXPERIMENT_ID: experiment_id,
        STUDY: study_name,
        TRIAL_ID: str(trial_id),
        TRIAL_NUMBER: str(number),
    }


def is_worker() -> bool:
    return os.environ.get(WORKER) == "1"
