"""The study: its storage, created or continued, and a trial failed with a reason."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.databases import (
    DatabaseUnreachable,
    check_store_file,
    create_whole,
    probe,
    sqlite_path,
    writable_place,
)
from mlflow_study_sweeper.errors import SweepConfigError, SweepError, mask_url
from mlflow_study_sweeper.storage import optuna_internals, outages


@dataclass(frozen=True)
class StudySettings:
    """The study's settings, checked: where it lives and what it optimises."""

    url: str | None  # None: in memory, one process
    name: str
    objectives: tuple[tuple[str, str], ...]  # (metric name, maximize or minimize), in order
    heartbeat_interval: int = 10
    heartbeat_grace: int = 60
    outage_limit_s: float | None = None  # None: the default (storage.outages.DEFAULT_LIMIT_S)


@contextlib.contextmanager
def optuna_quietly() -> Iterator[None]:
    """Without Optuna's warnings about what the sweeper does on purpose."""
    with warnings.catch_warnings():
        # heartbeats are Optuna's way to find trials of dead workers; with ask/tell we beat
        warnings.filterwarnings("ignore", ".*heartbeat.*", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with")
        # a study's metric names are experimental in Optuna 5; they are what we keep them for
        warnings.filterwarnings("ignore", ".*metric_names.*", optuna.exceptions.ExperimentalWarning)
        yield


def make_storage(
    url: str | None,
    heartbeat_interval: int = 10,
    grace: int = 60,
    outage_limit_s: float | None = None,
) -> optuna.storages.BaseStorage | None:
    """The storage at `url`. One on a database server waits out the server's outages, up to
    `outage_limit_s` (see _outage); `None` keeps the limit this process already has for it."""
    if url is None:
        return None
    if outages.has_server(url):
        connect_args = {"connect_timeout": 10}  # a host that is gone must not hang a call
        with optuna_quietly():
            return optuna_internals.RetryingRDBStorage(
                url,
                outages.outages(url, outage_limit_s).call,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace,
                # connections the pool kept from before a restart are tested, and replaced
                engine_kwargs={"pool_pre_ping": True, "connect_args": connect_args},
            )
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            create_whole(path, f"optuna-{optuna.__version__}-empty.db", _empty, _empty)
        with optuna_quietly():
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace,
                # SQLite: wait for a busy database instead of failing at once ("database is
                # locked")
                engine_kwargs={"connect_args": {"timeout": 60}} if path is not None else None,
            )
    if url.endswith((".log", ".journal")):
        path = url.removeprefix("journal:///").removeprefix("file://")
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    raise SweepConfigError(
        f"hydra.sweeper.storage={url!r} is not a storage URL: use sqlite:///optuna.db, "
        f"postgresql://user@host/db, a path ending in .journal, or null for memory"
    )


def check_storage(url: str, probe_server: bool = True) -> None:
    """The storage can be used, found out without creating anything in it (a database server
    is not probed by a worker: the sweep probed it, and the worker's calls wait out outages)."""
    path = sqlite_path(url)
    if path is not None:
        key = "hydra.sweeper.storage"
        check_store_file(path, "Optuna storage", f"{key}={url}", key, {"studies"})
    elif url.startswith(("postgresql", "mysql")):
        if probe_server:
            check_database(url)
    elif url.endswith((".log", ".journal")):
        journal = Path(url.removeprefix("journal:///").removeprefix("file://"))
        if not journal.exists() and not writable_place(journal):
            raise SweepConfigError(
                f"cannot create the journal {journal}: its folder is not writable"
            )
    else:
        make_storage(url)  # raises with the list of what works


def check_database(url: str, timeout_s: int = 10) -> None:
    """One connection to the storage's database server (databases.probe; no tables made)."""
    try:
        probe(url, timeout_s)
    except DatabaseUnreachable as err:
        raise SweepConfigError(
            f"cannot open the Optuna storage {mask_url(url)}: {err}. Check the URL, that the "
            f"database exists (createdb ...) and that its server runs"
        ) from None


