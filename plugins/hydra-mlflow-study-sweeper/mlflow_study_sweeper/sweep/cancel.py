"""`hydra.sweeper.cancel=true`: a running sweep stops early, its end done once, from any shell.

The same command with one setting added writes a mark into the study's own system attributes
(nothing else is created). Every worker of the sweep, on any backend, reads that mark every
POLL_S seconds (`Watch`): a job in the worker's process stops its trial at its next epoch,
checkpointed, as for a Slurm task's time limit; no worker starts another trial; once no trial
of the study is running, the sweep ends as it would at n_trials (the best run tagged, its model
registered, the parent run FINISHED with sweep.state=cancelled), exactly once across workers
(end.claim). The sweep's own command, run again, takes the mark away and resumes: the stopped
trials continue from their checkpoints.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import optuna
from optuna.trial import TrialState

from mlflow_study_sweeper import console, keys
from mlflow_study_sweeper.errors import mask_url
from mlflow_study_sweeper.storage import liveness, optuna_internals
from mlflow_study_sweeper.sweep import status
from mlflow_study_sweeper.sweep.status import StatusPlan

POLL_S = 2.0  # how often a worker reads the mark; every worker has seen it this long after


def asked(study: optuna.Study) -> dict[str, Any] | None:
    """The mark, or None: who asked (host, pid) and when (`at`)."""
    found = optuna_internals.study_system_attrs(study).get(keys.CANCEL)
    return found or None


def ask(plan: StatusPlan, now: float | None = None) -> str:
    """Mark the sweep's study as cancelled; the line a person reads."""
    study = status.load(plan)
    try:
        trials = study.get_trials(deepcopy=False)
        finished = console.finished(trials)
        if finished >= plan.n_trials:
            return (
                f"Sweep {plan.name} in {mask_url(plan.url)} has {finished}/{plan.n_trials} "
                f"finished trials: nothing to cancel."
            )
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        mark = {**liveness.worker_label(), "at": time.time() if now is None else now}
        optuna_internals.set_study_system_attr(study, keys.CANCEL, mark)
    finally:
        optuna_internals.close(study)  # a server's connection is not left open
    trials_text = f"{running} running trial" + ("" if running == 1 else "s")
    return (
        f"Cancel asked of sweep {plan.name} ({finished}/{plan.n_trials} finished, {trials_text}): "
        f"within {POLL_S:.0f} s its workers stop their trials at the next epoch, checkpointed, "
        f"and start no other; once none trains, the sweep ends with the trials it has (the best "
        f"run tagged, its model registered), once. Watch it with the same command and "
        f"hydra.sweeper.status=true; rerun the sweep's command to resume it. (A sweep with no "
        f"worker left is only marked: its rerun resumes it.)"
    )


def withdraw(study: optuna.Study) -> bool:
    """The sweep's command, run again, resumes a cancelled sweep: the mark goes; True if there
    was one."""
    if asked(study) is None:
        return False
    optuna_internals.set_study_system_attr(study, keys.CANCEL, None)
    return True


class Watch:
    """Sets `cancelled` once the study carries the mark: read now, then every POLL_S seconds,
    in a thread of its own (no read per trial). A read that fails (an outage) is tried again at
    the next poll; the outage itself is the loop's to meet."""

    def __init__(self, study: optuna.Study, cancelled: threading.Event) -> None:
        self.study = study
        self.cancelled = cancelled
        self.seen_at: float | None = None  # time.monotonic() when this process saw the mark
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> None:
        with contextlib.suppress(Exception):
            if asked(self.study) is not None and not self.cancelled.is_set():
                self.seen_at = time.monotonic()
                self.cancelled.set()

    def settled(self) -> bool:
        """Every worker has seen the mark by now: a trial one of them asked for before it did
        is RUNNING in the study, so no running trial means none will start."""
        return self.seen_at is not None and time.monotonic() - self.seen_at > POLL_S + 1.0

    def _poll(self) -> None:
        while not self.cancelled.is_set() and not self._stop.wait(POLL_S):
            self.look()

    def __enter__(self) -> Watch:
        self.look()  # a worker that starts after the cancel asks for no trial
        if not self.cancelled.is_set():
            self._thread = threading.Thread(target=self._poll, daemon=True, name="cancel-watch")
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=POLL_S + 1)
