"""What runs in the job's process: its per-epoch reports and its checkpoints, told to the study.

A job in the sweeper's own process (Hydra's basic launcher) gets the reporter the loop made for
its trial; a job in another process (joblib, submitit, a worker elsewhere) opens the study
through the storage named in its environment.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial

from mlflow_study_sweeper import contract, keys
from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.search.objectives import FirstObjective, with_curve
from mlflow_study_sweeper.search.samplers import make_pruner
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.storage.studies import make_storage, optuna_quietly
from mlflow_study_sweeper.tracking.lifecycle import drop_older_checkpoints
from mlflow_study_sweeper.trial import ranks


class Progress(Protocol):
    def __call__(self, number: int, value: float, step: int, total: int | None, prune: bool): ...


@dataclass(frozen=True)
class Decisions:
    """What a job's reports decided: pruned, stopped by the budget, a checkpoint saved."""

    pruned_at: int | None = None
    stopped_at: int | None = None
    checkpoint_at: int | None = None

    @classmethod
    def of(cls, trial: FrozenTrial) -> Decisions:
        attrs = trial.system_attrs
        return cls(
            attrs.get(keys.PRUNED_AT), attrs.get(keys.STOPPED_AT), attrs.get(keys.CHECKPOINT_AT)
        )


class TrialReporter:
    """A job's per-epoch reports: to the trial, through the pruner, and to the console.

    What it decided is kept, so that the loop of the same process need not read it back.
    """

    def __init__(
        self,
        study: optuna.Study,
        trial_id: int,
        progress: Progress | None = None,
        trial: optuna.Trial | None = None,
        leaving: threading.Event | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        self.study = study
        # set when this worker's Slurm job nears its time limit, or when the sweep is cancelled
        # (hydra.sweeper.cancel=true): stop at this epoch
        self.leaving = leaving
        self.cancelled = cancelled
        self.trial_id = trial_id
        self.trial = trial or optuna_internals.live_trial(study, trial_id)
        self.progress = progress
        self.multi = len(study.directions) > 1
        self.pruned_at: int | None = None
        self.stopped_at: int | None = None
        self.checkpoint_at: int | None = None
        self.reported = False  # whether the job reported through this object

    def decided(self) -> Decisions:
        return Decisions(self.pruned_at, self.stopped_at, self.checkpoint_at)

    def _set(self, key: str, value: Any) -> None:
        optuna_internals.set_trial_system_attr(self.study, self.trial_id, key, value)

    def _attrs(self) -> dict[str, Any]:
        return optuna_internals.frozen(self.study, self.trial_id).system_attrs

    def clock(self, total: int | None) -> None:
        """When this trial's first and latest epoch ended, and how many it plans."""
        now = time.time()
        clock = self._attrs().get(keys.EPOCH_CLOCK) or {"first": now, "n": 0}
        self._set(
            keys.EPOCH_CLOCK,
            {"first": clock["first"], "last": now, "n": clock["n"] + 1, "total": total},
        )

    def checkpoint_saved(self, step: int) -> None:
        self.reported = True
        trial = optuna_internals.frozen(self.study, self.trial_id)
        run_id = keys.run_id(trial)
        self._set(keys.CHECKPOINT_RUN, run_id)
        self._set(keys.CHECKPOINT_AT, step)
        self.checkpoint_at = step
        if run_id:  # one checkpoint per run while it trains: the older ones go
            drop_older_checkpoints(run_id, step)

    def report_first_objective(self, value: float, step: int) -> bool:
        """Several objectives: Optuna refuses trial.report(), so the sweeper records the first
        objective's curve itself and applies the pruner's rule to it (FirstObjective)."""
        values = dict(self._attrs().get(keys.CURVE, {}))
        if str(step) not in values:  # a step reported twice keeps its first value
            self._set(keys.CURVE, values | {str(step): value})
        trial = with_curve(optuna_internals.frozen(self.study, self.trial_id))
        return self.study.pruner.prune(FirstObjective(self.study), trial)

    def report(self, value: float, step: int, total: int | None) -> bool:
        self.reported = True
        if not math.isfinite(value):
            return False  # a diverged trial fails; its NaN must not reach the pruner's statistics
        if self.multi:
            prune = self.report_first_objective(value, step)
        else:
            with warnings.catch_warnings():
                # a step reported twice keeps the first value; Optuna's warning says as much
                warnings.simplefilter("ignore", UserWarning)
                self.trial.report(value, step)
        deadline = os.environ.get(contract.DEADLINE)
        stop_at = os.environ.get(contract.JOB_STOP_AT)
        if deadline or stop_at:
            # the budget (or a Slurm job's end) judges the next trial's length from its epochs
            self.clock(total)
        if self.leaving is not None and stop_at and time.time() >= float(stop_at):
            self.leaving.set()  # Slurm's signal came late, or before the worker could hear it
        leaving = self.leaving is not None and self.leaving.is_set()
        leaving = leaving or (self.cancelled is not None and self.cancelled.is_set())
        if leaving or (deadline and time.time() >= float(deadline)):
            # the time budget is spent, or the job's time: stop at this epoch, recorded as such
            self._set(keys.STOPPED_AT, step)
            self.stopped_at = step
            return True
        if not self.multi:
            prune = self.trial.should_prune()
        if prune:
            self._set(keys.PRUNED_AT, step)
            self.pruned_at = step
        if self.progress is not None:
            self.progress(self.trial.number, value, step, total, prune)
        crash_point("epoch-reported")
        return prune


def reporter_from_environment(trial: contract.TrialInfo) -> TrialReporter:
    """The reporter of a job in another process: the trial is reopened through the storage."""
    url = os.environ.get(contract.STORAGE_URL)
    if not url:
        raise SweepConfigError(
            "this job runs in another process than the sweeper, and the study is in memory: "
            "set hydra.sweeper.storage to sqlite:///optuna.db or postgresql://..."
        )
    pruner = make_pruner(json.loads(os.environ.get(contract.PRUNER, "null")))
    with optuna_quietly():
        limit = os.environ.get(contract.STORAGE_OUTAGE_LIMIT)
        storage = make_storage(url, outage_limit_s=float(limit) if limit else None)
        study = optuna.load_study(study_name=trial.study_name, storage=storage, pruner=pruner)
    return TrialReporter(study, trial.trial_id)


# The reporter of each trial whose job runs in this process, served by the in-process launcher
# for the length of the job (trial.launch.InProcessJobs): a job calls `report()` with no handle on
# the sweep, so this is where it finds its trial's reporter. A job started in another process
# makes its own from the environment, kept for its next reports.
_SERVED: dict[int, TrialReporter] = {}


@contextlib.contextmanager
def serving(reporter: TrialReporter) -> Iterator[None]:
    """`reporter` answers the reports of its trial's job while it runs in this process."""
    _SERVED[reporter.trial_id] = reporter
    try:
        yield
    finally:
        _SERVED.pop(reporter.trial_id, None)


def reporter(trial: contract.TrialInfo) -> TrialReporter:
    found = _SERVED.get(trial.trial_id)
    if found is None:
        found = _SERVED.setdefault(trial.trial_id, reporter_from_environment(trial))
    return found


def report(value: float, step: int, total: int | None = None) -> bool:
    """job.report: record `value` at `step` for this job's trial; True when it should stop.

    In a job of several processes, rank 0 alone records and asks the pruner; once
    torch.distributed is set up every rank must call it at the same step, and each gets rank 0's
    answer (trial.ranks).
    """
    trial = contract.current_trial()
    if trial is None:
        return False
    decision = False
    if contract.rank() == 0:
        decision = reporter(trial).report(float(value), int(step), total)
    return ranks.share_decision(decision)


def checkpoint_saved(step: int) -> None:
    """job.checkpoint_saved: the run now holds the checkpoint of `step`, complete (rank 0's;
    the other ranks' calls do nothing)."""
    trial = contract.current_trial()
    if trial is not None and contract.rank() == 0:
        reporter(trial).checkpoint_saved(int(step))
