"""The sweeper on its own: a toy Hydra app (tests/apps) swept in this process, stores read back.

No MNIST and no torch: app.py returns x**2 + y**2 and logs nothing, so whatever the MLflow and
Optuna stores hold afterwards was put there by the sweeper. curve_app.py adds switches for
per-epoch reports (pruning), failures and a non-number result.
"""

from __future__ import annotations

import math
import shutil

import optuna
import pytest
from harness import ToyApp, by_number, error_lines, ok
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.search.grammar import parse

COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
# the median pruner at its most eager: trial 0 sets the bar, any later trial may stop at epoch 0
EAGER_MEDIAN = "hydra.sweeper.pruner={name: median, n_startup_trials: 1, n_warmup_steps: 0}"


def assert_one_best(toy: ToyApp, children, minimum: float) -> None:
    """Exactly one run tagged best_run, a COMPLETE one holding the study's minimum."""
    (best,) = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert best.data.tags["optuna.state"] == "COMPLETE"
    assert best.data.metrics["value"] == minimum
    assert int(best.data.tags["optuna.trial_number"]) == toy.study().best_trial.number


# ---- a plain sweep ---------------------------------------------------------------------------


def test_a_sweep_makes_a_parent_run_a_child_per_trial_and_resumes(tmp_path):
    toy = ToyApp(tmp_path)  # no stores yet: the sweeper creates both, as for a new user
    proc = toy.run("hydra.sweeper.n_trials=3")
    ok(proc)

    study = toy.study()
    assert optuna.get_all_study_names(toy.storage) == ["toy"]  # no helper studies
    trials = study.get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 3
    for t in trials:
        assert t.value == pytest.approx(t.params["x"] ** 2 + t.params["y"] ** 2)

    (parent,), children = toy.runs()
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.role"] == "sweep"
    assert parent.data.tags["sweep.state"] == "finished"
    assert parent.data.params["sweeper.sampler"] == "TPESampler"  # the default
    runs = by_number(children)
    assert sorted(runs) == [0, 1, 2]
    for t in trials:
        run = runs[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.state"] == "COMPLETE"
        # the app logs nothing: the params and the metric are the sweeper's
        assert set(run.data.params) == {"x", "y"}
        assert float(run.data.params["x"]) == t.params["x"]
        assert float(run.data.params["y"]) == t.params["y"]
        assert run.data.metrics == {"value": t.value}
    best = min(trials, key=lambda t: t.value)
    assert_one_best(toy, children, best.value)
    assert parent.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best_value"] == best.value

    results = toy.results()
    assert results["best_trial"] == best.number
    assert math.isclose(results["best_value"], best.value)
    assert results["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert results["trials"] == {
        "complete": 3,
        "pruned": 0,
        "failed": 0,
        "running": 0,
        "imported": 0,
        "retried": 0,
    }
    # the end table: a row per trial and the winner marked
    assert "#  x" in proc.stdout and "value" in proc.stdout
    (marked,) = [line for line in proc.stdout.splitlines() if line.endswith("<- best")]
    assert marked.startswith(f"{best.number} ")
    assert "3 complete, 0 pruned, 0 failed" in proc.stdout

    # a larger n_trials continues the same study under the same parent run
    proc = toy.run("hydra.sweeper.n_trials=4")
    ok(proc)
    assert "3/4 finished - resuming" in proc.stdout
    study = toy.study()
    assert [(t.number, t.state) for t in study.get_trials()] == [(n, COMPLETE) for n in range(4)]
    assert optuna.get_all_study_names(toy.storage) == ["toy"]
    (again,), children = toy.runs()
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert sorted(by_number(children)) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert_one_best(toy, children, study.best_value)
    assert toy.results()["trials"]["complete"] == 4


# ---- samplers --------------------------------------------------------------------------------


def test_the_console_names_params_by_the_shortest_ending_that_tells_them_apart(tmp_path):
    proc = ToyApp(tmp_path).run(
        "hydra.sweeper.n_trials=2", "+a.lr=choice(1)", "+b.lr=choice(3)", "hydra.sweeper.seed=0"
    )
    ok(proc)
    lines = proc.stdout.splitlines()
    assert any(line.startswith("[trial 0] ") and " a.lr=1 b.lr=3 " in line for line in lines)
    (header,) = [line for line in lines if line.lstrip().startswith("#")]
    assert header.split()[:5] == ["#", "a.lr", "b.lr", "x", "y"], header


def test_a_command_line_sweep_may_add_a_key_the_config_lacks(tmp_path):
    """`+z=choice(1,2)`: each trial's override adds z (the `+` stays in the Optuna param's
    name, as a search-space function's `+w`); the run's param is `z`."""
    toy = ToyApp(tmp_path)
    ok(toy.run("hydra.sweeper.n_trials=3", "+z=choice(1,2)"))
    trials = toy.study().get_trials()
    assert [set(t.params) for t in trials] == [{"x", "y", "+z"}] * 3
    (parent,), children = toy.runs()
    assert parent.data.params["search.z"] == "choice(1, 2)"
    for t in trials:
        assert by_number(children)[t.number].data.params["z"] == str(t.params["+z"])
        overrides = (toy.sweep_dir / str(t.number) / ".hydra" / "overrides.yaml").read_text()
        assert f"+z={t.params['+z']}" in overrides
    proc = toy.run("hydra.sweeper.n_trials=1", "x=choice(1,2)", "+x=choice(1,2)")
    assert error_lines(proc) == [
        "Error: the search space names x more than once (x, +x): keep one"
    ], proc.stderr[-2000:]


@pytest.mark.parametrize(
    "name, cls",
    # tpe, the default, runs in the first test; random in the pruning test
    [("cmaes", "CmaEsSampler"), ("gp", "GPSampler"), ("qmc", "QMCSampler")],
)
def test_every_sampler_by_name_runs_a_sweep_to_the_end(sphere, name, cls):
    toy = sphere
    proc = toy.run(f"hydra.sweeper.sampler={name}", "hydra.sweeper.n_trials=3")
    ok(proc)
    assert [t.state for t in toy.study().get_trials()] == [COMPLETE] * 3
    (parent,), children = toy.runs()
    assert parent.data.params["sweeper.sampler"] == cls
    assert parent.info.status == "FINISHED"
    assert len(children) == 3


@pytest.mark.parametrize("n_trials", [2, 5])
def test_the_grid_sampler_stops_when_every_point_was_tried(sphere, n_trials):
    toy = sphere
    # a grid of two points: x from the command line, y fixed (out of hydra.sweeper.params)
    proc = toy.run(
        "hydra.sweeper.sampler=grid", "x=choice(1,2)", "y=0", f"hydra.sweeper.n_trials={n_trials}"
    )
    ok(proc)
    trials = toy.study().get_trials()
    assert sorted(t.params["x"] for t in trials) == [1, 2]
    assert [t.state for t in trials] == [COMPLETE] * 2  # nothing left RUNNING, no extra trial
    assert ("The grid is used up" in proc.stdout) == (n_trials > 2)
    (parent,), children = toy.runs()
    assert parent.info.status == "FINISHED"
    assert all(set(r.data.params) == {"x"} for r in children)  # y=0 is no parameter
    assert_one_best(toy, children, 1.0)  # x=1, y=0
    assert toy.results()["best_params"] == {"x": 1}


# ---- pruning, failures, results that are not numbers -----------------------------------------


def test_trials_with_worse_curves_are_pruned_through_job_report(curve):
    epochs = 4
    proc = curve.run(
        f"epochs={epochs}", "hydra.sweeper.sampler=random", "hydra.sweeper.n_trials=6", EAGER_MEDIAN
    )
    ok(proc)
    trials = curve.study().get_trials()
    pruned = [t for t in trials if t.state == PRUNED]
    complete = [t for t in trials if t.state == COMPLETE]
    assert pruned and complete and len(trials) == 6
    for t in complete:
        assert sorted(t.intermediate_values) == list(range(epochs))
    for t in pruned:  # stopped before the last epoch, on a worse curve than the median
        assert max(t.intermediate_values) < epochs - 1
        assert t.params["x"] ** 2 + t.params["y"] ** 2 > min(c.value for c in complete)

    (parent,), children = curve.runs()
    runs = by_number(children)
    for t in pruned:
        run = runs[t.number]
        assert run.info.status == "KILLED"
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert int(run.data.tags["pruned_at_epoch"]) == max(t.intermediate_values)
        assert "best_run" not in run.data.tags
    assert_one_best(curve, children, min(t.value for t in complete))
    assert parent.data.tags["trials.pruned"] == str(len(pruned))
    assert parent.data.params["sweeper.sampler"] == "RandomSampler"


def failed_runs(toy: ToyApp) -> dict:
    _, children = toy.runs()
    return {n: r for n, r in by_number(children).items() if r.data.tags["optuna.state"] == "FAIL"}


@pytest.mark.parametrize("in_run", [False, True], ids=["before its run", "inside its run"])
def test_failing_trials_are_recorded_and_a_full_budget_finishes_the_sweep(curve, in_run):
    # inside its run: the job raises between mlflow.start_run() and end_run(), leaving its run
    # active in this process; once, every later trial here failed with "Run ... is already
    # active" (found by the chaos soak)
    proc = curve.run(
        "fail_if_x_above=0",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.n_trials=3",
        f"log_curve={in_run}",
    )
    ok(proc)
    trials = curve.study().get_trials()
    failed = [t for t in trials if t.state == FAIL]
    assert failed, "seed 0 asks for x > 0 first"
    assert all(t.params["x"] > 0 for t in failed)
    assert all(t.params["x"] <= 0 for t in trials if t.state == COMPLETE)
    assert [t.state for t in trials].count(COMPLETE) == 3
    runs = failed_runs(curve)
    assert sorted(runs) == [t.number for t in failed]
    for run in runs.values():
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"].startswith("ValueError: x=")
    (parent,), children = curve.runs()
    assert parent.info.status == "FINISHED"
    assert_one_best(curve, children, curve.study().best_value)


def test_a_non_number_fails_its_trial_the_budget_stops_and_the_fixed_rerun_finishes(curve):
    # every trial returns text; max_failure_rate=0 stops at the first failure
    proc = curve.run(
        "return_text=true", "hydra.sweeper.max_failure_rate=0", "hydra.sweeper.n_trials=2"
    )
    ok(proc, code=1)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "max_failure_rate" in errors[0]
    (trial,) = curve.study().get_trials()  # stopped at once, nothing left RUNNING
    assert trial.state == FAIL and "not a number" in trial.user_attrs["fail_reason"]
    (parent,), _ = curve.runs()
    assert parent.info.status == "FAILED"
    (run,) = failed_runs(curve).values()
    assert run.info.status == "FAILED" and "not a number" in run.data.tags["failure_reason"]
    assert "value" not in run.data.metrics

    # the cause fixed: the earlier failure does not count against this command's budget
    proc = curve.run("hydra.sweeper.max_failure_rate=0", "hydra.sweeper.n_trials=2")
    ok(proc)
    study = curve.study()
    assert [t.state for t in study.get_trials()] == [FAIL, COMPLETE, COMPLETE]
    (again,), children = curve.runs()
    assert again.info.run_id == parent.info.run_id and again.info.status == "FINISHED"
    assert_one_best(curve, children, study.best_value)


# ---- input the sweeper refuses before it creates anything -------------------------------------

# (override, what its one error line says)
REFUSED = [
    ("hydra.sweeper.study_name=a/b", "is not a usable name"),
    ("hydra.sweeper.study_name=..", "is not a usable name"),
    (f"hydra.sweeper.study_name={'s' * 300}", "is not a usable name"),
    ("hydra.sweeper.study_name='a\nb'", "study_name='a\\nb' is not a usable name"),
    ("+hostile=nul_study_name", "study_name='a\\x00b' is not a usable name"),  # from YAML
    ("x=interval(0.5, 0.1)", "`low <= high` must hold"),
    ("x=tag(log, interval(0, 1))", "`low > 0` must hold"),
    ("x=range(5, 1)", "the range is empty"),
    ("hydra.sweeper.n_jobs=0", "hydra.sweeper.n_jobs=0 must be from 1"),
    ("hydra.sweeper.n_jobs=-1", "hydra.sweeper.n_jobs=-1 must be from 1"),
    ("hydra.sweeper.n_jobs=10000", "hydra.sweeper.n_jobs=10000 must be from 1"),
    ("hydra.sweeper.n_trials=1000000000000", "must be a whole number from 1 to"),
    ("hydra.sweeper.trial_timeout=-1", "must be a number of seconds > 0"),
    ("hydra.sweeper.tracking_uri=foo://bar", "unknown scheme 'foo'"),
    # once accepted: a crash after the stores existed, a silent truncation to int(interval(1, 1)),
    # a crash, a job handed the string '[1,2]'
    ("x=interval(nan, 1)", "nan is not a finite number"),
    ("x=int(interval(1.5, 1.7))", "holds no whole number"),
    ("x=range(0.0, 1.0, 0.0)", "the step must be > 0"),
    ("x=choice([1,2],[3])", "is a list or mapping"),
    # (on the command line, Hydra itself refuses choice() before any sweeper runs)
    ("hydra.sweeper.params.x='choice()'", "empty choice is not legal"),
    # once a traceback from Optuna
    ("hydra.sweeper.heartbeat_grace=0", "must be whole seconds with grace > interval"),
    ("hydra.sweeper.heartbeat_interval=60", "must be whole seconds with grace > interval"),
    # once MLflow's "filesystem tracking backend is in maintenance mode", the study created
    ("hydra.sweeper.tracking_uri=file:///tmp/runs", "MLflow 3 keeps its file store"),
    ("hydra.sweeper.storage_outage_limit=soon", "storage_outage_limit='soon' is not a duration"),
    ("hydra.sweeper.storage_outage_limit=0", "storage_outage_limit=0 is not a duration"),
    ("hydra.sweeper.timeout=-5m", "timeout='-5m' is not a duration"),
    # a search space in Python (tests/apps/spaces.py): an override, or several
    (
        "hydra.sweeper.search_space=spaces.suggests_missing_key",
        "spaces.suggests_missing_key suggests 'w', a key the config does not have: add w to the "
        "config, or suggest '+w'",
    ),
    (
        "hydra.sweeper.search_space=spaces.adds_existing_key",
        "suggests '+epochs', but the config has epochs already (Hydra refuses to add it again)",
    ),
    (
        "hydra.sweeper.search_space=spaces.redefines_x",
        "spaces.redefines_x suggests x as [0.0, 1.0], which hydra.sweeper.params (or the command "
        "line) defines as [-5.5, 5.5]: define each key in one place",
    ),
    ("hydra.sweeper.search_space=spaces.redefines_x_as_choice", "define each key in one place"),
    (
        "hydra.sweeper.search_space=spaces.suggests_w_twice",
        "spaces.suggests_w_twice suggests both '+w' and '++w', one config key w",
    ),
    (
        "hydra.sweeper.search_space=spaces.no_such_function",
        "search_space='spaces.no_such_function' cannot be imported: spaces has no "
        "'no_such_function'",
    ),
    (
        "hydra.sweeper.custom_search_space=no_such_module.configure",
        "custom_search_space='no_such_module.configure' cannot be imported: No module named "
        "'no_such_module'",
    ),
    (
        "hydra.sweeper.search_space=spaces.one_argument",
        "one_argument(trial) -> None cannot be called as Hydra calls a search-space function, "
        "fn(cfg: DictConfig, trial: optuna.Trial) -> None",
    ),
    (
        "hydra.sweeper.search_space=spaces.NOT_A_FUNCTION",
        "is not a function but an object of type int",
    ),
    (
        (
            "hydra.sweeper.search_space=spaces.adds_w",
            "hydra.sweeper.custom_search_space=spaces.raises",
        ),
        "name two functions: they are one setting under two names",
    ),
    (
        ("hydra.sweeper.search_space=spaces.adds_w", "hydra.sweeper.sampler=grid", "x=choice(1,2)"),
        "a grid sampler cannot take hydra.sweeper.search_space=spaces.adds_w",
    ),
    (
        "hydra.sweeper.search_space=spaces.raises",
        "hydra.sweeper.search_space: spaces.raises raised RuntimeError: the function is broken "
        "(on the corner x=-5.5)",
    ),
    (
        "hydra.sweeper.search_space=spaces.sets_the_config",
        "raised ReadonlyConfigError: Cannot change read-only config container (on the corner",
    ),
    ("hydra.sweeper.search_space=spaces.not_a_key", "suggests 'a b', which is not a config key"),
]


@pytest.mark.parametrize("override, message", REFUSED, ids=[repr(o[:40])[1:-1] for o, _ in REFUSED])
def test_bad_input_is_one_error_line_and_creates_nothing(tmp_path, override, message):
    proc = ToyApp(tmp_path).run(*([override] if isinstance(override, str) else override))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = error_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert message in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no folder


# a store that is a file already there, and not what it should be: (setting, file, message)
WRONG_FILES = [
    ("tracking_uri", "text", "is not an MLflow store"),  # once: the study, then a traceback
    ("storage", "text", "is not an Optuna storage"),
    ("tracking_uri", "optuna", "not an MLflow store"),  # the two stores in one file
    ("storage", "mlflow", "not an Optuna storage"),
]


@pytest.mark.parametrize("setting, kind, message", WRONG_FILES)
def test_a_store_file_that_is_something_else_is_one_error_line(
    tmp_path, empty_mlflow_store, setting, kind, message
):
    wrong = tmp_path / "wrong.db"
    if kind == "text":
        wrong.write_text("not a database\n" * 100)
    elif kind == "mlflow":
        wrong.write_bytes(empty_mlflow_store.read_bytes())
    else:
        other = ToyApp(tmp_path / "other")
        other.path.mkdir()
        ok(other.run("hydra.sweeper.n_trials=1"))
        wrong.write_bytes((other.path / "optuna.db").read_bytes())
        shutil.rmtree(other.path)
    before = wrong.read_bytes()
    proc = ToyApp(tmp_path).run(f"hydra.sweeper.{setting}=sqlite:///{wrong}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    (error,) = error_lines(proc)
    assert message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wrong.db"]  # nothing else made
    assert wrong.read_bytes() == before  # nor changed


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["storage", "tracking_uri"])
def test_a_database_that_does_not_exist_is_one_error_line(tmp_path, postgres, setting):
    # the password must not show; MLflow alone retried a missing tracking database for ~2 min
    user, server = postgres.split("://", 1)[1].split("@", 1)
    url = f"postgresql://{user}:pass-{setting}@{server}/no_such_db"
    proc = ToyApp(tmp_path).run(f"hydra.sweeper.{setting}={url}")
    ok(proc, code=2)
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert f"postgresql://{user}:***@{server}/no_such_db" in error
    assert 'database "no_such_db" does not exist' in error and "createdb" in error
    assert f"pass-{setting}" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no study, no store, no folder


@pytest.mark.parametrize(
    "expr, expected",
    [
        # range's stop is exclusive and its last value exact: 0.9, not 0.8999999999999999
        ("range(0, 1, 0.3)", FloatDistribution(0.0, 0.9, step=0.3)),
        ("range(1, 10, 3)", IntDistribution(1, 7, step=3)),
        ("shuffle(range(0.0, 1.0, 0.3))", CategoricalDistribution([0.0, 0.3, 0.6, 0.9])),
        ("int(interval(2, 5))", IntDistribution(2, 5)),
    ],
)
def test_ranges_end_on_their_last_value(expr, expected):
    assert parse({}, [f"x={expr}"])[0] == {"x": expected}


@pytest.mark.parametrize(
    "expr, message",
    [
        ("interval(0, inf)", "inf is not a finite number"),
        ("range(nan, 1, 0.1)", "nan is not a finite number"),
        ("choice(nan, 1)", "nan is not a finite number"),
        ("int(interval(1.5, 3.5))", r"write int\(interval\(2, 3\)\)"),
        ("int(interval(1.5, 1.7))", "holds no whole number"),
        ("range(5, 1, -1)", "step must be > 0"),
        ("shuffle(range(0, 1000000000))", "use the range without shuffle"),
        ("choice()", "empty choice is not legal"),
    ],
)
def test_search_spaces_that_cannot_work_are_refused(expr, message):
    for params, arguments in (({"x": expr}, []), ({}, [f"x={expr}"])):
        with pytest.raises(SweepConfigError, match=message):
            parse(params, arguments)
