"""Every use of Optuna's private names, pinned on real storages: an Optuna upgrade that moves one
breaks this file (and _optuna_internals.py), nothing else."""

from __future__ import annotations

import threading
import time

import optuna
import pytest
import sqlalchemy
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mlflow_study_sweeper.search.samplers import ExhaustibleGridSampler
from mlflow_study_sweeper.storage import optuna_internals as internals
from mlflow_study_sweeper.storage.studies import make_storage, optuna_quietly


@pytest.fixture(params=["sqlite", "journal", "memory"])
def study(request, tmp_path):
    """A study on each kind of storage the sweeper opens."""
    url = {
        "sqlite": f"sqlite:///{tmp_path}/optuna.db",
        "journal": str(tmp_path / "optuna.journal"),
        "memory": None,
    }[request.param]
    with optuna_quietly():
        study = optuna.create_study(study_name="s", storage=make_storage(url, 1, 4))
    yield study
    internals.close(study)


def test_ids_and_storage_reach_the_same_trial(study):
    trial = study.ask({"x": FloatDistribution(0, 1)})
    trial_id = internals.trial_id(trial)
    frozen = internals.frozen(study, trial_id)
    assert internals.trial_id(frozen) == trial_id and frozen.number == trial.number
    assert internals.storage(study).get_study_id_from_name("s") == internals.study_id(study)
    live = internals.live_trial(study, trial_id)
    assert live.number == trial.number and live.params == trial.params


def test_ask_new_is_ask_with_attributes_from_the_trials_creation(study):
    """The loop's ask: a new trial as study.ask makes one, sampled from the space, carrying the
    worker's label from its first write; an enqueued trial is left for study.ask."""
    space = {"x": FloatDistribution(0, 1), "n": IntDistribution(1, 4)}
    first = study.ask(space)
    study.enqueue_trial({"x": 0.5, "n": 2})
    with optuna_quietly():
        trial = internals.ask_new(study, space, {"worker": {"host": "h", "pid": "1"}})
    internals.record_started(study, trial, {"mlflow_run_id": "r"})  # the held params too
    frozen = internals.frozen(study, internals.trial_id(trial))
    assert frozen.user_attrs == trial.user_attrs == {"mlflow_run_id": "r"}
    assert trial.number == frozen.number == first.number + 2
    assert frozen.state == TrialState.RUNNING and frozen.datetime_start is not None
    assert frozen.system_attrs["worker"] == {"host": "h", "pid": "1"}
    assert set(trial.params) == {"x", "n"} and frozen.params == trial.params
    assert frozen.distributions == space
    study.tell(trial, 1.0)
    assert study.get_trials()[trial.number].state == TrialState.COMPLETE
    # the enqueued one is still there for study.ask to hand out
    assert study.ask(space).params == {"x": 0.5, "n": 2}


def test_ask_new_does_not_read_back_the_trial_it_created(tmp_path, monkeypatch):
    with optuna_quietly():
        study = optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path}/o.db"))
    reads = []
    rdb = type(internals.backend(study))
    read = rdb.get_trial
    monkeypatch.setattr(rdb, "get_trial", lambda self, i: reads.append(i) or read(self, i))
    try:
        trial = internals.ask_new(study, {"x": FloatDistribution(0, 1)}, {"worker": "w"})
        assert reads == [] and not {"get_trial", "set_trial_param"} & set(
            vars(internals.storage(study))
        )
        # its params are held back, and written with its run id, in one transaction
        assert study.get_trials()[0].params == {} and set(trial.params) == {"x"}
        commits = []
        engine = internals.backend(study).engine
        sqlalchemy.event.listen(engine, "commit", lambda conn: commits.append(1))
        internals.record_started(study, trial, {"mlflow_run_id": "r"})
        assert len(commits) == 1
        frozen = internals.frozen(study, internals.trial_id(trial))
        assert frozen.params == trial.params and frozen.user_attrs == {"mlflow_run_id": "r"}
        assert frozen.system_attrs == {"worker": "w"}
        second = internals.ask_new(study, {"x": FloatDistribution(0, 1)}, {})
        internals.drop_held(internals.trial_id(second))  # a trial that will not run
        internals.record_started(study, second, {"k": 1})
        assert internals.frozen(study, internals.trial_id(second)).params == {}
    finally:
        monkeypatch.undo()
        internals.close(study)


def test_tell_is_study_tell_without_the_read_after(study):
    space = {"x": FloatDistribution(0, 1)}
    with optuna_quietly():
        complete, nan, pruned = (study.ask(space) for _ in range(3))
        pruned.report(0.25, step=3)
        assert internals.tell(study, complete, values=[0.5]) == TrialState.COMPLETE
        with pytest.warns(UserWarning, match="not acceptable"):  # as study.tell warns
            assert internals.tell(study, nan, values=[float("nan")]) == TrialState.FAIL
        assert internals.tell(study, pruned, state=TrialState.PRUNED) == TrialState.PRUNED
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED]
    assert trials[0].values == [0.5] and trials[2].values == [0.25]  # a pruned trial's last value
    assert trials[0].datetime_complete is not None


