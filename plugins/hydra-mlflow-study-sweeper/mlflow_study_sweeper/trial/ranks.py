"""A trial whose job trains in several processes (DDP): its further ranks, the pruner's decision
shared with them, and none of them left behind.

Rank 0 is the job the sweeper runs: it alone reports, logs to the trial's run and saves
checkpoints. The job starts the other ranks itself: Lightning's DDP launcher runs the command
line again with LOCAL_RANK set (under Hydra, `sweep.py -m ...` plus its own overrides), torchrun
or torch.multiprocessing start workers with RANK set. Each inherits the trial's variables
(contract.job_environment). A command started again this way runs the trial's job once, as that
rank (`run_rank_job`): no sweep, no MLflow run, no Optuna trial, no .hydra files.

`report()` is a collective once torch.distributed is set up: every rank calls it at the same
step, rank 0 asks the pruner, and every rank gets rank 0's answer (`share_decision`), so all
stop at the same epoch. After the job, the processes it started that still carry its trial's id
are waited for briefly and then killed (`trial_processes`), and a process group it left set up
here is closed, so the next trial in this process starts afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus, run_job
from omegaconf import DictConfig, OmegaConf, open_dict

from mlflow_study_sweeper import contract

# how long the ranks of a job that ended well get to exit on their own (their fit ends with rank
# 0's, then the interpreter's shutdown); a failed job's are killed at once
RANKS_EXIT_S = 60.0


def die_with_parent() -> None:
    """SIGKILL this process when the one that started it dies (Linux): a rank whose rank 0 was
    killed would otherwise wait in a collective until the group's timeout."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_rank_job(hydra_context: Any, task_function: Any, config: DictConfig) -> None:
    """The command started again as a further rank of a trial: its job, once, in the trial's
    folder, with the trial's overrides; its log is `<hydra.job.name>.log` there (Lightning names
    it train_ddp_process_<rank>), not the console, and the trial's .hydra files stay rank 0's."""
    die_with_parent()
    cfg = hydra_context.config_loader.load_sweep_config(config, contract.job_overrides())
    with open_dict(cfg):
        number = int(os.environ[contract.TRIAL_NUMBER])
        cfg.hydra.job.id = number
        cfg.hydra.job.num = number
        cfg.hydra.output_subdir = None
        root = OmegaConf.select(cfg, "hydra.job_logging.root")
        if root is not None and "file" in (root.get("handlers") or []):
            root.handlers = ["file"]  # its lines in its log file; the console is the sweep's
    ret = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=cfg,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    if ret.status == JobStatus.FAILED:
        raise ret._return_value  # the trial fails through rank 0, which loses its peer
    # its work is done and written: rank 0 waits for this process to exit, and the
    # interpreter's teardown of torch and the other imports took seconds here
    close_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def process_group() -> Any:
    """torch.distributed, when this process is in a group of more than one; else None."""
    dist = sys.modules.get("torch.distributed")  # the job's torch; never imported here
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist if dist.get_world_size() > 1 else None


def share_decision(decision: bool) -> bool:
    """Rank 0's decision, on every rank of the job's group (as is, without a group)."""
    dist = process_group()
    if dist is None:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def close_process_group() -> None:
    """A group the job left set up in this process (Lightning closes only NCCL's, at exit): the
    next trial's job would find it and train with ranks that are gone."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ---- the processes a job started: found by its trial's id in their environment -------------


def children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo += children(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; its parent has yet to read it


def of_trial(pid: int, trial_id: int) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{contract.TRIAL_ID}={trial_id}".encode() in environ


def trial_ranks(trial_id: int) -> list[int]:
    """The live processes below this one that carry `trial_id`: the ranks its job started."""
    return [p for p in descendants(os.getpid()) if alive(p) and of_trial(p, trial_id)]


def end_ranks(trial_id: int, grace_s: float) -> list[int]:
    """Wait up to `grace_s` for the job's ranks to exit, then SIGKILL those left; their pids."""
    left = trial_ranks(trial_id)
    deadline = time.monotonic() + grace_s
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in left:  # read a child's exit, so that it does not stay a zombie
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    return left


class TrialProcesses:
    """Around a job in this process: afterwards the process group it left is closed, its ranks
    get RANKS_EXIT_S to exit when it `completed` (at once otherwise) and are then killed, and
    the variables its launcher wrote are put back. On Linux (/proc); elsewhere only the
    group and the variables."""

    def __init__(self, trial_id: int) -> None:
        self.trial_id = trial_id
        self.completed = False
        self.scope = contract.distributed_scope()

    def __enter__(self) -> TrialProcesses:
        self.scope.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            close_process_group()  # rank 0's side of the group first: the others' may go
            if sys.platform.startswith("linux"):
                end_ranks(self.trial_id, RANKS_EXIT_S if self.completed else 0.0)
        finally:
            self.scope.__exit__(*exc)
