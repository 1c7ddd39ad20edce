"""The MNIST sweep on a real single-node Slurm cluster (the sweeper's tests' slurm_cluster.py),
on generated data: its workers are the tasks of one sbatch array job, the stores PostgreSQL and
`mlflow server`, and the study ends as it does on one machine."""

from __future__ import annotations

import optuna
import pytest
from mlflow.tracking import MlflowClient
from mnist_sweep import assert_ok
from optuna.trial import TrialState
from servers import create_database


@pytest.mark.slow
def test_the_mnist_sweep_trains_in_slurm_array_tasks(slurm, sweep, postgres, mlflow_server):
    storage = create_database(postgres, f"optuna_{sweep.path.name}".lower()[:60])
    proc = sweep.spawn(
        "hydra.sweeper.backend=slurm",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.pruner=null",
        "trainer.max_epochs=1",
        f"hydra.sweeper.storage={storage}",
        f"mlflow.tracking_uri={mlflow_server}",
        env=slurm.env,
    )
    assert_ok(proc)
    assert "Submitted 2 Slurm task(s) of 1 worker(s) each" in proc.stdout
    assert slurm.jobs() == []
    rdb = optuna.storages.RDBStorage(storage)
    try:
        trials = optuna.load_study(study_name="mnist-cnn", storage=rdb).get_trials()
    finally:
        rdb.remove_session()
        rdb.engine.dispose()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert all(t.system_attrs["worker"].get("slurm") for t in trials)  # trained in a task
    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist-sweep").experiment_id], max_results=100
    )
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("sweep.role") == "trial"]
    assert len(children) == 3 and all("val_acc" in r.data.metrics for r in children)
    assert len([r for r in runs if r.data.tags.get("best_run") == "true"]) == 1
