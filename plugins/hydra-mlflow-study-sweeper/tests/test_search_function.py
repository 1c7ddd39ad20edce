"""A search space in Python (hydra.sweeper.search_space, Hydra's custom_search_space): Hydra's own
example and test on this sweeper, a conditional param (optimizer.momentum only for SGD) through
every path that reads a trial's params: the runs, the end table, the report, enqueued sets, warm
starts, continued trials, several objectives. Bad input is in test_sweeps.py's table."""

from __future__ import annotations

import shutil

import optuna
import pytest
from harness import APPS, ToyApp, by_number, clean_env, error_lines, ok, run_in_process
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.search.grammar import parse
from mlflow_study_sweeper.search.space_function import SearchFunction
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.storage.studies import fail_trial
from mlflow_study_sweeper.trial import resume

COMPLETE, FAIL = TrialState.COMPLETE, TrialState.FAIL
HYDRA_EXAMPLE = APPS / "hydra_custom" / "custom-search-space-objective.py"
MOMENTUM = "optimizer.momentum"


@pytest.fixture
def optimizer(tmp_path, empty_mlflow_store) -> ToyApp:
    """apps/optimizer_app.py: optimizer.name in choice(adam, sgd), lr in the grammar, and its
    function `space` suggesting optimizer.momentum only for sgd."""
    shutil.copy(empty_mlflow_store, tmp_path / "mlflow.db")
    app = ToyApp(tmp_path, "optimizer_app.py")
    yield app
    app.close()


def sgd(params: dict) -> bool:
    return params["optimizer.name"] == "sgd"


def loss(params: dict) -> float:
    """What optimizer_app.py returns for these params (so the job saw them)."""
    rest = (params[MOMENTUM] - 0.9) ** 2 if sgd(params) else 0.3
    return (params["lr"] - 0.01) ** 2 * 1e4 + rest


# ---- Hydra's own example and test ------------------------------------------------------------