def test_attributes_and_states_through_the_storage(study):
    trial_id = internals.trial_id(study.ask())
    internals.set_study_system_attr(study, "k", {"a": 1})
    assert internals.study_system_attrs(study)["k"] == {"a": 1}
    internals.set_trial_system_attr(study, trial_id, "s", [1, 2])
    internals.set_trial_user_attr(study, trial_id, "u", "v")
    internals.set_intermediate_value(study, trial_id, 3, 0.5)
    frozen = internals.frozen(study, trial_id)
    assert frozen.system_attrs["s"] == [1, 2] and frozen.user_attrs["u"] == "v"
    assert frozen.intermediate_values == {3: 0.5}
    assert internals.set_trial_state(study, trial_id, TrialState.FAIL)
    assert study.get_trials()[0].state == TrialState.FAIL
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):  # fail_trial relies on it
        internals.set_trial_state(study, trial_id, TrialState.FAIL)


def test_insert_once_is_true_for_exactly_one_of_many_writers(study):
    wins = []
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        if internals.insert_once(study, "claim", i):
            wins.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert internals.study_system_attrs(study)["claim"] == wins[0]
    assert not internals.insert_once(study, "claim", "again")


def test_insert_once_across_two_openings_of_one_database(tmp_path):
    """Two processes open the same database: the INSERT's unique key decides between them."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    with optuna_quietly():
        a = optuna.create_study(study_name="s", storage=make_storage(url))
        b = optuna.load_study(study_name="s", storage=make_storage(url))
    try:
        assert internals.insert_once(a, "claim", "a")
        assert not internals.insert_once(b, "claim", "b")
        assert internals.study_system_attrs(b)["claim"] == "a"
    finally:
        internals.close(a)
        internals.close(b)


def test_replace_if_swaps_only_what_it_saw(study):
    internals.set_study_system_attr(study, "claim", {"v": 1})
    assert not internals.replace_if(study, "claim", {"v": 0}, {"v": 2})
    assert internals.replace_if(study, "claim", {"v": 1}, {"v": 2})
    assert internals.study_system_attrs(study)["claim"] == {"v": 2}


def test_heartbeats_and_their_ages(study):
    interval = internals.heartbeat_interval(study)
    rdb = isinstance(internals.backend(study), optuna.storages.RDBStorage)
    assert interval == (1 if rdb else None)  # journal files and memory keep no heartbeats
    if not rdb:
        assert internals.heartbeat_ages(study) == {}
        return
    beating, silent, done = (internals.trial_id(study.ask()) for _ in range(3))
    internals.record_heartbeat(study, beating)
    internals.set_trial_state(study, done, TrialState.FAIL)  # finished trials are not listed
    time.sleep(1.1)
    ages = internals.heartbeat_ages(study)
    assert set(ages) == {beating, silent}
    assert ages[silent] is None
    assert 1 <= ages[beating] < 30


def test_contains_checks_a_value_against_a_distribution():
    assert internals.contains(FloatDistribution(0, 1), 0.5)
    assert not internals.contains(FloatDistribution(0, 1), 1.5)
    assert internals.contains(IntDistribution(0, 10, step=2), 4)
    assert not internals.contains(IntDistribution(0, 10, step=2), 3)
    assert internals.contains(CategoricalDistribution(["a", "b"]), "b")
    assert not internals.contains(CategoricalDistribution(["a", "b"]), "c")
    assert not internals.contains(FloatDistribution(0, 1), "text")


def test_grid_points_left(tmp_path):
    space = {"x": [1, 2, 3]}
    sampler = ExhaustibleGridSampler(space)
    study = optuna.create_study(sampler=sampler)
    assert internals.grid_size(sampler) == 3
    assert internals.unvisited_grid_points(sampler, study) == 3
    dist = {"x": CategoricalDistribution([1, 2, 3])}
    for left in (2, 1, 0):
        trial = study.ask(dist)
        study.tell(trial, 0.0)
        assert internals.unvisited_grid_points(sampler, study) == left
    assert sampler.exhausted(study)


def test_every_call_of_optunas_cache_into_the_storage_waits_out_an_outage():
    """A study puts Optuna's _CachedStorage in front of an RDBStorage; it calls some private
    methods of it. Each of them, and every name the retrying storage lists, must be its own
    (a worker asking for a trial during a PostgreSQL restart once crashed on _set_trial_param)."""
    import inspect
    import re

    from optuna.storages import RDBStorage, _cached_storage

    called = set(re.findall(r"self\._backend\.(\w+)\(", inspect.getsource(_cached_storage)))
    assert "_set_trial_param" in called  # the pattern still finds them
    own = internals.RetryingRDBStorage.__dict__
    # a heartbeat is tried once (its thread must not stall; the next beat comes soon); the
    # other two read settings, not the database
    once = {"record_heartbeat", "get_heartbeat_interval", "get_heartbeat_stale_trial_callback"}
    assert {name for name in called if name not in own} == once
    assert all(hasattr(RDBStorage, name) for name in internals._RETRIED)


def test_trials_beat_while_they_train_and_not_after(tmp_path):
    """One thread of the process beats for its trials: the first beat after FIRST_BEAT_S, then
    one per interval, none once a trial is over (liveness.Heartbeat)."""
    from mlflow_study_sweeper.storage import liveness

    with optuna_quietly():
        study = optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path}/o.db", 1, 4))
    try:
        quick, long = (internals.trial_id(study.ask()) for _ in range(2))
        with liveness.Heartbeat(study, quick):
            pass  # shorter than the first beat: no write
        with liveness.Heartbeat(study, long):
            time.sleep(liveness.FIRST_BEAT_S + 1.5)
            ages = internals.heartbeat_ages(study)
            assert ages[quick] is None and ages[long] is not None and ages[long] < 2
        assert liveness.BEATS.due == {} and liveness.BEATS.beating is None
        time.sleep(2.2)
        assert internals.heartbeat_ages(study)[long] >= 2  # silent since the trial ended
    finally:
        internals.close(study)
