"""The whole journey: `sweep.py -m` as a subprocess, then both stores read back."""

import math

import optuna
import yaml
from mnist_sweep import assert_ok

METRICS = ("acc", "loss", "val_acc", "val_loss")


def split_runs(runs):
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    return parents, children


def test_multirun_builds_the_run_tree_and_tags_the_best(sweep):
    proc = sweep.run("hydra.sweeper.n_trials=3", "hydra.sweeper.pruner=null")  # all complete
    assert_ok(proc)

    study = sweep.study()
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3

    (parent,), children = split_runs(sweep.runs())
    assert "mnist-cnn" in parent.info.run_name
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in children}
    assert sorted(by_trial) == [0, 1, 2]
    client = sweep.client()
    for trial in trials:
        run = by_trial[trial.number]
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.info.run_name == f"trial-{trial.number}"
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["optuna.study_name"] == "mnist-cnn"
        assert run.data.tags["optuna.state"] == "COMPLETE"
        # params are the flattened config; searched values are plain numbers
        assert float(run.data.params["model.dropout"]) == trial.params["model.dropout"]
        assert float(run.data.params["model.lr"]) == trial.params["model.lr"]
        assert run.data.params["data.batch_size"] == "64"
        assert run.data.params["trainer.max_epochs"] == "2"
        for key in METRICS:
            history = client.get_metric_history(run.info.run_id, key)
            assert [m.step for m in history] == [0, 1], key
        assert run.data.metrics["val_acc"] == trial.value
    # every trial logs the same keys, so the parallel-coordinates plot keeps them all
    assert len({frozenset(r.data.params) for r in children}) == 1
    # (the best run also carries test_acc, from evaluating the published model)
    assert len({frozenset(r.data.metrics) - {"test_acc"} for r in children}) == 1

    best = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert len(best) == 1
    (best,) = best
    assert best.data.metrics["val_acc"] == max(r.data.metrics["val_acc"] for r in children)
    assert int(best.data.tags["optuna.trial_number"]) == study.best_trial.number
    assert parent.data.tags["best_run_id"] == best.info.run_id
    assert parent.data.tags["best_trial"] == best.data.tags["optuna.trial_number"]
    assert parent.data.params["best.model.lr"] == best.data.params["model.lr"]
    assert parent.data.params["best.model.dropout"] == best.data.params["model.dropout"]
    assert parent.data.metrics["best_val_acc"] == best.data.metrics["val_acc"]

    results = yaml.safe_load((sweep.sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_run_id"] == best.info.run_id
    assert results["best_trial"] == study.best_trial.number
    assert math.isclose(results["best_value"], study.best_value)
    assert results["best_params"] == study.best_trial.params
    assert results["trials"]["complete"] == 3
    # one job folder per trial, named by trial number
    assert sorted(p.name for p in sweep.sweep_dir.glob("trial-*")) == [
        "trial-0",
        "trial-1",
        "trial-2",
    ]
    # what the person sees: a line per trial, the table, and how to open the UI
    assert proc.stdout.count("finished |") == 3
    assert "<- best" in proc.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{sweep.path}/mlflow.db" in proc.stdout
    assert "GPU available" not in proc.stdout + proc.stderr  # Lightning's banner is off


def test_search_space_from_the_command_line(sweep):
    proc = sweep.run(
        "hydra.sweeper.n_trials=2",
        "model.dropout=0.3",  # fixed: leaves the search space
        "hydra.sweeper.params.model.lr=tag(log, interval(1e-3, 5e-3))",
        "data.batch_size=choice(32, 128)",  # added to the search space
    )
    assert_ok(proc)
    trials = sweep.study().get_trials()
    assert len(trials) == 2
    for trial in trials:
        assert set(trial.params) == {"model.lr", "data.batch_size"}
        assert 1e-3 <= trial.params["model.lr"] <= 5e-3
        assert trial.distributions["model.lr"].log
        assert trial.params["data.batch_size"] in (32, 128)
    _, children = split_runs(sweep.runs())
    assert {r.data.params["model.dropout"] for r in children} == {"0.3"}
    assert {int(r.data.params["data.batch_size"]) for r in children} <= {32, 128}


def test_without_multirun_trains_once(sweep):
    proc = sweep.run("trainer.max_epochs=1", "model.dropout=0.2", multirun=False)
    assert_ok(proc)
    (run,) = sweep.runs()
    assert run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.params["model.dropout"] == "0.2"
    assert run.data.metrics["val_acc"] > 0.5  # the generated digits are learnable
    assert not (sweep.path / "optuna.db").exists()
