"""Named fault points, for tests: a process kills itself, or waits, at an exact moment.

A test that must kill a sweep "between the job's end and tell" cannot time a signal:
- SWEEP_CRASH_AT=<point>[:<n>] SIGKILLs the process the n-th time (default 1) it passes <point>;
- SWEEP_PAUSE_AT=<point>[:<n>] writes the file named by SWEEP_PAUSE_FILE there and then waits
  (up to 10 minutes, or until the test deletes that file), so that the test can send a signal,
  or stop a server, at a moment it knows.
Both are read from the environment each time, and count passes per process. With
SWEEP_FAULT_ROLE=worker (or main, or rank) only the n_jobs worker processes (or only the first
process, or only the further ranks of a trial's job, see trial.ranks) act on them; with
SWEEP_FAULT_ONCE=<file> only the first process to reach the point does (it creates that file),
so a replacement worker does not fail the same way.
"""

import os
import signal
import time
from pathlib import Path

from mlflow_study_sweeper import contract

_passes: dict[str, int] = {}


def _hit(variable: str, name: str) -> bool:
    wanted = os.environ.get(variable)
    if not wanted:
        return False
    role = os.environ.get(contract.FAULT_ROLE)
    if role and role != own_role():
        return False
    point, _, nth = wanted.partition(":")
    if point != name:
        return False
    key = f"{variable}:{name}"
    _passes[key] = _passes.get(key, 0) + 1
    if _passes[key] != int(nth or 1):
        return False
    once = os.environ.get(contract.FAULT_ONCE)
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    return True


def own_role() -> str:
    if contract.is_rank_job():
        return "rank"
    return "worker" if contract.is_worker() else "main"


def crash_point(name: str) -> None:
    if _hit(contract.CRASH_AT, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _hit(contract.PAUSE_AT, name):
        pause_file = Path(os.environ[contract.PAUSE_FILE])
        pause_file.write_text(str(os.getpid()))
        deadline = time.monotonic() + 600
        # a signal handler's exception ends the wait, as does the file's removal
        while time.monotonic() < deadline and pause_file.exists():
            time.sleep(0.1)