# Hydra's example leaves out @hydra.main's version_base, and Hydra warns about it
@pytest.mark.filterwarnings("ignore::hydra.errors.Hydra14MigrationWarning")
def test_hydras_custom_search_space_example_and_test_run_on_this_sweeper(tmp_path):
    """Hydra's tests/test_optuna_sweeper_plugin.py::test_optuna_custom_search_space_example, on
    Hydra's example (apps/hydra_custom: the function unchanged, its config picking this sweeper):
    the same command (hydra/sweeper/sampler=random and its seed become this sweeper's `sampler`
    and `seed`; both stores in tmp_path), the same assertions, then this sweeper's own."""
    max_z_difference_from_x = 0.3
    cmd = [
        str(HYDRA_EXAMPLE),
        "--multirun",
        "hydra.sweep.dir=" + str(tmp_path / "multirun"),
        "hydra.job.chdir=True",
        "hydra.sweeper.n_trials=20",
        "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=123",
        f"max_z_difference_from_x={max_z_difference_from_x}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path}/optuna.db",
        f"hydra.sweeper.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
    ]
    proc = run_in_process(cmd, tmp_path, clean_env())
    ok(proc)
    # Hydra's assertions
    returns = OmegaConf.load(f"{tmp_path}/multirun/optimization_results.yaml")
    assert isinstance(returns, DictConfig)
    assert returns.name == "optuna"
    assert abs(returns["best_params"]["x"] - returns["best_params"]["z"]) <= max_z_difference_from_x
    w = returns["best_params"]["+w"]
    assert 0 <= w <= 1

    # this sweeper's: every trial has the grammar's params and the function's, and its job got
    # them all (the value is w^2 + x^2 + y^2 + z^2 of its own config)
    app = ToyApp(tmp_path)
    try:
        trials = app.study("custom-search-space").get_trials()
    finally:
        app.close()
    assert [t.state for t in trials] == [COMPLETE] * 20
    for t in trials:
        assert set(t.params) == {"x", "y", "z", "+w"}
        assert abs(t.params["x"] - t.params["z"]) <= max_z_difference_from_x  # the cfg it read
        assert 0 <= t.params["+w"] <= 1
        assert t.value == pytest.approx(sum(v**2 for v in t.params.values()))
    # the invariant: one parent, a run per trial that agrees with it, the same keys on every run
    (parent,), children = app.runs()
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweeper.search_space"] == "custom-search-space-objective.configure"
    runs = by_number(children)
    assert sorted(runs) == list(range(20))
    for t in trials:
        run = runs[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        # `+w` is the run's param `w` (MLflow refuses `+` in a name)
        assert {k: float(v) for k, v in run.data.params.items()} == {
            keys.config_key(k): v for k, v in t.params.items()
        }
        assert run.data.metrics == {"value": t.value}
    (best,) = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert best.data.tags["optuna.trial_number"] == str(returns.best_trial)
    assert float(parent.data.params["best.w"]) == w


# ---- a conditional param ---------------------------------------------------------------------


def test_a_conditional_param_lives_only_in_the_trials_and_runs_that_drew_it(optimizer):
    proc = optimizer.run()  # 20 trials, as optimizer.yaml says
    ok(proc)
    trials = optimizer.study().get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 20  # an Adam trial given an SGD momentum fails
    assert {t.params["optimizer.name"] for t in trials} == {"adam", "sgd"}
    for t in trials:
        assert (MOMENTUM in t.params) == sgd(t.params)
        assert t.value == pytest.approx(loss(t.params))
        if sgd(t.params):
            assert 0.0 <= t.params[MOMENTUM] <= 0.99  # max_momentum, read from the config
            assert t.distributions[MOMENTUM] == optuna.distributions.FloatDistribution(0, 0.99)

    (parent,), children = optimizer.runs()
    runs = by_number(children)
    for t in trials:  # every run: the params it drew, the metric; momentum only for SGD
        run = runs[t.number]
        always = {"lr", "optimizer.name"}
        assert set(run.data.params) == always | ({MOMENTUM} if sgd(t.params) else set())
        assert run.data.params["optimizer.name"] == t.params["optimizer.name"]
        assert float(run.data.params["lr"]) == t.params["lr"]
        if sgd(t.params):
            assert float(run.data.params[MOMENTUM]) == t.params[MOMENTUM]
        assert run.data.metrics == {"value": t.value}
    assert parent.data.params["sweeper.search_space"] == "optimizer_app.space"
    assert {"search.lr", "search.optimizer.name"} <= set(parent.data.params)
    assert "the params of optimizer_app.space" in proc.stdout

    # the end table: `-` where a trial has no momentum
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "lr"])
    assert lines[header].split()[:4] == ["#", "lr", "momentum", "name"]
    for t, line in zip(trials, lines[header + 1 : header + 21], strict=True):
        cells = line.split()
        assert cells[0] == str(t.number) and cells[3] == t.params["optimizer.name"]
        assert (cells[2] == "-") == (not sgd(t.params))

    # the report: Optuna's views over params that some trials lack
    client = optimizer.client()
    report = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/optimization_history.png",
        "report/parallel_coordinate.png",
        "report/param_importances.png",
        "report/sweep_report.html",
    } <= report


def test_enqueued_sets_name_a_conditional_param_or_leave_it_to_the_sampler(optimizer):
    enqueue = (
        "hydra.sweeper.enqueue=[{optimizer.name: sgd, lr: 0.01, optimizer.momentum: 0.5}, "
        "{optimizer.name: sgd, lr: 0.02}, {optimizer.name: adam, lr: 0.03}]"
    )
    ok(optimizer.run(enqueue, "hydra.sweeper.n_trials=4"))
    first, second, third, _ = optimizer.study().get_trials()
    assert first.params == {"optimizer.name": "sgd", "lr": 0.01, MOMENTUM: 0.5}
    assert second.params["lr"] == 0.02 and 0.0 <= second.params[MOMENTUM] <= 0.99  # drawn
    assert third.params == {"optimizer.name": "adam", "lr": 0.03}


