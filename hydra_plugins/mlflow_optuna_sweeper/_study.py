"""The Optuna side of a sweep: storage, sampler, pruner, the study, workers' liveness, reports."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from hydra_plugins.mlflow_optuna_sweeper import job
from hydra_plugins.mlflow_optuna_sweeper._errors import SweepConfigError
from hydra_plugins.mlflow_optuna_sweeper._faults import crash_point
from hydra_plugins.mlflow_optuna_sweeper._objectives import (
    CURVE,
    FirstObjective,
    Objectives,
    with_curve,
)
from hydra_plugins.mlflow_optuna_sweeper.config import PRUNERS, SAMPLERS

# heartbeats are Optuna's way to find trials of dead workers; with ask/tell we beat ourselves
warnings.filterwarnings("ignore", ".*heartbeat.*", optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")

# trial system attributes the sweeper keeps
WORKER_HOST, WORKER_PID = "worker_host", "worker_pid"
FAILURE = "failure"  # why a trial is FAIL: error, interrupted, orphaned, timeout, surplus
PRUNED_AT = "pruned_at_step"
STOPPED_AT = "stopped_by_budget_at_step"
EPOCH_CLOCK = "epoch_clock"  # under a time budget: when a trial's first and last report came
CHECKPOINT_AT = "checkpoint_step"  # the last step the job's checkpoint holds (job.checkpoint_saved)
CHECKPOINT_RUN = "checkpoint_run"  # the run that holds it (an earlier one, for a continuing trial)
CREATOR_ATTR = "mlflow_optuna.creator"  # a study system attribute
METRICS_ATTR = "mlflow_optuna.metrics"  # the objectives' names, as the study was created


def _spec(value: Any, names: Mapping[str, dict[str, Any]], what: str) -> dict[str, Any]:
    """A `_target_` mapping from a short name ('hyperband'), a {name: ..., args} or a {_target_}."""
    if value is None:
        value = "none" if "none" in names else None
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise SweepConfigError(f"hydra.sweeper.{what}={value!r} is not a name or a mapping")
    spec = dict(value)
    if "_target_" not in spec:
        name = str(spec.pop("name", "")).lower()
        if name not in names:
            raise SweepConfigError(
                f"hydra.sweeper.{what}={name!r} is not known: use one of {', '.join(names)}, "
                f"or a mapping with _target_ naming an Optuna {what} class"
            )
        spec = names[name] | spec
    return spec


class ExhaustibleGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, minus its call to study.stop() (which only works in optimize()).

    The sweep loop asks `exhausted()` before each trial instead.
    """

    def after_trial(self, study, trial, state, values) -> None:
        pass

    def exhausted(self, study: optuna.Study) -> bool:
        return not self._get_unvisited_grid_ids(study)

    @property
    def size(self) -> int:
        return self._n_min_trials


def make_sampler(
    value: Any, seed: int | None, search_space: dict[str, Any] | None = None
) -> optuna.samplers.BaseSampler:
    spec = _spec(value, SAMPLERS, "sampler")
    if spec["_target_"].endswith("GridSampler"):
        spec["_target_"] = f"{__name__}.ExhaustibleGridSampler"
        spec.setdefault("search_space", grid_space(search_space or {}))
    if "seed" not in spec and seed is not None:
        spec["seed"] = seed
    return _build(spec, "sampler", optuna.samplers.BaseSampler)


def make_pruner(value: Any) -> optuna.pruners.BasePruner:
    return _build(_spec(value, PRUNERS, "pruner"), "pruner", optuna.pruners.BasePruner)


def _build(spec: dict[str, Any], what: str, kind: type) -> Any:
    try:
        built = instantiate(spec, _convert_="all")
    except Exception as err:
        raise SweepConfigError(f"hydra.sweeper.{what} {spec} cannot be built: {err}") from err
    if not isinstance(built, kind):
        raise SweepConfigError(f"hydra.sweeper.{what} {spec} is not an Optuna {what}")
    return built


def grid_space(search_space: dict[str, Any]) -> dict[str, list[Any]]:
    grid: dict[str, list[Any]] = {}
    for name, dist in search_space.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            grid[name] = list(dist.choices)
        elif isinstance(dist, optuna.distributions.IntDistribution) and not dist.log:
            grid[name] = list(range(dist.low, dist.high + 1, dist.step))
        else:
            raise SweepConfigError(
                f"the grid sampler needs a finite set of values, but {name} is {dist}: "
                f"use choice(...) or range(...) for every parameter"
            )
    return grid


def make_storage(
    url: str | None, heartbeat_interval: int = 10, grace: int = 60
) -> optuna.storages.BaseStorage | None:
    if url is None:
        return None
    if url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace,
            # SQLite: wait for a busy database instead of failing at once ("database is locked")
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
        )
    if url.endswith((".log", ".journal")):
        path = url.removeprefix("journal:///").removeprefix("file://")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    raise SweepConfigError(
        f"hydra.sweeper.storage={url!r} is not a storage URL: use sqlite:///optuna.db, "
        f"postgresql://user@host/db, a path ending in .journal, or null for memory"
    )


