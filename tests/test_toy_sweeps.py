"""The sweeper on its own: a toy Hydra app (tests/toy_app) swept as a subprocess, stores read back.

No MNIST and no torch: app.py returns x**2 + y**2 and logs nothing, so whatever the MLflow and
Optuna stores hold afterwards was put there by the sweeper. curve_app.py adds switches for
per-epoch reports (pruning), failures and a non-number result.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.mlflow_optuna_sweeper._errors import SweepConfigError
from hydra_plugins.mlflow_optuna_sweeper._space import parse

APP_DIR = Path(__file__).resolve().parent / "toy_app"
COMPLETE, PRUNED, FAIL = TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL
# the median pruner at its most eager: trial 0 sets the bar, any later trial may stop at epoch 0
EAGER_MEDIAN = "hydra.sweeper.pruner={name: median, n_startup_trials: 1, n_warmup_steps: 0}"


class Toy:
    """One sweep folder: the toy app run there as a user would, and both stores read back."""

    def __init__(self, path: Path, app: str = "app.py") -> None:
        self.path = path
        self.app = app
        self.storage = f"sqlite:///{path}/optuna.db"
        self.tracking_uri = f"sqlite:///{path}/mlflow.db"
        self.sweep_dir = path / "multirun"

    def command(self, *overrides: str) -> list[str]:
        return [
            sys.executable,
            str(APP_DIR / self.app),
            "-m",
            f"hydra.sweep.dir={self.sweep_dir}",
            f"hydra.sweeper.storage={self.storage}",
            f"hydra.sweeper.tracking_uri={self.tracking_uri}",
            *overrides,  # last, so that a test's override wins
        ]

    def run(self, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_", "HYDRA_"))
        }
        env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        return subprocess.run(
            self.command(*overrides),
            cwd=self.path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name="toy", storage=self.storage)

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking_uri)

    def runs(self) -> tuple[list, list]:
        """(parent runs, trial runs) across the store's experiments."""
        client = self.client()
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, max_results=1000)
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
        children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
        return parents, children

    def results(self) -> dict:
        return yaml.safe_load((self.sweep_dir / "optimization_results.yaml").read_text())


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-4000:]


def by_number(children) -> dict:
    return {int(r.data.tags["optuna.trial_number"]): r for r in children}


def assert_one_best(toy: Toy, children, minimum: float) -> None:
    """Exactly one run tagged best_run, a COMPLETE one holding the study's minimum."""
    (best,) = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert best.data.tags["optuna.state"] == "COMPLETE"
    assert best.data.metrics["value"] == minimum
    assert int(best.data.tags["optuna.trial_number"]) == toy.study().best_trial.number


@pytest.fixture
def toy(tmp_path, empty_mlflow_store) -> Toy:
    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")  # conftest's: tables already made
    return Toy(tmp_path)


@pytest.fixture
def curve(toy) -> Toy:
    toy.app = "curve_app.py"
    return toy


# ---- a plain sweep ---------------------------------------------------------------------------


def test_a_sweep_makes_a_parent_run_a_child_per_trial_and_resumes(tmp_path):
    toy = Toy(tmp_path)  # no stores yet: the sweeper creates both, as for a new user
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


@pytest.mark.parametrize(
    "name, cls",
    # tpe, the default, runs in the first test; random in the pruning test
    [("cmaes", "CmaEsSampler"), ("gp", "GPSampler"), ("qmc", "QMCSampler")],
)
def test_every_sampler_by_name_runs_a_sweep_to_the_end(toy, name, cls):
    proc = toy.run(f"hydra.sweeper.sampler={name}", "hydra.sweeper.n_trials=3")
    ok(proc)
    assert [t.state for t in toy.study().get_trials()] == [COMPLETE] * 3
    (parent,), children = toy.runs()
    assert parent.data.params["sweeper.sampler"] == cls
    assert parent.info.status == "FINISHED"
    assert len(children) == 3


@pytest.mark.parametrize("n_trials", [2, 5])
def test_the_grid_sampler_stops_when_every_point_was_tried(toy, n_trials):
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


def failed_runs(toy: Toy) -> dict:
    _, children = toy.runs()
    return {n: r for n, r in by_number(children).items() if r.data.tags["optuna.state"] == "FAIL"}


def test_failing_trials_are_recorded_and_a_full_budget_finishes_the_sweep(curve):
    proc = curve.run(
        "fail_if_x_above=0", "hydra.sweeper.max_failure_rate=1.0", "hydra.sweeper.n_trials=3"
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
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[str]]]:
    """Every bad override run once, two at a time: each is seconds of imports, then one line."""

    def attempt(case: tuple[int, str]):
        path = tmp_path_factory.mktemp(f"refused{case[0]}")
        proc = Toy(path).run(case[1], timeout=120)
        return case[1], (proc, sorted(p.name for p in path.iterdir()))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(attempt, enumerate(override for override, _ in REFUSED)))


@pytest.mark.parametrize("override, message", REFUSED, ids=[repr(o[:40])[1:-1] for o, _ in REFUSED])
def test_bad_input_is_one_error_line_and_creates_nothing(refused, override, message):
    proc, files = refused[override]
    ok(proc, code=2)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert message in errors[0]
    assert "optuna.db" not in files and "mlflow.db" not in files


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["storage", "tracking_uri"])
def test_a_database_that_does_not_exist_is_one_error_line(tmp_path, postgres, setting):
    # the password must not show; MLflow alone retried a missing tracking database for ~2 min
    user, server = postgres.split("://", 1)[1].split("@", 1)
    url = f"postgresql://{user}:pass-{setting}@{server}/no_such_db"
    proc = Toy(tmp_path).run(f"hydra.sweeper.{setting}={url}")
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