@pytest.mark.parametrize(
    "enqueue, message",
    [
        (
            "[{optimizer.name: adam, lr: 0.01, optimizer.momentum: 0.5}]",
            "hydra.sweeper.enqueue[0].optimizer.momentum: no param of that name is searched for "
            "this set, neither in hydra.sweeper.params nor by optimizer_app.space",
        ),
        (
            "[{optimizer.name: sgd, lr: 0.01, optimizer.momentum: 1.5}]",
            "hydra.sweeper.enqueue[0].optimizer.momentum=1.5 is outside the search space",
        ),
        ("[{optimizer.name: sgd, optimizer.momentum: 0.5}]", "missing ['lr']"),
    ],
)
def test_an_enqueued_set_the_function_does_not_ask_for_is_one_error(tmp_path, enqueue, message):
    proc = ToyApp(tmp_path, "optimizer_app.py").run(f"hydra.sweeper.enqueue={enqueue}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (error,) = error_lines(proc)
    assert message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no study, no store, no folder


def test_warm_starts_import_trials_and_runs_whose_conditional_params_fit(optimizer):
    ok(optimizer.run("hydra.sweeper.study_name=last-week", "hydra.sweeper.n_trials=6"))
    earlier = optimizer.study("last-week").get_trials()
    assert {t.params["optimizer.name"] for t in earlier} == {"adam", "sgd"}
    # this week momentum goes up to 0.6: the SGD trials above it do not fit any more
    fits = [t for t in earlier if t.params.get(MOMENTUM, 0.0) <= 0.6]
    assert 0 < len(fits) < len(earlier)
    proc = optimizer.run(
        "hydra.sweeper.study_name=this-week",
        "hydra.sweeper.warm_start_from=last-week",
        "hydra.sweeper.n_trials=1",
        "max_momentum=0.6",
    )
    ok(proc)
    assert f"skipped {len(earlier) - len(fits)} outside the search space" in proc.stdout
    imported = [t for t in optimizer.study("this-week").get_trials() if keys.is_imported(t)]
    assert [t.params for t in imported] == [t.params for t in fits]
    assert [t.value for t in imported] == [t.value for t in fits]
    for t in imported:  # distributions as the function asks for them now
        if sgd(t.params):
            assert t.distributions[MOMENTUM] == optuna.distributions.FloatDistribution(0, 0.6)

    # from last week's MLflow runs, into a new Optuna storage: each run read param by param
    parent_id = optimizer.study("last-week").user_attrs["mlflow_parent_run_id"]
    fresh = ToyApp(optimizer.path, "optimizer_app.py", storage=f"sqlite:///{optimizer.path}/b.db")
    try:
        ok(
            fresh.run(
                "hydra.sweeper.study_name=from-runs",
                f"hydra.sweeper.warm_start_from=runs:/{parent_id}",
                "hydra.sweeper.n_trials=1",
            )
        )
        from_runs = [t for t in fresh.study("from-runs").get_trials() if keys.is_imported(t)]
    finally:
        fresh.close()
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in earlier}
    assert len(from_runs) == len(earlier)
    for t in from_runs:
        source = by_run[t.user_attrs["imported_run_id"]]
        assert t.params == source.params and t.value == source.value


def test_a_continued_trial_gets_its_conditional_params_back(tmp_path, monkeypatch):
    """trial.resume enqueues an interrupted trial's params; asked again, the grammar and the
    function hand them back, momentum included (a real SQLite study)."""
    monkeypatch.syspath_prepend(str(APPS))
    base = OmegaConf.create({"lr": 0.001, "optimizer": {"name": "adam", "momentum": 0.0}})
    base.max_momentum = 0.99
    space, _ = parse({"optimizer.name": "choice(adam, sgd)", "lr": "interval(0.0, 0.05)"}, [])
    search = SearchFunction.load("search_space", "optimizer_app.space", base, space)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db")
    study.enqueue_trial({"optimizer.name": "sgd", "lr": 0.02})
    interrupted = study.ask(space)
    search.extend(interrupted)
    assert MOMENTUM in interrupted.params
    trial_id = optuna_internals.trial_id(interrupted)
    optuna_internals.set_trial_system_attr(study, trial_id, keys.CHECKPOINT_AT, 2)
    fail_trial(study, trial_id, "interrupted", "stopped by SIGTERM while training")

    (note,) = resume.enqueue_continuations(study, study.get_trials())
    assert "continues from that checkpoint" in note
    again = study.ask(space)
    search.extend(again)
    assert again.params == interrupted.params
    assert keys.continues(again) == interrupted.number


def test_several_objectives_with_a_search_space_function(optimizer):
    proc = optimizer.run(
        "pareto=true",
        "hydra.sweeper.direction=[minimize,minimize]",
        "hydra.sweeper.metric=[loss,cost]",
        "hydra.sweeper.n_trials=6",
    )
    ok(proc)
    trials = optimizer.study().get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 6
    (parent,), children = optimizer.runs()
    assert parent.info.status == "FINISHED"
    runs = by_number(children)
    for t in trials:
        run = runs[t.number]
        assert (MOMENTUM in run.data.params) == sgd(t.params) == (MOMENTUM in t.params)
        assert set(run.data.metrics) == {"loss", "cost"}
    front = {t.number for t in optimizer.study().best_trials}
    tagged = {n for n, r in runs.items() if r.data.tags.get("pareto_front") == "true"}
    assert tagged == front and front


