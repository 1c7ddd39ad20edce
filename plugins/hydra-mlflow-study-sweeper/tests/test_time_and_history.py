"""A wall-clock budget, parameter sets tried first, and warm starts from an earlier study."""

from __future__ import annotations

import time

import optuna
import pytest
import yaml
from harness import check_invariant, ok, toy_app
from optuna.trial import TrialState

from mlflow_study_sweeper import keys


def test_the_time_budget_stops_a_long_trial_at_an_epoch_and_the_end_still_runs(toy):
    started = time.time()
    proc = toy.run(
        "hydra.sweeper.timeout=8s",
        "hydra.sweeper.pruner=null",
        "epochs=60",
        "epoch_seconds=0.25",  # 15 s a trial: the first one cannot finish in time
        "checkpoint=true",
    )
    ok(proc)
    (trial,) = toy.study().get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.system_attrs["failure"] == "time_budget"
    assert "stopped by the time budget" in trial.user_attrs["fail_reason"]
    assert 10 < len(trial.intermediate_values) < 60  # its curve up to the stop is kept
    assert trial.datetime_complete.timestamp() - started < 8 + 15  # imports before the budget
    runs = {r.info.run_id: r for r in toy.all_runs()}
    run = runs[trial.user_attrs["mlflow_run_id"]]
    assert run.info.status == "KILLED" and run.data.tags["stopped_by"] == "time_budget"
    (parent,) = [r for r in runs.values() if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["time_budget_s"] == 8
    assert parent.data.tags["stopped_by_budget"] == "True"
    assert "Time budget 8s" in proc.stdout and "1 stopped by the budget" in proc.stdout

    # the next command continues that trial after its last checkpoint, instead of redoing it
    step = trial.system_attrs["checkpoint_step"]
    ok(
        toy.run(
            "hydra.sweeper.pruner=null", "epochs=60", "checkpoint=true", "hydra.sweeper.n_trials=1"
        )
    )
    stopped, continued = toy.study().get_trials()
    assert continued.state == TrialState.COMPLETE and continued.params == stopped.params
    assert continued.user_attrs["continues_trial"] == 0
    assert sorted(continued.intermediate_values) == list(range(60))  # the whole curve
    assert all(
        continued.intermediate_values[s] == stopped.intermediate_values[s] for s in range(step + 1)
    )
    run = {r.info.run_id: r for r in toy.all_runs()}[continued.user_attrs["mlflow_run_id"]]
    assert run.data.tags["continues_run"] == stopped.user_attrs["mlflow_run_id"]


def test_n_trials_still_caps_a_generous_budget(toy):
    proc = toy.run("hydra.sweeper.timeout=1h", "hydra.sweeper.n_trials=2", "epochs=0")
    ok(proc)
    assert len(toy.study().get_trials()) == 2
    assert "all trials finished" in proc.stdout


def test_enqueued_parameters_run_first_and_count(toy):
    ok(toy.run("hydra.sweeper.enqueue=[{x: 1.0, y: 2.0}]", "epochs=0"))
    trials = toy.study().get_trials()
    assert trials[0].params == {"x": 1.0, "y": 2.0} and trials[0].value == 5.0
    check_invariant(toy)
    # a rerun does not enqueue again
    ok(toy.run("hydra.sweeper.enqueue=[{x: 1.0, y: 2.0}]", "hydra.sweeper.n_trials=4", "epochs=0"))
    assert sum(t.params == {"x": 1.0, "y": 2.0} for t in toy.study().get_trials()) == 1


def test_an_enqueued_value_outside_the_space_is_one_error(toy):
    proc = toy.run("hydra.sweeper.enqueue=[{x: 9.0, y: 0.0}]")
    assert proc.returncode == 2 and "enqueue[0].x=9.0 is outside the search space" in proc.stderr
    assert not (toy.path / "optuna.db").exists()


def warm_and_cold(tmp_path, seed: int, source: str) -> tuple[float, float]:
    best = []
    for name in ("cold", "warm"):
        toy = toy_app(tmp_path / f"{name}-{seed}", storage=source)
        extra = ["hydra.sweeper.warm_start_from=history"] if name == "warm" else []
        ok(
            toy.run(
                f"hydra.sweeper.study_name={name}-{seed}",
                f"hydra.sweeper.seed={seed}",
                "hydra.sweeper.n_trials=5",
                "epochs=0",
                *extra,
            )
        )
        study = toy.study(f"{name}-{seed}")
        toy.close()
        own = [t for t in study.get_trials() if "imported_from" not in t.user_attrs]
        assert len(own) == 5
        best.append(min(t.value for t in own))
    return best[0], best[1]


def history(tmp_path) -> str:
    """A 30-trial random study of the toy function: what last week's sweep left."""
    source = f"sqlite:///{tmp_path}/history.db"
    toy = toy_app(tmp_path / "history", storage=source)
    ok(
        toy.run(
            "hydra.sweeper.study_name=history",
            "hydra.sweeper.sampler=random",
            "hydra.sweeper.n_trials=30",
            "epochs=0",
        )
    )
    return source


@pytest.mark.slow
def test_a_warm_start_imports_the_earlier_trials_without_training_or_counting_them(tmp_path):
    source = history(tmp_path)
    toy = toy_app(tmp_path / "warm", storage=source)
    proc = toy.run(
        "hydra.sweeper.study_name=warm",
        "hydra.sweeper.warm_start_from=history",
        "hydra.sweeper.n_trials=3",
        "epochs=0",
        "x=interval(-5.5, 0)",  # half of the history lies outside this space
    )
    ok(proc)
    assert "warm start: imported" in proc.stdout and "outside the search space" in proc.stdout
    study = toy.study("warm")
    imported = [t for t in study.get_trials() if "imported_from" in t.user_attrs]
    own = [t for t in study.get_trials() if "imported_from" not in t.user_attrs]
    assert 0 < len(imported) < 30 and all(t.params["x"] <= 0 for t in imported)
    assert len(own) == 3  # n_trials counts this sweep's own trials
    assert all(t.user_attrs["imported_run_id"] for t in imported)  # linked to their runs
    _, children = toy.runs()
    toy.close()
    assert len(children) == 3  # nothing was trained again
    (best,) = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert "IMPORTED" in proc.stdout


def test_a_warm_start_from_an_earlier_sweeps_mlflow_runs(toy):
    ok(toy.run("hydra.sweeper.study_name=last-week", "hydra.sweeper.n_trials=8", "epochs=0"))
    results = yaml.safe_load((toy.path / "multirun" / "optimization_results.yaml").read_text())
    earlier = {t.user_attrs["mlflow_run_id"]: t for t in toy.study("last-week").get_trials()}
    # a new Optuna storage: last week's sweep is known to MLflow only
    fresh = toy_app(toy.path, storage=f"sqlite:///{toy.path}/fresh.db")
    proc = fresh.run(
        "hydra.sweeper.study_name=this-week",
        f"hydra.sweeper.warm_start_from=runs:/{results['parent_run_id']}",
        "hydra.sweeper.n_trials=2",
        "epochs=0",
        "x=interval(-5.5, 0)",  # some of last week's trials lie outside this space
    )
    ok(proc)
    try:
        trials = fresh.study("this-week").get_trials()
    finally:
        fresh.close()
    imported = [t for t in trials if "imported_from" in t.user_attrs]
    inside = [t for t in earlier.values() if t.params["x"] <= 0]
    assert len(imported) == len(inside) and len(trials) == len(inside) + 2
    for t in imported:  # the same parameters and values, linked to the runs they came from
        source = earlier[t.user_attrs["imported_run_id"]]
        assert t.params == source.params and t.value == source.value
    assert f"warm start: imported {len(inside)} trial(s) of the sweep of run" in proc.stdout
    assert f"skipped {8 - len(inside)} outside the search space" in proc.stdout


def test_a_warm_start_from_runs_reads_a_choice_of_null_back(toy):
    """A choice of null (a search-space function's: the grammar has none) is logged as the
    param "None", and read back as None: a value, not a param the run lacks (such trials were
    skipped as "other parameters")."""
    space = (
        "hydra.sweeper.search_space=spaces.adds_mode_or_null",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0",
    )
    ok(
        toy.run(
            "hydra.sweeper.study_name=last-week", "hydra.sweeper.n_trials=6", "epochs=0", *space
        )
    )
    results = yaml.safe_load((toy.path / "multirun" / "optimization_results.yaml").read_text())
    earlier = toy.study("last-week").get_trials()
    assert {t.params["+mode"] for t in earlier} == {None, "fast"}
    fresh = toy_app(toy.path, storage=f"sqlite:///{toy.path}/fresh.db")
    proc = fresh.run(
        "hydra.sweeper.study_name=this-week",
        f"hydra.sweeper.warm_start_from=runs:/{results['parent_run_id']}",
        "hydra.sweeper.n_trials=1",
        *space,
    )
    ok(proc)
    try:
        imported = [t for t in fresh.study("this-week").get_trials() if keys.is_imported(t)]
    finally:
        fresh.close()
    assert sorted(map(str, (t.params["+mode"] for t in imported))) == sorted(
        map(str, (t.params["+mode"] for t in earlier))
    )


@pytest.mark.slow
def test_a_warm_start_finds_better_values_sooner_than_a_cold_one(tmp_path):
    source = history(tmp_path)
    results = [warm_and_cold(tmp_path, seed, source) for seed in (0, 1, 2)]
    print("best of the first 5 trials, cold vs warm:", results)
    assert all(warm < cold for cold, warm in results), results


def test_the_budget_judges_a_trial_by_its_epochs_not_by_pruned_durations():
    """Trials of 10 planned epochs: 4 s to the first report, 2 s per epoch after (23 s whole).

    Trial 0 ran 4 epochs and was stopped by the budget, trial 1 was pruned after 2 epochs
    (7 s): the median finished duration would say 7 s, the epochs say 23 s.
    """
    import datetime

    from optuna.distributions import FloatDistribution
    from optuna.trial import FrozenTrial

    from mlflow_study_sweeper.keys import EPOCH_CLOCK
    from mlflow_study_sweeper.sweep.budget import expected_seconds

    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    t0 = start.timestamp()
    study = optuna.create_study()

    def add(state, epochs: int, ends: float | None) -> None:
        clock = {"first": t0 + 5, "last": t0 + 5 + 2 * (epochs - 1), "n": epochs, "total": 10}
        study.add_trial(
            FrozenTrial(
                number=0,
                state=state,
                value=None,
                values=None,
                datetime_start=start,
                datetime_complete=start + datetime.timedelta(seconds=ends) if ends else None,
                params={"x": 0.0},
                distributions={"x": FloatDistribution(-1, 1)},
                user_attrs={},
                system_attrs={EPOCH_CLOCK: clock},
                intermediate_values={},
                trial_id=0,
            )
        )

    assert expected_seconds(study.get_trials()) == 0.0  # nothing to judge by: a trial may start
    add(TrialState.FAIL, 4, 11.0)
    add(TrialState.PRUNED, 2, 7.0)
    assert expected_seconds(study.get_trials()) == pytest.approx(23.0)
