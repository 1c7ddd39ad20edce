"""The job contract: every environment variable between the sweeper, its workers and a job.

A job learns which trial it is, where the study lives and how to continue from these; the
sweeper's own worker processes learn their role. Standard library only: `job.py`, which Hydra's
plugin scan imports, reads it.
"""

# no `from __future__ import annotations`: job.py re-exports these dataclasses, and Hydra's scan
# runs job.py before it is in sys.modules, where dataclasses would look string annotations up
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# -- set per job through hydra.job.env_set, so they reach a job in any launcher's process --
STUDY = "SWEEP_STUDY_NAME"
TRIAL_ID = "SWEEP_TRIAL_ID"
TRIAL_NUMBER = "SWEEP_TRIAL_NUMBER"
CONTINUE_RUN = "SWEEP_CONTINUE_RUN_ID"  # a trial that continues an interrupted one: its run
CONTINUE_STEP = "SWEEP_CONTINUE_STEP"  # ... and the last step its checkpoint holds
# the trial's overrides (JSON): a process the job starts by running the command again (Lightning's
# DDP launcher does) runs this trial's job as one of its ranks, not a sweep (see trial.ranks)
JOB_OVERRIDES = "SWEEP_JOB_OVERRIDES"
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
# a worker in a Slurm task of backend=slurm: the task (JOB_INDEX), and when its job's time limit is
# near (seconds since the epoch, the signal's lead before the end; unset without a limit), both
# written by the task's script
SLURM_TASK = "SWEEP_SLURM_TASK"
JOB_STOP_AT = "SWEEP_JOB_STOP_AT"
# the exit status of a worker that left because its job's time limit was near: it trained what
# it could, and a fresh task takes its place while work is left (EX_TEMPFAIL)
LEFT_FOR_TIME_LIMIT = 75

# -- the named fault points of tests (see _faults.py) --
CRASH_AT = "SWEEP_CRASH_AT"
PAUSE_AT = "SWEEP_PAUSE_AT"
PAUSE_FILE = "SWEEP_PAUSE_FILE"
FAULT_ROLE = "SWEEP_FAULT_ROLE"
FAULT_ONCE = "SWEEP_FAULT_ONCE"

# -- a trial's processes: torch.distributed's own variables (torchrun sets RANK, Lightning's DDP
# launcher LOCAL_RANK and NODE_RANK), read, never written by the sweeper; written by Lightning in
# the job's process, and put back after each job (see distributed_scope) --
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")
DISTRIBUTED_VARIABLES = (*RANK_VARIABLES, "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

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


def rank() -> int:
    """This process's rank among its trial's processes: 0 for the one that reports and logs.

    torch.distributed's group once it is set up, else the standard variables: RANK (torchrun),
    or NODE_RANK and LOCAL_RANK (Lightning's DDP launcher). 0 in a job of one process.
    """
    dist = sys.modules.get("torch.distributed")  # never imported here: torch is the job's
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    if os.environ.get("RANK"):
        return int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK") or 0)
    node = int(os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or 0)
    return node * int(os.environ.get("LOCAL_WORLD_SIZE") or 1) + local if node else local


def is_rank_job() -> bool:
    """Whether this process is a further rank (>0) of a trial's job: started by the job (or by
    Lightning for it), it trains beside rank 0 and never starts a sweep, a run or a trial."""
    return TRIAL_ID in os.environ and rank() > 0


def job_overrides() -> list[str]:
    return json.loads(bytes.fromhex(os.environ.get(JOB_OVERRIDES) or "5b5d").decode())


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


def overrides_variable(overrides: list[str]) -> dict[str, str]:
    """The trial's overrides, for a rank the job starts by running the command again; as hex,
    which Hydra's env_set passes on untouched (no quoting, no ${...} resolved)."""
    return {JOB_OVERRIDES: json.dumps(overrides).encode().hex()}


JOB_VARIABLES = (
    STUDY,
    TRIAL_ID,
    TRIAL_NUMBER,
    CONTINUE_RUN,
    CONTINUE_STEP,
    JOB_OVERRIDES,
    MLFLOW_RUN_ID,
    *DISTRIBUTED_VARIABLES,
)


def without_job(env: dict[str, str]) -> dict[str, str]:
    """`env` without the variables of the job this process runs now: a worker started while a
    job runs here is no rank of that job's trial."""
    return {k: v for k, v in env.items() if k not in JOB_VARIABLES}


def is_worker() -> bool:
    return os.environ.get(WORKER) == "1"


def in_slurm_task() -> bool:
    return bool(os.environ.get(SLURM_TASK))


def job_stop_at() -> float | None:
    """In a Slurm task of backend=slurm: when its workers stop (the time limit less the lead)."""
    found = os.environ.get(JOB_STOP_AT)
    return float(found) if found else None


# ---- every write to this process's environment: here, and nowhere else ----------------------
# MLflow retries a refused request for about 4 minutes by default; the tracking relay needs to
# know within seconds that the server is away (the job then trains on instead of waiting)
MLFLOW_HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


def quiet_libraries() -> None:
    """MLflow prints "View run ... / View experiment ..." for every run on an HTTP server, and
    Ray folds repeated log lines of its workers: the sweep's own lines say what happens."""
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def shorten_mlflow_retries() -> None:
    """For the tracking relay (see MLFLOW_HTTP_RETRIES); a user's own setting is kept."""
    for name, value in MLFLOW_HTTP_RETRIES.items():
        os.environ.setdefault(name, value)


def hand_to_jobs(
    tracking_uri: str, storage_url: "str | None", outage_limit_s: float, pruner_json: str
) -> None:
    """What every job's and worker's process inherits from the sweep: where the runs and the
    study live, how long a storage call waits for its server, the pruner's settings."""
    os.environ[MLFLOW_TRACKING_URI] = tracking_uri
    if storage_url:
        os.environ[STORAGE_URL] = storage_url
        os.environ[STORAGE_OUTAGE_LIMIT] = str(outage_limit_s)
    os.environ[PRUNER] = pruner_json


def share_deadline(own: float) -> float:
    """The time budget's end: the one the sweep that started this worker chose, or `own` (then
    handed on to the workers this process starts)."""
    found = os.environ.get(DEADLINE)
    if found:
        return float(found)
    os.environ[DEADLINE] = str(own)
    return own


@contextmanager
def trial_run(run_id: str) -> "Iterator[None]":
    """MLFLOW_RUN_ID in the sweep's own environment while a trial's job runs, whatever the
    launcher. MLflow deletes the variable once it has read it, and Hydra's env_set then fails to
    delete it again (KeyError): set here too, it is restored instead of deleted (a launcher's
    worker processes, such as joblib's, inherit it); removed after the job."""
    os.environ[MLFLOW_RUN_ID] = run_id
    try:
        yield
    finally:
        os.environ.pop(MLFLOW_RUN_ID, None)


@contextmanager
def distributed_scope() -> "Iterator[None]":
    """Around a job in this process: the rank variables a job's DDP launcher writes here
    (Lightning sets MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... in its rank 0) are put back after
    it, so that the next trial, or a worker started later, does not inherit them."""
    saved = {k: os.environ.get(k) for k in DISTRIBUTED_VARIABLES}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def place_this_worker(gpu: "str | None", threads: "int | None") -> None:
    """This process's GPU (before a job first uses CUDA) and its torch threads (read when torch
    starts)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
