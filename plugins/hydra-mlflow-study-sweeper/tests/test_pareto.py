"""Several objectives: the Pareto front tagged in MLflow, a champion chosen on it, pruning.

The toy app's `pareto=true` returns {f1: x^2 + y^2, f2: (x-2)^2 + (y-2)^2}: both minimised,
their front is the segment from (0, 0) to (2, 2), and the test computes it from the trials'
parameters, independently of the sweeper.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from harness import error_lines, ok
from optuna.trial import TrialState, create_trial

from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.keys import CURVE, curve
from mlflow_study_sweeper.search.objectives import Objectives
from mlflow_study_sweeper.storage import optuna_internals

TWO = ("pareto=true", "hydra.sweeper.metric=[f1,f2]", "hydra.sweeper.direction=[minimize,minimize]")
NO_EPOCHS = "epochs=0"  # the toy sweep reports 3 epochs unless told otherwise
EAGER_MEDIAN = "hydra.sweeper.pruner={name: median, n_startup_trials: 1, n_warmup_steps: 0}"


def f(x: float, y: float) -> tuple[float, float]:
    return x**2 + y**2, (x - 2) ** 2 + (y - 2) ** 2


def non_dominated(points: dict[int, tuple[float, float]]) -> set[int]:
    def dominates(a, b):
        return all(p <= q for p, q in zip(a, b, strict=True)) and a != b

    return {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}


def by_trial(runs) -> dict[int, object]:
    return {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if "optuna.trial_number" in r.data.tags
    }


def tagged(runs, tag: str) -> set[int]:
    return {n for n, r in by_trial(runs).items() if r.data.tags.get(tag) == "true"}


def test_the_front_is_tagged_the_champion_meets_its_constraint_and_a_resume_moves_both(toy):
    where = "hydra.sweeper.champion.where=['f2 <= 4']"
    proc = toy.run(
        *TWO, NO_EPOCHS, "hydra.sweeper.sampler=random", "hydra.sweeper.n_trials=12", where
    )
    ok(proc)

    def check(n_trials: int) -> tuple[int, set[int]]:
        trials = toy.study().get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
        points = {t.number: f(t.params["x"], t.params["y"]) for t in trials}
        front = non_dominated(points)
        runs = toy.all_runs()
        assert tagged(runs, "pareto_front") == front  # exactly the non-dominated trials
        allowed = [n for n in front if points[n][1] <= 4]
        champion = min(allowed, key=lambda n: points[n][0])
        assert tagged(runs, "best_run") == {champion}
        for n, run in by_trial(runs).items():  # every objective on every run
            assert run.data.metrics["f1"] == pytest.approx(points[n][0])
            assert run.data.metrics["f2"] == pytest.approx(points[n][1])
        (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
        assert parent.data.metrics["best_f1"] == pytest.approx(points[champion][0])
        assert parent.data.metrics["best_f2"] == pytest.approx(points[champion][1])
        client = toy.client()
        path = client.download_artifacts(parent.info.run_id, "pareto_front.json")
        table = json.loads(Path(path).read_text())
        assert sorted(row[0] for row in table["data"]) == sorted(front)
        assert table["columns"] == ["trial", "x", "y", "f1", "f2", "run_id"]
        report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
        assert "report/pareto_front.png" in report
        results = yaml.safe_load((toy.path / "multirun" / "optimization_results.yaml").read_text())
        assert results["pareto_front"] == sorted(front) and results["best_trial"] == champion
        assert results["champion_rule"] == "min f1 where f2 <= 4"
        # the registered version carries every objective
        version = client.get_model_version_by_alias("toy-model", "champion")
        assert float(version.tags["f1"]) == pytest.approx(points[champion][0], abs=1e-6)
        assert float(version.tags["f2"]) == pytest.approx(points[champion][1], abs=1e-6)
        return champion, front

    first, front = check(12)
    assert (
        "Pareto front: trial" in proc.stdout
        and f"champion (min f1 where f2 <= 4): trial {first}" in proc.stdout
    )
    table_lines = [
        line
        for line in proc.stdout.splitlines()
        if line.rstrip().endswith(("front", "front, best"))
    ]
    assert len(table_lines) == len(tagged(toy.all_runs(), "pareto_front"))

    # a continued study: each front member's projection on the segment x = y dominates it (it
    # is nearer both centres), so enqueued first they push the old members off the front; the
    # tags follow, and the old ones go
    trials = toy.study().get_trials()
    better = [min(max((trials[n].params["x"] + trials[n].params["y"]) / 2, 0), 2) for n in front]
    enqueue = ", ".join(f"{{x: {t!r}, y: {t!r}}}" for t in better)
    n_trials = 12 + len(better) + 3
    ok(
        toy.run(
            *TWO,
            NO_EPOCHS,
            "hydra.sweeper.sampler=random",
            f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweeper.enqueue=[{enqueue}]",
            where,
        )
    )
    _, moved = check(n_trials)
    assert not front & moved  # every earlier member left the front, and lost its tag


def test_no_run_of_the_front_meets_the_constraint_publishes_nothing_and_exits_0(toy):
    proc = toy.run(
        *TWO, NO_EPOCHS, "hydra.sweeper.n_trials=3", "hydra.sweeper.champion.where=['f2 < 0']"
    )
    ok(proc)
    assert "no run of the Pareto front meets f2 < 0: nothing is tagged best_run" in proc.stdout
    runs = toy.all_runs()
    assert tagged(runs, "best_run") == set() and tagged(runs, "pareto_front")
    assert toy.client().search_registered_models() == []
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.info.status == "FINISHED" and "best_run_id" not in parent.data.tags


def test_pruning_follows_the_first_objective_and_spares_the_front(toy):
    # x, y in [-5.5, 0.5]: the front is the short segment from (0, 0) to (0.5, 0.5), where f1
    # (the reported curve) is small; trials far from it have worse curves and worse f2 too
    proc = toy.run(
        *TWO,
        "x=interval(-5.5, 0.5)",
        "y=interval(-5.5, 0.5)",
        "epochs=4",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.n_trials=12",
        EAGER_MEDIAN,
    )
    ok(proc)
    trials = toy.study().get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete
    for t in complete:  # the whole curve of the first objective is kept
        assert sorted(curve(t)) == [0, 1, 2, 3]
        assert t.intermediate_values == {}  # (out of Optuna's samplers' sight: see curve)
    for t in pruned:
        assert max(curve(t)) < 3
    # what every trial would have reached: no pruned trial belongs to that front
    points = {t.number: f(t.params["x"], t.params["y"]) for t in trials}
    assert not non_dominated(points) & {t.number for t in pruned}
    runs = by_trial(toy.all_runs())
    for t in pruned:
        assert runs[t.number].info.status == "KILLED"
        assert runs[t.number].data.tags["pruned_at_epoch"] == str(max(curve(t)))
        assert runs[t.number].data.tags.get("pareto_front") is None


def test_tpe_samples_a_pruned_multi_objective_study(toy):
    # TPE ranks pruned trials by their last per-epoch value with the study's one direction:
    # Optuna per-epoch values on pruned trials of a multi-objective study crashed it (the
    # sweeper keeps that curve out of Optuna's sight)
    proc = toy.run(
        *TWO,
        "epochs=3",
        "hydra.sweeper.sampler={name: tpe, n_startup_trials: 3}",
        "hydra.sweeper.n_trials=10",
        EAGER_MEDIAN,
    )
    ok(proc)
    states = [t.state for t in toy.study().get_trials()]
    assert TrialState.PRUNED in states[:-3] and len(states) == 10  # TPE sampled after them


def test_a_tuple_in_the_order_of_metric_is_accepted(toy):
    # what users of Hydra's Optuna sweeper return: values in the order of hydra.sweeper.metric
    ok(toy.run("pareto=tuple", *TWO[1:], NO_EPOCHS, "hydra.sweeper.n_trials=4"))
    trials = toy.study().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for t in trials:
        assert t.values == pytest.approx(list(f(t.params["x"], t.params["y"])))
    _, children = toy.runs()
    for run in children:  # each objective on its run, by name
        x, y = float(run.data.params["x"]), float(run.data.params["y"])
        assert [run.data.metrics["f1"], run.data.metrics["f2"]] == pytest.approx(list(f(x, y)))


@pytest.mark.parametrize(
    "form, said",
    [
        ("triple", "returned 3 values ("),
        ("text", "returned str '"),
    ],
)
def test_another_form_is_refused_with_the_form_to_use(toy, form, said):
    # at the first trial, whatever the failure budget: every trial would return the same form
    proc = toy.run(f"pareto={form}", *TWO[1:], NO_EPOCHS, "hydra.sweeper.n_trials=5")
    assert proc.returncode == 1
    (error,) = error_lines(proc)
    assert f"trial 0: the task function {said}" in error and "Fix the task function" in error
    (trial,) = toy.study().get_trials()
    assert trial.state == TrialState.FAIL
    reason = trial.user_attrs["fail_reason"]
    assert said in reason and "hydra.sweeper.metric" in reason


@pytest.mark.parametrize(
    "setting, refused",
    [
        ("hydra.sweeper.pruner=hyperband", "HyperbandPruner"),
        ("hydra.sweeper.sampler=cmaes", "CmaEsSampler"),
    ],
)
def test_a_pruner_or_sampler_for_one_objective_is_refused_before_anything_exists(
    toy, setting, refused
):
    proc = toy.run(*TWO, NO_EPOCHS, setting)
    assert proc.returncode == 2
    (error,) = error_lines(proc)
    assert f"{refused} cannot work with several objectives" in error
    assert not (toy.path / "optuna.db").exists()


# ---- the rules, on trials made by hand ---------------------------------------------------------


def study_of(values: list[tuple[float, float]], directions=("maximize", "minimize")):
    study = optuna.create_study(directions=list(directions))
    for v in values:
        study.add_trial(create_trial(values=list(v), params={}, distributions={}))
    return study


def objectives(**champion) -> Objectives:
    return Objectives.from_settings(["maximize", "minimize"], ["acc", "size"], champion)


# accuracy against size: trial 3 is dominated by trial 1; the front is 0, 1, 2, 4
ACC_SIZE = [(0.90, 100.0), (0.95, 300.0), (0.99, 900.0), (0.94, 400.0), (0.97, 500.0)]


def test_the_front_and_each_rule():
    study = study_of(ACC_SIZE)
    assert [t.number for t in objectives().front(study)] == [0, 1, 2, 4]
    assert objectives().best(study).number == 2  # by the first objective: the most accurate
    assert objectives(by="size").best(study).number == 0
    assert objectives(where=["size <= 500"]).best(study).number == 4
    assert objectives(where=["size < 300", "acc >= 0.9"]).best(study).number == 0
    assert objectives(where=["size < 50"]).best(study) is None
    # the knee, scaled to [0, 1] on the front: acc gaps 1, .44, 0, .22; size gaps 0, .25, 1, .5
    assert objectives(by="knee").best(study).number == 1
    assert objectives(by="knee", where=["size >= 300"]).best(study).number == 4


def test_one_objective_keeps_the_best_value():
    one = Objectives.from_settings("minimize", "loss", {"by": None, "where": []})
    study = study_of([(3.0,), (1.0,), (2.0,)], directions=("minimize",))
    assert not one.multi and one.best(study).number == 1


@pytest.mark.parametrize(
    "direction, metric, champion, message",
    [
        (["maximize", "minimize"], "acc", {}, "must have one entry per objective"),
        (["maximize", "up"], ["a", "b"], {}, "must be maximize or minimize"),
        (["maximize", "minimize"], ["a", "a"], {}, "must be distinct names"),
        (["maximize", "minimize"], ["a", "b"], {"by": "c"}, "must be one of the objectives (a, b)"),
        (["maximize", "minimize"], ["a", "b"], {"where": ["b = 3"]}, "is not a constraint"),
        (["maximize", "minimize"], ["a", "b"], {"where": ["b <= x"]}, "is not a constraint"),
        (["maximize", "minimize"], ["a", "b"], {"where": ["c <= 3"]}, "not an objective (a, b)"),
        ("maximize", "a", {"by": "knee"}, "with one objective the best trial is the best value"),
    ],
)
def test_settings_that_cannot_work_are_refused(direction, metric, champion, message):
    with pytest.raises(SweepConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Objectives.from_settings(direction, metric, champion)


@pytest.mark.parametrize(
    "returned, message",
    [
        ((0.9, 100, 3), "returned 3 values (0.9, 100, 3) for 2 objectives (acc, size)"),
        ("0.9", "returned str '0.9'; a multi-objective sweep needs a dict"),
        ({"acc": 0.9}, "the task function's dict has no size (it has acc)"),
        ({"acc": 0.9, "size": "big"}, "returned size='big', not a number"),
        ({"acc": float("nan"), "size": 1}, "the job returned acc=nan"),
    ],
)
def test_what_a_multi_objective_job_may_return(returned, message):
    with pytest.raises(ValueError) as err:
        objectives().values(returned)
    assert message in str(err.value)
    assert objectives().values({"size": 3, "acc": 0.5, "extra": "ignored"}) == [0.5, 3.0]
    assert objectives().values((0.5, 3)) == objectives().values([0.5, 3]) == [0.5, 3.0]


# ---- what the README names, through the sweeper's own pieces -------------------------------


@pytest.mark.parametrize("pruner", ["median", "percentile", "successive_halving", "threshold"])
def test_each_pruner_named_in_the_readme_judges_a_multi_objective_curve(pruner):
    """Through the sweeper's view: its rule on the first objective's per-epoch values."""
    from mlflow_study_sweeper.search.objectives import FirstObjective, with_curve
    from mlflow_study_sweeper.search.samplers import make_pruner

    rule = make_pruner({"name": pruner, **({"lower": 0.5} if pruner == "threshold" else {})})
    study = optuna.create_study(directions=["maximize", "minimize"], pruner=rule)
    decisions = []
    for i in range(6):  # better trials first: the last ones have worse curves
        trial = study.ask()
        for step in range(3):
            curve_so_far = {str(s): 1.0 - 0.1 * i - 0.01 * (2 - s) for s in range(step + 1)}
            trial_id = optuna_internals.trial_id(trial)
            optuna_internals.set_trial_system_attr(study, trial_id, CURVE, curve_so_far)
            frozen = with_curve(optuna_internals.frozen(study, trial_id))
            decisions.append(rule.prune(FirstObjective(study), frozen))
        study.tell(trial, [1.0 - 0.1 * i, float(i)])
    assert any(decisions)  # the rule ran on the curves (and could stop the worse trials)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2", "random", "gp"])
def test_each_sampler_named_in_the_readme_samples_two_objectives(sampler):
    from mlflow_study_sweeper.search.samplers import make_sampler

    space = {"x": optuna.distributions.FloatDistribution(-1, 1)}
    study = optuna.create_study(
        directions=["minimize", "minimize"], sampler=make_sampler(sampler, 0, space)
    )
    for _ in range(12):
        trial = study.ask(space)
        study.tell(trial, [trial.params["x"] ** 2, (trial.params["x"] - 1) ** 2])
    assert len(study.best_trials) >= 1
