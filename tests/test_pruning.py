"""Pruning: bad trials stop early, are recorded truthfully, and never win."""

import optuna
import pytest
import yaml
from mnist_sweep import assert_ok

# random sampling over a good and a hopeless learning rate (Adam at 0.5 stays at chance), and
# a median pruner that may judge from the first epoch after one finished trial
PRUNABLE = (
    "trainer.max_epochs=3",
    "model.lr=choice(0.001, 0.5)",
    "hydra.sweeper.sampler=random",
    "hydra.sweeper.pruner={name: median, n_startup_trials: 1, n_warmup_steps: 0}",
)


def check_pruned_sweep(sweep, n_trials: int) -> None:
    trials = sweep.study().get_trials()
    states = [t.state for t in trials]
    assert len(trials) == n_trials
    assert optuna.trial.TrialState.PRUNED in states
    runs = {r.info.run_id: r for r in sweep.runs()}
    client = sweep.client()
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        history = client.get_metric_history(run.info.run_id, "val_acc")
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert run.info.status == "KILLED"
            assert run.data.tags["optuna.state"] == "PRUNED"
            epoch = int(run.data.tags["pruned_at_epoch"])
            assert epoch == max(trial.intermediate_values)
            # the curve up to the cut is kept
            assert [m.step for m in history] == list(range(epoch + 1))
            assert len(history) < 3
            assert trial.params["model.lr"] == 0.5
        else:
            assert run.info.status == "FINISHED"
            assert [m.step for m in history] == [0, 1, 2]
        # every validation epoch reached the study
        assert sorted(trial.intermediate_values) == [m.step for m in history]
    (best,) = [r for r in runs.values() if r.data.tags.get("best_run") == "true"]
    assert best.data.tags["optuna.state"] == "COMPLETE"
    results = yaml.safe_load((sweep.sweep_dir / "optimization_results.yaml").read_text())
    assert results["trials"]["pruned"] == states.count(optuna.trial.TrialState.PRUNED)
    assert results["trials"]["complete"] == states.count(optuna.trial.TrialState.COMPLETE)


def test_bad_trials_are_pruned_in_process(sweep):
    proc = sweep.run("hydra.sweeper.n_trials=5", *PRUNABLE)
    assert_ok(proc)
    check_pruned_sweep(sweep, 5)
    assert "PRUNED" in proc.stdout and "pruned" in proc.stdout


@pytest.mark.slow
def test_pruning_reaches_a_job_in_another_process(sweep):
    # joblib's loky runs the job in a worker process: it opens the trial through the storage
    proc = sweep.run("hydra.sweeper.n_trials=4", "hydra/launcher=joblib", *PRUNABLE)
    assert_ok(proc)
    check_pruned_sweep(sweep, 4)


def test_memory_storage_with_an_out_of_process_launcher_is_refused(sweep):
    proc = sweep.run("hydra.sweeper.storage=null", "hydra/launcher=joblib")
    assert proc.returncode == 2
    assert "storage=null" in proc.stderr and "JoblibLauncher" in proc.stderr
    assert not (sweep.path / "mlflow.db").exists()


@pytest.mark.parametrize(
    "override, pruner",
    [
        ("hydra.sweeper.pruner=hyperband", "HyperbandPruner"),
        ("hydra.sweeper.pruner=successive_halving", "SuccessiveHalvingPruner"),
        ("hydra.sweeper.pruner=null", "NopPruner"),
    ],
)
def test_pruner_chosen_on_the_command_line(sweep, override, pruner):
    proc = sweep.run("hydra.sweeper.n_trials=1", "trainer.max_epochs=1", override)
    assert_ok(proc)
    (parent,) = [r for r in sweep.runs() if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.data.params["sweeper.pruner"] == pruner


@pytest.mark.parametrize(
    "override, message",
    [
        ("hydra.sweeper.pruner=medain", "'medain' is not known: use one of median"),
        ("hydra.sweeper.sampler=tpee", "'tpee' is not known: use one of tpe"),
        ("hydra.sweeper.pruner={name: median, n_startup_trial: 2}", "n_startup_trial"),
    ],
)
def test_bad_pruner_or_sampler_fails_before_any_trial(sweep, override, message):
    proc = sweep.run(override)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (sweep.path / "optuna.db").exists()
    assert not (sweep.path / "mlflow.db").exists()