def _empty(file: Path) -> None:
    """Optuna's tables, made in a new database file."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{file}")
    storage.engine.dispose()


def open_study(
    name: str,
    storage: optuna.storages.BaseStorage | None,
    objectives: tuple[tuple[str, str], ...],
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    creator: dict[str, str],
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; return it and whether this call created it.

    `creator` labels the process that creates it (see _liveness.worker_label).
    """
    wanted = [direction for _, direction in objectives]
    metric_names = [name for name, _ in objectives]
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, directions=wanted, sampler=sampler, pruner=pruner
        )
        # who is making the parent run: a worker that joins now waits for it, unless it died
        optuna_internals.set_study_system_attr(study, keys.CREATOR, creator)
        with optuna_quietly():
            study.set_metric_names(metric_names)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    existing = [d.name.lower() for d in study.directions]
    with optuna_quietly():
        names = study.metric_names
    if existing != wanted or (names is not None and names != metric_names):
        was = f"{names} " if names else ""
        raise SweepConfigError(
            f"study {name!r} was created to {' and '.join(existing)} {was}(not "
            f"{' and '.join(wanted)} {metric_names}): set hydra.sweeper.direction and "
            f"hydra.sweeper.metric as they were, or choose a new hydra.sweeper.study_name"
        )
    return study, False


def open_or_explain(
    settings: StudySettings,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    creator: dict[str, str],
    attempts: int = 5,
) -> tuple[optuna.Study, bool]:
    """open_study on the storage at `settings.url`; a storage that cannot open is one
    SweepConfigError."""
    url = settings.url
    for attempt in range(attempts):
        try:
            storage = make_storage(
                url,
                settings.heartbeat_interval,
                settings.heartbeat_grace,
                outage_limit_s=settings.outage_limit_s,
            )
            return open_study(settings.name, storage, settings.objectives, sampler, pruner, creator)
        except SweepError:
            raise
        except Exception as err:  # a database that does not exist, a server that refuses
            if not type(err).__module__.startswith(("sqlalchemy", "psycopg", "optuna", "sqlite3")):
                raise
            if creating_at_once(err) and attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))  # the other worker's tables are there by then
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SweepConfigError(
                f"cannot open the Optuna storage {mask_url(url)}: {mask_url(first)[:300]}. Check "
                f"the URL, that the database exists (createdb ...) and that its server runs"
            ) from None
    raise AssertionError("unreachable")


def creating_at_once(err: Exception) -> bool:
    """Workers that start together on a new PostgreSQL database all create Optuna's tables;
    all but one fail on a unique index (the catalogue's, or the version row's), or find a
    table that "already exists". Opened again, the storage finds them made."""
    text = str(err)
    return "duplicate key value" in text or "already exists" in text


def fail_trial(study: optuna.Study, trial_id: int, kind: str, reason: str) -> bool:
    """Mark a trial FAIL with a reason; False if it had already ended (another worker was first)."""
    try:
        optuna_internals.set_trial_system_attr(study, trial_id, keys.FAILURE, kind)
        first_line = reason.splitlines()[0][:500] if reason else kind
        optuna_internals.set_trial_user_attr(study, trial_id, keys.FAIL_REASON, first_line)
        return optuna_internals.set_trial_state(study, trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def enqueue_once(
    study: optuna.Study, mark: str, params: dict[str, Any], user_attrs: dict[str, Any]
) -> bool:
    """Enqueue a trial with `params` once across every worker and rerun: the first to insert
    `mark` (a study system attribute, atomically) enqueues it; False for the others."""
    if mark in optuna_internals.study_system_attrs(study):
        return False  # enqueued before
    if not optuna_internals.insert_once(study, mark, True):
        return False  # by another worker just now
    study.enqueue_trial(params, user_attrs=user_attrs)
    return True
