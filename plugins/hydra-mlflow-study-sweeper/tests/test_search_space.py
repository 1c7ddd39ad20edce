"""Hydra's sweep grammar as Optuna distributions; samplers and pruners from config."""

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.mlflow_study_sweeper.cli import quote_search_space_args
from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.search.grammar import parse
from mlflow_study_sweeper.search.samplers import make_pruner, make_sampler


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("interval(0.0, 0.5)", FloatDistribution(0.0, 0.5)),
        ("tag(log, interval(1e-4, 1e-2))", FloatDistribution(1e-4, 1e-2, log=True)),
        ("int(interval(1, 8))", IntDistribution(1, 8)),
        ("range(16, 129, 16)", IntDistribution(16, 128, step=16)),
        ("choice(32, 64, 128)", CategoricalDistribution([32, 64, 128])),
        ("choice(adam, sgd)", CategoricalDistribution(["adam", "sgd"])),
    ],
)
def test_grammar(expr, expected):
    space, fixed = parse({"x": expr}, [])
    assert space == {"x": expected} and fixed == []


def test_command_line_sweeps_join_and_fixed_values_leave_the_space():
    params = {"model.dropout": "interval(0.0, 0.5)", "model": {"lr": "interval(0.1, 0.2)"}}
    space, fixed = parse(params, ["model.dropout=0.2", "data.batch_size=choice(32,64)"])
    assert set(space) == {"model.lr", "data.batch_size"}
    assert fixed == ["model.dropout=0.2"]


def test_a_command_line_sweep_of_a_key_the_config_lacks_keeps_its_plus():
    space, fixed = parse({}, ["+z=choice(1,2)", "++w=interval(0, 1)", "x=interval(0, 1)"])
    assert set(space) == {"+z", "++w", "x"} and fixed == []
    space, fixed = parse({}, ["+z=choice(1,2)", "z=3"])  # a fixed value still takes it out
    assert space == {} and fixed == ["z=3"]


@pytest.mark.parametrize(
    "expr, message",
    [
        ("interval(0.5, 0.1)", "model.x"),
        ("tag(log, interval(0.0, 1.0))", "model.x"),
        ("interval(0.1", "cannot be parsed"),
        ("0.3", "not a sweep"),
    ],
)
def test_bad_search_space_is_a_clear_error(expr, message):
    with pytest.raises(SweepConfigError, match=message):
        parse({"model.x": expr}, [])


def test_cli_params_are_quoted_for_hydra():
    argv = ["hydra.sweeper.params.model.lr=tag(log, interval(1e-4, 1e-1))", "model.dropout=0.2"]
    assert quote_search_space_args(argv) == [
        "++hydra.sweeper.params.model.lr='tag(log, interval(1e-4, 1e-1))'",
        "model.dropout=0.2",
    ]


@pytest.mark.parametrize("name", ["tpe", "random", "cmaes", "gp", "qmc"])
def test_samplers_by_name(name):
    assert isinstance(make_sampler(name, seed=1), optuna.samplers.BaseSampler)


def test_grid_sampler_needs_finite_values():
    space, _ = parse({"a": "choice(1, 2)", "b": "range(0, 3)"}, [])
    sampler = make_sampler("grid", seed=None, search_space=space)
    assert isinstance(sampler, optuna.samplers.GridSampler) and sampler.size == 6
    with pytest.raises(SweepConfigError, match="grid sampler"):
        make_sampler("grid", seed=None, search_space=parse({"a": "interval(0, 1.5)"}, [])[0])


def test_seeded_sampler_repeats_its_sequence():
    def sequence():
        study = optuna.create_study(sampler=make_sampler("tpe", seed=7))
        return [study.ask({"x": FloatDistribution(0, 1)}).params["x"] for _ in range(5)]

    assert sequence() == sequence()


@pytest.mark.parametrize(
    "value, cls",
    [
        ("median", optuna.pruners.MedianPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("successive_halving", optuna.pruners.SuccessiveHalvingPruner),
        (None, optuna.pruners.NopPruner),
        ("none", optuna.pruners.NopPruner),
        ({"name": "median", "n_startup_trials": 2}, optuna.pruners.MedianPruner),
        (
            {"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0},
            optuna.pruners.PercentilePruner,
        ),
    ],
)
def test_pruners(value, cls):
    assert isinstance(make_pruner(value), cls)


@pytest.mark.parametrize("value", ["medain", {"name": "median", "bogus": 1}, 3])
def test_bad_pruner_is_a_clear_error(value):
    with pytest.raises(SweepConfigError, match="pruner"):
        make_pruner(value)


def test_bad_sampler_is_a_clear_error():
    with pytest.raises(SweepConfigError, match="tpe, random"):
        make_sampler("tpee", seed=0)
