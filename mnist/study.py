"""The Optuna side of a sweep: samplers, pruners, the study, and a job's handle on its trial."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mnist.errors import UserFacingError

# each choice's defaults; also the options of the hydra/sweeper/sampler and .../pruner groups
SAMPLERS: dict[str, dict[str, Any]] = {
    "tpe": {"_target_": "optuna.samplers.TPESampler"},
    "random": {"_target_": "optuna.samplers.RandomSampler"},
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler"},
    "gp": {"_target_": "optuna.samplers.GPSampler"},
    "grid": {"_target_": "optuna.samplers.GridSampler"},  # search space: from the params
    "qmc": {"_target_": "optuna.samplers.QMCSampler"},
}
PRUNERS: dict[str, dict[str, Any]] = {
    # the default: on real MNIST the first epoch already ranks trials well; replaying a seeded
    # 12 x 6-epoch sweep, (2, 0) trained 47% fewer epochs than no pruner with the same best
    # val_acc, where Optuna's own defaults (5, 0) saved 29% (mnist/bench_pruning.py measures it)
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 2,  # trials that always finish, to learn what "median" is
        "n_warmup_steps": 0,  # may stop a trial after its first epoch
    },
    "percentile": {
        "_target_": "optuna.pruners.PercentilePruner",
        "percentile": 25.0,
        "n_startup_trials": 5,
        "n_warmup_steps": 1,
    },
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": 1,
        "reduction_factor": 3,
    },
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",
        "reduction_factor": 3,
    },
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": 0.2},
    "none": {"_target_": "optuna.pruners.NopPruner"},
}
# RDB heartbeats let a worker on another machine find the trials of a worker that died
HEARTBEAT_INTERVAL_S = 10
HEARTBEAT_GRACE_S = 60

# heartbeats are what Optuna offers to find trials of dead workers; with ask/tell we beat ourselves
warnings.filterwarnings("ignore", ".*heartbeat.*", optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", ".*fail_stale_trials.*", optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")

# studies with in-memory storage, reachable only by jobs that run in the sweeper's process
_IN_PROCESS_STUDIES: dict[str, optuna.Study] = {}


class SweepConfigError(UserFacingError, ValueError):
    """A sweeper setting that cannot work; the message says which and what is allowed."""


def _spec(value: Any, names: Mapping[str, dict[str, Any]], what: str) -> dict[str, Any]:
    """A `_target_` mapping from a short name ('hyperband'), a {name: ..., args} or a {_target_}."""
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
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


def make_sampler(
    value: Any, seed: int | None, search_space: dict[str, Any] | None = None
) -> optuna.samplers.BaseSampler:
    spec = _spec(value, SAMPLERS, "sampler")
    if spec["_target_"].endswith("GridSampler"):
        spec.setdefault("search_space", grid_space(search_space or {}))
    elif "seed" not in spec and seed is not None:
        spec["seed"] = seed
    try:
        sampler = instantiate(spec, _convert_="all")
    except Exception as err:
        raise SweepConfigError(f"hydra.sweeper.sampler {spec} cannot be built: {err}") from err
    if not isinstance(sampler, optuna.samplers.BaseSampler):
        raise SweepConfigError(f"hydra.sweeper.sampler {spec} is not an Optuna sampler")
    return sampler


def make_pruner(value: Any) -> optuna.pruners.BasePruner:
    spec = _spec(value, PRUNERS, "pruner")
    try:
        pruner = instantiate(spec, _convert_="all")
    except Exception as err:
        raise SweepConfigError(f"hydra.sweeper.pruner {spec} cannot be built: {err}") from err
    if not isinstance(pruner, optuna.pruners.BasePruner):
        raise SweepConfigError(f"hydra.sweeper.pruner {spec} is not an Optuna pruner")
    return pruner


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


def make_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    if url is None:
        return None
    if url.startswith(("sqlite", "postgresql", "mysql")):
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
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
    storage: str | None,
    direction: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; return it and whether this call created it."""
    if storage is None and name in _IN_PROCESS_STUDIES:
        return _IN_PROCESS_STUDIES[name], False
    store = make_storage(storage)
    try:
        study = optuna.create_study(
            study_name=name, storage=store, direction=direction, sampler=sampler, pruner=pruner
        )
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
        created = False
        existing = study.direction.name.lower()
        if existing != direction:
            raise SweepConfigError(
                f"study {name!r} in {storage} was created to {existing}, not to {direction}: "
                f"set hydra.sweeper.direction={existing} or choose a new hydra.sweeper.study_name"
            ) from None
    if storage is None:
        _IN_PROCESS_STUDIES[name] = study
    return study, created


def job_trial(
    study_name: str, storage: str | None, pruner_value: Any, trial_id: int
) -> optuna.Trial:
    """The running trial, as a job sees it: reports go to the same storage the sweeper reads."""
    if storage is None:
        if study_name not in _IN_PROCESS_STUDIES:
            raise SweepConfigError(
                "hydra.sweeper.storage=null keeps the study in the sweeper's memory, which a job "
                "in another process cannot reach: use sqlite:///optuna.db or postgresql://..."
            )
        study = _IN_PROCESS_STUDIES[study_name]
    else:
        study = optuna.load_study(
            study_name=study_name, storage=make_storage(storage), pruner=make_pruner(pruner_value)
        )
    return optuna.trial.Trial(study, trial_id)


def worker_id() -> dict[str, str]:
    return {"host": socket.gethostname(), "pid": str(os.getpid())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_orphaned_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker is gone; return their numbers.

    A dead process on this host is found at once; a worker on another host by its heartbeat
    going stale (RDB storages only) after HEARTBEAT_GRACE_S.
    """
    me = worker_id()
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    orphans = []
    for trial in running:
        host, pid = trial.system_attrs.get("worker_host"), trial.system_attrs.get("worker_pid")
        # our own pid counts as dead: this is called before this process starts a trial
        dead = pid is not None and (int(pid) == os.getpid() or not _pid_alive(int(pid)))
        if host == me["host"] and dead:
            try:
                study._storage.set_trial_system_attr(trial._trial_id, "failure", "orphaned")
                study._storage.set_trial_user_attr(
                    trial._trial_id, "fail_reason", f"its worker (pid {pid}) died while training"
                )
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                orphans.append(trial.number)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker was first
                pass
    failed = (optuna.trial.TrialState.FAIL,)
    before = {t.number for t in study.get_trials(deepcopy=False, states=failed)}
    optuna.storages.fail_stale_trials(study)
    after = {t.number for t in study.get_trials(deepcopy=False, states=failed)}
    return sorted(set(orphans) | (after - before))


class Heartbeat:
    """Records a trial's heartbeat in the RDB storage while the trial trains."""

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.storage = study._storage
        self.trial_id = trial_id
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if isinstance(self.storage, optuna.storages.RDBStorage):
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_INTERVAL_S):
            with contextlib.suppress(Exception):  # a missed beat is retried at the next interval
                self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
