"""Many workers, one study, one parent run: on PostgreSQL with an MLflow server, and on SQLite."""

import os

import optuna
import pytest
from mlflow.tracking import MlflowClient
from mnist_sweep import assert_ok
from optuna.trial import TrialState
from servers import create_database


def check_one_sweep(study: optuna.Study, client: MlflowClient, n_trials: int) -> None:
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))  # no number used twice
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    # a trial asked for at the very moment another worker took the last slot is given back
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs["fail_reason"].startswith("not run: n_trials"), t.user_attrs
    experiment = client.get_experiment_by_name("mnist-sweep").experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    assert len(parents) == 1
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    # exactly one child run per trial that trained
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in children) == sorted(
        t.number for t in finished
    )
    assert {r.info.run_id for r in children} == {t.user_attrs["mlflow_run_id"] for t in finished}
    assert all(r.info.status == "FINISHED" for r in children)
    best = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert len(best) == 1 and parent.data.tags["best_run_id"] == best[0].info.run_id
    # the end ran once: one registered version
    assert len(client.search_model_versions("name='mnist-cnn'")) == 1


@pytest.mark.slow
def test_three_workers_share_one_study_on_postgres_and_an_mlflow_server(
    sweep, postgres, mlflow_server
):
    storage = create_database(postgres, "optuna_three_workers")
    overrides = (
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.pruner=null",
        f"hydra.sweeper.storage={storage}",
        f"mlflow.tracking_uri={mlflow_server}",
    )
    workers = [sweep.popen(*overrides) for _ in range(3)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, out in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, out
    assert sum("<- best" in out for out in outputs) == 1  # one worker ended the sweep
    # and each of the others says so: the study is finished, the end done or under way
    assert all(
        "<- best" in out or "is ending the sweep now" in out or "ended it" in out for out in outputs
    )
    rdb = optuna.storages.RDBStorage(storage)
    try:
        study = optuna.load_study(study_name="mnist-cnn", storage=rdb)
        check_one_sweep(study, MlflowClient(mlflow_server), n_trials=6)
        assert optuna.get_all_study_names(rdb) == ["mnist-cnn"]
        pids = {t.system_attrs["worker"]["pid"] for t in study.get_trials()}
        assert len(pids) >= 2  # the work was really shared
    finally:
        rdb.remove_session()
        rdb.engine.dispose()  # close its pooled connections before the server stops


def test_two_local_workers_on_sqlite(sweep):
    proc = sweep.run(
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.pruner=null",
        "trainer.max_epochs=4",  # long enough for the second worker to start and take trials
    )
    assert_ok(proc)
    assert "database is locked" not in proc.stdout + proc.stderr
    study = sweep.study()
    check_one_sweep(study, sweep.client(), n_trials=6)
    assert optuna.get_all_study_names(sweep.storage) == ["mnist-cnn"]  # no helper studies
    # the second worker does not repeat the first one's seeded sequence
    params = [tuple(sorted(t.params.items())) for t in study.get_trials()]
    assert len(set(params)) == len(params)
    pids = {t.system_attrs["worker"]["pid"] for t in study.get_trials()}
    # the sweep's own process (this one: the test runs sweep.py in it) and its one worker
    assert len(pids) == 2 and str(os.getpid()) in pids