def test_the_check_hook_sees_the_functions_values_on_the_corners(tmp_path):
    proc = ToyApp(tmp_path, "optimizer_app.py").run(
        "+hydra.sweeper.check._target_=optimizer_app.check", "momentum_limit=0.95"
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (error,) = error_lines(proc)
    assert error == (
        "Error: hydra.sweeper.params.optimizer.name = choice('adam', 'sgd') reaches "
        "optimizer.name=sgd (and optimizer_app.space optimizer.momentum=0.99), which cannot run: "
        "momentum 0.99 is above 0.95"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no study, no store, no folder


@pytest.mark.slow
def test_two_workers_draw_conditional_params_from_one_study(optimizer):
    # trials of 1.5 s: the second worker starts (seconds of imports) while the first trains
    slow = ("hydra.sweeper.pruner=null", "epochs=3", "epoch_seconds=0.5")
    ok(optimizer.run(*slow, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=8"))
    trials = optimizer.study().get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 8
    workers = {keys.worker(t)[1] for t in trials}
    assert len(workers) == 2  # both processes trained trials
    runs = by_number(optimizer.runs()[1])
    for t in trials:
        assert (MOMENTUM in t.params) == sgd(t.params) == (MOMENTUM in runs[t.number].data.params)
        assert t.value == pytest.approx(loss(t.params))


@pytest.mark.slow
def test_a_trial_stopped_by_the_budget_continues_with_its_conditional_params(optimizer):
    slow = ("hydra.sweeper.pruner=null", "epochs=40", "epoch_seconds=0.25", "checkpoint=true")
    sgd_first = "hydra.sweeper.enqueue=[{optimizer.name: sgd, lr: 0.02}]"
    ok(optimizer.run(*slow, sgd_first, "hydra.sweeper.timeout=6s"))
    (stopped,) = optimizer.study().get_trials()
    assert keys.failure(stopped) == "time_budget" and MOMENTUM in stopped.params
    ok(optimizer.run(*slow, "hydra.sweeper.n_trials=1"))
    _, continued = optimizer.study().get_trials()
    assert continued.state == COMPLETE and keys.continues(continued) == stopped.number
    assert continued.params == stopped.params


def test_a_resumed_study_refuses_a_function_param_of_another_kind(sphere):
    ok(sphere.run("hydra.sweeper.search_space=spaces.adds_w", "hydra.sweeper.n_trials=1"))
    proc = sphere.run("hydra.sweeper.search_space=spaces.adds_w_as_int", "hydra.sweeper.n_trials=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (error,) = error_lines(proc)
    assert "the search-space param +w changed from [0.0, 1.0] to int [0, 1]" in error
    assert len(sphere.study().get_trials()) == 1


# ---- the function alone, and a function that fails on one trial ------------------------------


def test_the_function_alone_is_the_search_space(sphere):
    ok(
        sphere.run(
            "~hydra.sweeper.params.x",
            "~hydra.sweeper.params.y",
            "hydra.sweeper.search_space=spaces.x_and_y",
            "hydra.sweeper.n_trials=3",
        )
    )
    trials = sphere.study().get_trials()
    assert [t.state for t in trials] == [COMPLETE] * 3
    for t in trials:
        assert set(t.params) == {"x", "y"} and all(-1 <= v <= 1 for v in t.params.values())
        assert t.value == pytest.approx(t.params["x"] ** 2 + t.params["y"] ** 2)


def test_a_function_that_fails_on_a_trial_fails_that_trial_and_its_run(sphere):
    # the checks' corners pass; on trial 1 it suggests a key the config does not have
    proc = sphere.run(
        "hydra.sweeper.search_space=spaces.fails_on_trial_1",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.max_failure_rate=0.5",
    )
    ok(proc)
    trials = sphere.study().get_trials()
    assert [t.state for t in trials] == [COMPLETE, FAIL, COMPLETE, COMPLETE]
    reason = trials[1].user_attrs["fail_reason"]
    assert "spaces.fails_on_trial_1 suggests 'w', a key the config does not have" in reason
    run = by_number(sphere.runs()[1])[1]
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == reason