def open_study(
    name: str,
    storage: optuna.storages.BaseStorage | None,
    objectives: Objectives,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; return it and whether this call created it."""
    wanted = list(objectives.directions)
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=wanted, sampler=sampler, pruner=pruner
        )
        # who is making the parent run: a worker that joins now waits for it, unless it died
        study._storage.set_study_system_attr(study._study_id, CREATOR_ATTR, worker_id())
        study._storage.set_study_system_attr(study._study_id, METRICS_ATTR, list(objectives.names))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    existing = [d.name.lower() for d in study.directions]
    names = study._storage.get_study_system_attrs(study._study_id).get(METRICS_ATTR)
    if existing != wanted or (names is not None and names != list(objectives.names)):
        was = f"{names} " if names else ""
        raise SweepConfigError(
            f"study {name!r} was created to {' and '.join(existing)} {was}(not "
            f"{' and '.join(wanted)} {list(objectives.names)}): set hydra.sweeper.direction and "
            f"hydra.sweeper.metric as they were, or choose a new hydra.sweeper.study_name"
        )
    return study, False


def study_exists(name: str, storage: optuna.storages.BaseStorage | None) -> bool:
    if storage is None:
        return False
    return name in {s.study_name for s in optuna.get_all_study_summaries(storage)}


def check_space_unchanged(study: optuna.Study, space: dict[str, Any]) -> None:
    """A resumed study refuses a parameter whose kind changed (log <-> linear, float <-> int)."""
    seen: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        for key, dist in trial.distributions.items():
            seen.setdefault(key, dist)
    for key, dist in space.items():
        before = seen.get(key)
        if before is None:
            continue
        try:
            optuna.distributions.check_distribution_compatibility(before, dist)
        except ValueError:
            from hydra_plugins.mlflow_optuna_sweeper._space import describe

            raise SweepConfigError(
                f"hydra.sweeper.params.{key} changed from {describe(before)} to {describe(dist)} "
                f"since study {study.study_name!r} started, and Optuna cannot mix the two in one "
                f"study: keep the old kind, or start a new study with hydra.sweeper.study_name=..."
            ) from None


# ---- who runs a trial, and whether it still lives --------------------------------------------


HOST_ENV = "SWEEP_HOST_ID"  # names this machine explicitly, e.g. where containers share boot ids


def machine_key() -> str:
    """This machine and process namespace: hostnames alone repeat across containers."""
    if os.environ.get(HOST_ENV):
        return os.environ[HOST_ENV]
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))  # one per pid namespace
    return ":".join(parts)


def worker_id() -> dict[str, str]:
    return {WORKER_HOST: machine_key(), WORKER_PID: str(os.getpid())}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) has stopped working all the same
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def label_trial(study: optuna.Study, trial_id: int) -> None:
    for key, value in worker_id().items():
        study._storage.set_trial_system_attr(trial_id, key, value)


def fail_trial(study: optuna.Study, trial_id: int, kind: str, reason: str) -> bool:
    """Mark a trial FAIL with a reason; False if it had already ended (another worker was first)."""
    try:
        study._storage.set_trial_system_attr(trial_id, FAILURE, kind)
        study._storage.set_trial_user_attr(trial_id, "fail_reason", reason.splitlines()[0][:500])
        return study._storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def heartbeat_enabled(study: optuna.Study) -> bool:
    # the study's storage is Optuna's _CachedStorage around the RDBStorage: ask, don't isinstance
    return is_heartbeat_enabled(study._storage)


def fail_orphaned_trials(
    study: optuna.Study, grace_s: float, own_trials_are_dead: bool = True
) -> list[tuple[int, str]]:
    """Mark FAIL the RUNNING trials whose worker is gone; return (number, reason) for each.

    A dead process on this machine is found at once; a worker on another machine by its
    heartbeat going silent for `grace_s` (RDB storages); a trial that no worker ever labelled
    (its `ask` failed half-way) after `grace_s` too. Between trials, a RUNNING trial of this
    very process is one it left when interrupted (or of an earlier process with the same pid);
    called while this process trains (`own_trials_are_dead=False`), it is the live one.
    """
    me = machine_key()
    stale = set()
    if heartbeat_enabled(study):
        stale = set(study._storage._get_stale_trial_ids(study._study_id))
    now = datetime.datetime.now()
    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = trial.system_attrs.get(WORKER_HOST), trial.system_attrs.get(WORKER_PID)
        reason = None
        if host == me and pid is not None and not pid_alive(int(pid)):
            reason = f"its worker (pid {pid}) died while training"
        elif host == me and pid is not None and int(pid) == os.getpid() and own_trials_are_dead:
            reason = "its worker (this process) was interrupted before it recorded the end"
        elif trial._trial_id in stale:
            reason = f"its worker ({host}, pid {pid}) stopped sending heartbeats for {grace_s}s"
        elif (
            host is None
            and trial.datetime_start
            and ((now - trial.datetime_start).total_seconds() > grace_s)
        ):
            reason = "it was created but never started (its worker failed while asking for it)"
        if reason and fail_trial(study, trial._trial_id, "orphaned", reason):
            found.append((trial.number, reason))
    return found


class Heartbeat:
    """Records a trial's heartbeat in the RDB storage while the trial trains."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.study = study
        self.trial_id = trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if heartbeat_enabled(self.study):
            storage = self.study._storage
            storage.record_heartbeat(self.trial_id)
            interval = storage.get_heartbeat_interval() or 10
            self.thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
            self.thread.start()
        return self

    def _beat(self, interval: float) -> None:
        while not self.stop.wait(interval):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                self.study._storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


# ---- reports from a job -------------------------------------------------------------------


class TrialReporter:
    """A job's per-epoch reports: to the trial, through the pruner, and to the console."""

    def __init__(self, study: optuna.Study, trial_id: int, progress=None) -> None:
        self.trial = optuna.trial.Trial(study, trial_id)
        self.progress = progress  # called with (trial, value, step, total)
        self.multi = len(study.directions) > 1

    def clock(self, total: int | None) -> None:
        """When this trial's first and latest epoch ended, and how many it plans."""
        storage, trial_id, now = self.trial.storage, self.trial._trial_id, time.time()
        clock = storage.get_trial(trial_id).system_attrs.get(EPOCH_CLOCK) or {"first": now, "n": 0}
        clock = {"first": clock["first"], "last": now, "n": clock["n"] + 1, "total": total}
        storage.set_trial_system_attr(trial_id, EPOCH_CLOCK, clock)

    def checkpoint_saved(self, step: int) -> None:
        storage, trial_id = self.trial.storage, self.trial._trial_id
        run_id = storage.get_trial(trial_id).user_attrs.get("mlflow_run_id")
        storage.set_trial_system_attr(trial_id, CHECKPOINT_RUN, run_id)
        storage.set_trial_system_attr(trial_id, CHECKPOINT_AT, step)
        if run_id:  # one checkpoint per run while it trains: the older ones go
            from hydra_plugins.mlflow_optuna_sweeper._resume import drop_older

            drop_older(run_id, step)

    def report_first_objective(self, value: float, step: int) -> bool:
        """Several objectives: Optuna refuses trial.report(), so the sweeper records the first
        objective's curve itself and applies the pruner's rule to it (FirstObjective)."""
        study, storage, trial_id = self.trial.study, self.trial.storage, self.trial._trial_id
        values = dict(storage.get_trial(trial_id).system_attrs.get(CURVE, {}))
        if str(step) not in values:  # a step reported twice keeps its first value
            storage.set_trial_system_attr(trial_id, CURVE, values | {str(step): value})
        trial = with_curve(storage.get_trial(trial_id))
        return study.pruner.prune(FirstObjective(study), trial)

    def report(self, value: float, step: int, total: int | None) -> bool:
        if not math.isfinite(value):
            return False  # a diverged trial fails; its NaN must not reach the pruner's statistics
        if self.multi:
            prune = self.report_first_objective(value, step)
        else:
            with warnings.catch_warnings():
                # a step reported twice keeps the first value; Optuna's warning says as much
                warnings.simplefilter("ignore", UserWarning)
                self.trial.report(value, step)
        deadline = os.environ.get(job.ENV_DEADLINE)
        if deadline:  # the budget judges the next trial's length from this trial's epochs
            self.clock(total)
        if deadline and time.time() >= float(deadline):
            # the time budget is spent: stop at this epoch boundary, recorded as such
            self.trial.storage.set_trial_system_attr(self.trial._trial_id, STOPPED_AT, step)
            return True
        if not self.multi:
            prune = self.trial.should_prune()
        if prune:
            self.trial.storage.set_trial_system_attr(self.trial._trial_id, PRUNED_AT, step)
        if self.progress is not None:
            self.progress(self.trial.number, value, step, total, prune)
        crash_point("epoch-reported")
        return prune


class StorageReporter(TrialReporter):
    """The same, for a job in another process: the trial is reopened through the storage."""

    @classmethod
    def from_environment(cls, trial: job.TrialInfo) -> StorageReporter:
        url = os.environ.get(job.ENV_STORAGE)
        if not url:
            raise SweepConfigError(
                "this job runs in another process than the sweeper, and the study is in memory: "
                "set hydra.sweeper.storage to sqlite:///optuna.db or postgresql://..."
            )
        pruner = make_pruner(json.loads(os.environ.get(job.ENV_PRUNER, "null")))
        study = optuna.load_study(
            study_name=trial.study_name, storage=make_storage(url), pruner=pruner
        )
        return cls(study, trial.trial_id)
