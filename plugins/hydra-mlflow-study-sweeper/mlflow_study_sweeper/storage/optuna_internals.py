"""The one place that touches Optuna's private names; tests/test_optuna_internals.py pins them.

Optuna's public API has no study system attributes, no trial id, no atomic "insert if absent"
and no heartbeat ages, which a sweep shared by many processes needs. Every use of its private
attributes and modules is a function here, so an Optuna upgrade breaks this file and its test
file, nothing else. The storage methods called below are BaseStorage's public interface; what
is private is how a Study or a Trial holds the storage and its ids.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

_MEMORY_LOCK = threading.Lock()


# ---- a study's storage and ids -------------------------------------------------------------------
def storage(study: optuna.Study) -> BaseStorage:
    return study._storage


def backend(study: optuna.Study) -> BaseStorage:
    """The storage under Optuna's cache (which wraps an RDBStorage)."""
    held = study._storage
    return getattr(held, "_backend", held)


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


def live_trial(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """A Trial object for a running trial, as Optuna's own optimize loop makes one."""
    return optuna.trial.Trial(study, trial_id)


def ask_new(
    study: optuna.Study, space: dict[str, BaseDistribution], system_attrs: dict[str, Any]
) -> optuna.Trial:
    """study.ask(space), for a study whose enqueued (WAITING) trials are none or left to a
    later ask: a new trial, which carries `system_attrs` from the transaction that creates it,
    and no read of the waiting trials first (ask's first call to the storage).

    On an RDB storage (behind Optuna's cache) the trial is not read back (Trial's first act: it
    is answered with what was written), and its sampled params are held back, to be written
    with its run id in one transaction (record_started) instead of one each."""
    study._thread_local.cached_all_trials = None  # as ask does: samplers read the trials anew
    template = FrozenTrial(
        number=-1,  # the storage numbers it
        state=TrialState.RUNNING,
        value=None,
        datetime_start=datetime.datetime.now(),
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs=system_attrs,
        intermediate_values={},
        trial_id=-1,
    )
    storage = study._storage
    trial_id = storage.create_new_trial(study._study_id, template_trial=template)
    created = _just_created(storage, trial_id)
    if created is None:
        trial = optuna.trial.Trial(study, trial_id)
        for name, distribution in space.items():
            trial._suggest(name, distribution)
        return trial
    with _answering(storage, created):  # only here: a sampler's before_trial may write to it
        trial = optuna.trial.Trial(study, trial_id)
    cls = type(storage)
    held = _HELD_PARAMS.setdefault(trial_id, [])
    storage.set_trial_param = lambda asked, name, value, dist: (
        held.append((name, value, dist))
        if asked == trial_id
        else cls.set_trial_param(storage, asked, name, value, dist)
    )
    try:
        for name, distribution in space.items():
            trial._suggest(name, distribution)
    finally:
        del storage.set_trial_param
    return trial


# the params ask_new sampled for a new trial and held back, by trial id, until record_started
_HELD_PARAMS: dict[int, list[tuple[str, float, BaseDistribution]]] = {}


def record_started(study: optuna.Study, trial: optuna.Trial, user_attrs: dict[str, Any]) -> None:
    """`user_attrs` on the trial, as Trial.set_user_attr sets them, in one transaction with the
    params ask_new held back for it (its ask wrote them otherwise)."""
    trial_id = trial._trial_id
    held = _HELD_PARAMS.pop(trial_id, None)
    if not held:
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    storage = study._storage
    rdb = storage._backend
    known = storage._studies[study._study_id].param_distribution  # what the cache checked

    def attempt(retrying: bool) -> None:
        if retrying and _param_written(rdb, trial_id, held[0][0]):
            return  # the attempt before this one was committed, and its answer lost
        with _create_scoped_session(rdb.scoped_session) as session:
            for name, value, distribution in held:
                rdb._set_trial_param_without_commit(
                    session, trial_id, name, value, distribution, known.get(name)
                )
            for key, value in user_attrs.items():
                rdb._set_trial_attr_without_commit(
                    session, models.TrialUserAttributeModel, trial_id, key, value
                )

    _call_of(rdb)(attempt)
    with storage._lock:
        for name, _, distribution in held:
            known.setdefault(name, distribution)
    trial._cached_frozen_trial.user_attrs.update(user_attrs)


def drop_held(trial_id: int) -> None:
    """A trial that will not run: its held params are not written."""
    _HELD_PARAMS.pop(trial_id, None)


def _param_written(rdb: RDBStorage, trial_id: int, name: str) -> bool:
    try:
        RDBStorage.get_trial_param(rdb, trial_id, name)
    except KeyError:
        return False
    return True


def tell(
    study: optuna.Study,
    trial: optuna.Trial,
    values: Sequence[float] | None = None,
    state: TrialState | None = None,
    read: FrozenTrial | None = None,
) -> TrialState:
    """study.tell, but for reading the trial back afterwards (tell's last act): the state told
    (FAIL where the values were refused). `read`: the trial as read from the storage since its
    job ended (nothing writes to it between that read and this), which tell's first act, the
    same read, is answered with."""
    from optuna.study._tell import _tell_with_warning

    with _answering(study._storage, read) if read is not None else contextlib.nullcontext():
        told, _, _ = _tell_with_warning(
            study=study, trial=trial, value_or_values=values, state=state
        )
    return told


@contextlib.contextmanager
def _answering(storage: BaseStorage, trial: FrozenTrial) -> Iterator[None]:
    """The storage's get_trial of this trial answered with `trial` (what it holds now) instead
    of a read; any other trial's read as before."""
    trial_id, cls = trial._trial_id, type(storage)
    storage.get_trial = lambda asked: trial if asked == trial_id else cls.get_trial(storage, asked)
    try:
        yield
    finally:
        del storage.get_trial


def _just_created(storage: BaseStorage, trial_id: int) -> FrozenTrial | None:
    """A copy of the trial Optuna's cache (in front of an RDBStorage) kept when it created it,
    as the database holds it; None for another storage."""
    from optuna.storages._cached_storage import _CachedStorage

    if not isinstance(storage, _CachedStorage):
        return None
    with storage._lock:
        study_id, number = storage._trial_id_to_study_id_and_number[trial_id]
        return copy.deepcopy(storage._studies[study_id].trials[number])


# ---- attributes and states, through the storage --------------------------------------------------
def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    study._storage.set_study_system_attr(study._study_id, key, value)


def frozen(study: optuna.Study, trial_id: int) -> FrozenTrial:
    """The trial as the storage has it now (attributes a job set in another process included)."""
    return study._storage.get_trial(trial_id)


def set_trial_system_attr(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    study._storage.set_trial_system_attr(trial_id, key, value)


def set_trial_user_attr(study: optuna.Study, trial_id: int, key: str, value: Any) -> None:
    study._storage.set_trial_user_attr(trial_id, key, value)


def set_trial_state(study: optuna.Study, trial_id: int, state: TrialState) -> bool:
    """False if the trial had already finished (another process was first)."""
    return study._storage.set_trial_state_values(trial_id, state)


def set_intermediate_value(study: optuna.Study, trial_id: int, step: int, value: float) -> None:
    study._storage.set_trial_intermediate_value(trial_id, step, value)


# ---- a storage whose calls wait out an outage of its database server ---------------------------
# BaseStorage's calls that read or write the database, and the one private method that Optuna's
# cache calls on the storage under it
_RETRIED = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id",
    "get_trial_param",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial",
    "get_all_trials",
    "get_n_trials",
    "get_best_trial",
    "get_trial_params",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    # what Optuna's _CachedStorage, which a study puts in front of an RDBStorage, calls instead
    # of the public methods (a worker asking for a trial during an outage crashed on it)
    "_create_new_trial",
    "_get_trials",
    "_get_best_trial_id",
    "_get_stale_trial_ids",
)
Call = Callable[[Callable[[bool], Any]], Any]


class RetryingRDBStorage(RDBStorage):
    """An RDBStorage whose every database call goes through `call` (see _outage.Outages.call),
    which repeats it while the server cannot be reached. A heartbeat is tried once: the thread
    that beats must not stall, and its next beat comes soon."""

    def __init__(self, url: str, call: Call, **kwargs: Any) -> None:
        self._call = call
        call(lambda retrying: RDBStorage.__init__(self, url, **kwargs))

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_call", None)  # a process's own; one unpickled elsewhere calls once
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        self._call = lambda fn: fn(False)
        super().__setstate__(state)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        def attempt(retrying: bool) -> bool:
            try:
                return RDBStorage.set_trial_state_values(self, trial_id, state, values)
            except optuna.exceptions.UpdateFinishedTrialError:
                # the attempt before this one was committed, and its answer lost with the
                # connection: the trial ended as asked
                if retrying and RDBStorage.get_trial(self, trial_id).state == state:
                    return True
                raise

        return self._call(attempt)

    def set_trial_param(self, trial_id: int, param_name: str, *args: Any) -> None:
        self._set_param(RDBStorage.set_trial_param, trial_id, param_name, *args)

    def _set_trial_param(self, trial_id: int, param_name: str, *args: Any) -> None:
        self._set_param(RDBStorage._set_trial_param, trial_id, param_name, *args)

    def _set_param(self, method: Callable[..., None], trial_id: int, name: str, *args: Any) -> None:
        def attempt(retrying: bool) -> None:
            try:
                method(self, trial_id, name, *args)
            except Exception:
                # the attempt before this one was committed, and its answer lost with the
                # connection: the param is there, with this value (a second insert breaks the
                # table's unique key)
                with contextlib.suppress(Exception):
                    if retrying and RDBStorage.get_trial_param(self, trial_id, name) == args[0]:
                        return
                raise

        self._call(attempt)


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    def retried(self: RetryingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._call(lambda retrying: method(self, *args, **kwargs))

    retried.__name__ = retried.__qualname__ = name
    retried.__doc__ = method.__doc__
    return retried


for _name in _RETRIED:
    setattr(RetryingRDBStorage, _name, _retried(_name))


def _call_of(rdb: RDBStorage) -> Call:
    return rdb._call if isinstance(rdb, RetryingRDBStorage) else lambda fn: fn(False)


# ---- exactly one writer among many processes ---------------------------------------------------
def insert_once(study: optuna.Study, key: str, value: Any) -> bool:
    """Set the study system attribute `key` if no process has: True for exactly one of them.

    An INSERT under the table's unique key on RDB storages; a lock elsewhere.
    """
    rdb = backend(study)
    if isinstance(rdb, RDBStorage):
        import sqlalchemy
        from optuna.storages._rdb import models

        table = models.StudySystemAttributeModel.__table__

        def attempt(retrying: bool) -> bool:
            try:
                with rdb.engine.begin() as connection:
                    connection.execute(
                        sqlalchemy.insert(table).values(
                            study_id=study._study_id, key=key, value_json=json.dumps(value)
                        )
                    )
            except sqlalchemy.exc.IntegrityError:
                # an attempt before this one inserted it, and its answer was lost
                return retrying and _read_attr(rdb, study._study_id, key) == json.dumps(value)
            return True

        return _call_of(rdb)(attempt)
    with study_lock(study):
        if key in study_system_attrs(study):
            return False
        set_study_system_attr(study, key, value)
        return True


def replace_if(study: optuna.Study, key: str, old: Any, new: Any) -> bool:
    """Compare and swap a study system attribute: True if it still held `old` and now `new`."""
    rdb = backend(study)
    if isinstance(rdb, RDBStorage):
        import sqlalchemy
        from optuna.storages._rdb import models

        table = models.StudySystemAttributeModel.__table__

        def attempt(retrying: bool) -> bool:
            with rdb.engine.begin() as connection:
                result = connection.execute(
                    sqlalchemy.update(table)
                    .where(table.c.study_id == study._study_id)
                    .where(table.c.key == key)
                    .where(table.c.value_json == json.dumps(old))
                    .values(value_json=json.dumps(new))
                )
            if result.rowcount == 1:
                return True
            # an attempt before this one swapped it, and its answer was lost
            return retrying and _read_attr(rdb, study._study_id, key) == json.dumps(new)

        return _call_of(rdb)(attempt)
    with study_lock(study):
        if study_system_attrs(study).get(key) != old:
            return False
        set_study_system_attr(study, key, new)
        return True


def _read_attr(rdb: RDBStorage, study_id: int, key: str) -> str | None:
    """A study system attribute's stored JSON, read past Optuna's cache."""
    import sqlalchemy
    from optuna.storages._rdb import models

    table = models.StudySystemAttributeModel.__table__
    with rdb.engine.connect() as connection:
        return connection.execute(
            sqlalchemy.select(table.c.value_json)
            .where(table.c.study_id == study_id)
            .where(table.c.key == key)
        ).scalar()


@contextlib.contextmanager
def study_lock(study: optuna.Study) -> Iterator[None]:
    """Mutual exclusion among a study's processes where the storage has no transactions."""
    journal = backend(study)
    if isinstance(journal, JournalStorage):
        # Optuna's own lock for journals: an O_EXCL file, which NFSv3+ honours where fcntl's
        # locks are broken on many NFS implementations (a journal on Slurm's shared folder);
        # one a killed holder left is taken over after its grace period
        lock = JournalFileOpenLock(f"{journal._backend._file_path}.end", grace_period=30)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
    else:  # in memory: one process
        with _MEMORY_LOCK:
            yield


def replace_attr_values(study: optuna.Study, old: str, new: str) -> int:
    """Every attribute of the study and its trials whose value is `old` becomes `new` (a run id
    given while the tracking server was away, now the real one); finished trials included,
    which Optuna's API refuses. RDB storages only (elsewhere the process's aliases stand in);
    returns how many rows changed."""
    rdb = backend(study)
    if not isinstance(rdb, RDBStorage):
        return 0
    import sqlalchemy
    from optuna.storages._rdb import models

    trials = sqlalchemy.select(models.TrialModel.__table__.c.trial_id).where(
        models.TrialModel.__table__.c.study_id == study._study_id
    )
    before, after = json.dumps(old), json.dumps(new)

    def attempt(retrying: bool) -> int:
        changed = 0
        with rdb.engine.begin() as connection:
            for model in (models.TrialUserAttributeModel, models.TrialSystemAttributeModel):
                table = model.__table__
                changed += connection.execute(
                    sqlalchemy.update(table)
                    .where(table.c.trial_id.in_(trials))
                    .where(table.c.value_json == before)
                    .values(value_json=after)
                ).rowcount
            for model in (models.StudyUserAttributeModel, models.StudySystemAttributeModel):
                table = model.__table__
                changed += connection.execute(
                    sqlalchemy.update(table)
                    .where(table.c.study_id == study._study_id)
                    .where(table.c.value_json == before)
                    .values(value_json=after)
                ).rowcount
        return changed

    return _call_of(rdb)(attempt)


# ---- heartbeats --------------------------------------------------------------------------------
def heartbeat_interval(study: optuna.Study) -> int | None:
    """Seconds between a trial's heartbeats, or None where the storage keeps none."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if not is_heartbeat_enabled(study._storage):
        return None
    return study._storage.get_heartbeat_interval()


def record_heartbeat(study: optuna.Study, trial_id: int) -> None:
    study._storage.record_heartbeat(trial_id)


def heartbeat_ages(study: optuna.Study) -> dict[int, float | None]:
    """Seconds since each RUNNING trial's last heartbeat (None: it never sent one).

    Optuna's `_get_stale_trial_ids` skips trials without a heartbeat; a worker that dies before
    its first beat must be found too. Ages come from the database's own clock.
    """
    rdb = backend(study)
    if not isinstance(rdb, RDBStorage):
        return {}
    import sqlalchemy
    from optuna.storages._rdb import models

    trials, beats = models.TrialModel.__table__, models.TrialHeartbeatModel.__table__
    query = (
        sqlalchemy.select(trials.c.trial_id, beats.c.heartbeat, sqlalchemy.func.now())
        .select_from(trials.outerjoin(beats, beats.c.trial_id == trials.c.trial_id))
        .where(trials.c.study_id == study._study_id)
        .where(trials.c.state == TrialState.RUNNING)
    )

    def attempt(retrying: bool) -> list[Any]:
        with rdb.engine.connect() as connection:
            return connection.execute(query).all()

    rows = _call_of(rdb)(attempt)
    ages: dict[int, float | None] = {}
    for trial, beat, now in rows:
        if beat is None:
            ages[trial] = None
            continue
        # PostgreSQL answers with time zones, SQLite without (Optuna's own fix, optuna#2190)
        now, beat = (t.replace(tzinfo=None) for t in (_as_datetime(now), _as_datetime(beat)))
        ages[trial] = (now - beat).total_seconds()
    return ages


def _as_datetime(value: Any) -> datetime.datetime:
    if isinstance(value, str):  # SQLite's CURRENT_TIMESTAMP comes back as text
        return datetime.datetime.fromisoformat(value)
    return value


# ---- distributions and samplers ----------------------------------------------------------------
def contains(dist: BaseDistribution, value: Any) -> bool:
    """Whether `value` is one of `dist`'s values (Optuna checks this only inside add_trial)."""
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


@contextlib.contextmanager
def suggestions(trial: optuna.Trial) -> Iterator[list[tuple[str, BaseDistribution]]]:
    """Every suggest_* call made on `trial` inside the block, as (name, distribution), those
    that return a value the trial already has included (Optuna returns it without a word,
    whatever the distribution asked for). Every suggest_* method of Optuna's Trial goes
    through its `_suggest`, which is wrapped on this one object while the block runs."""
    made: list[tuple[str, BaseDistribution]] = []
    original = trial._suggest

    def recording(name: str, distribution: BaseDistribution) -> Any:
        made.append((name, distribution))
        return original(name, distribution)

    trial._suggest = recording  # type: ignore[method-assign]
    try:
        yield made
    finally:
        del trial._suggest  # the class's method again


def unvisited_grid_points(sampler: optuna.samplers.GridSampler, study: optuna.Study) -> int:
    return len(sampler._get_unvisited_grid_ids(study))


def grid_size(sampler: optuna.samplers.GridSampler) -> int:
    return sampler._n_min_trials


# ---- closing -----------------------------------------------------------------------------------
def close(study: optuna.Study | None) -> None:
    """Release the study's database connections (a PostgreSQL one left open warns when freed)."""
    if study is None:
        return
    close_storage(backend(study))


def close_storage(storage: BaseStorage) -> None:
    """close() for a storage no study was opened on (the study was not there)."""
    rdb = getattr(storage, "_backend", storage)
    if isinstance(rdb, RDBStorage):
        rdb.remove_session()
        rdb.engine.dispose()
