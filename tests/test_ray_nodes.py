"""The MNIST sweep on a two-node Ray cluster faked on this machine (ray.cluster_utils.Cluster:
a head and a second node with raylets of their own), and the second node lost while its trial
trains: the trial is failed at once and continued from its checkpoint on the head, and the
study ends exactly as when nothing is lost."""

from __future__ import annotations

import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from mnist_sweep import SweepDir
from optuna.trial import TrialState
from servers import create_database

pytest.importorskip("ray")
# ray.cluster_utils.Cluster.shutdown kills a fake node's processes without waiting for every
# one of them: their Popen objects, collected later, warn that they still ran
pytestmark = pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")


@pytest.mark.slow
def test_a_lost_node_s_trial_continues_on_the_head_and_the_invariant_holds(
    tmp_path, mnist_root, postgres, mlflow_server
):
    from ray.cluster_utils import Cluster

    storage = create_database(postgres, "optuna_ray_nodes")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    # the second node names its machine, so that its workers' trials say where they ran
    second = cluster.add_node(num_cpus=1, env_vars={"SWEEP_HOST_ID": "node-b"})
    cluster.wait_for_nodes()
    sweep = SweepDir(tmp_path, mnist_root)
    rdb = optuna.storages.RDBStorage(storage)
    try:
        driver = sweep.popen(
            "hydra.sweeper.backend=ray",
            f"hydra.sweeper.ray.address={cluster.address}",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.resources={cpu: 1}",  # one worker on each node
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.pruner=null",
            "trainer.max_epochs=8",
            f"hydra.sweeper.storage={storage}",  # shared by every node (a file would be refused)
            f"mlflow.tracking_uri={mlflow_server}",
        )
        lost = wait_for_a_checkpoint_on(rdb, "node-b", driver)
        cluster.remove_node(second, allow_graceful=False)  # its raylet and workers killed
        out, _ = driver.communicate(timeout=600)
        assert driver.returncode == 0, out[-6000:]
        study = optuna.load_study(study_name="mnist-cnn", storage=rdb)
        trials = study.get_trials()
    finally:
        cluster.shutdown()
        rdb.remove_session()
        rdb.engine.dispose()

    assert "is lost: its Ray actor died" in out
    failed = trials[lost]
    assert failed.state == TrialState.FAIL and failed.system_attrs["failure"] == "orphaned"
    assert (
        "node-b" in failed.user_attrs["fail_reason"]
        or "actor died" in failed.user_attrs["fail_reason"]
    )
    (continued,) = [t for t in trials if t.user_attrs.get("continues_trial") == lost]
    assert continued.state == TrialState.COMPLETE and continued.params == failed.params
    assert continued.system_attrs["worker"]["host"] != "node-b"  # on the head
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and not [t for t in trials if t.state == TrialState.RUNNING]

    client = MlflowClient(mlflow_server)
    runs = client.search_runs(
        [client.get_experiment_by_name("mnist-sweep").experiment_id], max_results=100
    )
    by_id = {r.info.run_id: r for r in runs}
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.info.status == "FINISHED"
    assert len([r for r in runs if r.data.tags.get("best_run") == "true"]) == 1
    lost_run = by_id[failed.user_attrs["mlflow_run_id"]]
    assert lost_run.info.status == "FAILED" and lost_run.data.tags["optuna.state"] == "FAIL"
    run = by_id[continued.user_attrs["mlflow_run_id"]]
    assert run.data.tags["continues_run"] == lost_run.info.run_id
    step = failed.system_attrs["checkpoint_step"]
    assert run.data.metrics["epochs_trained"] == 8 - (step + 1)  # only the epochs left
    for trial in trials:
        r = by_id.get(trial.user_attrs.get("mlflow_run_id"))
        if r is not None:
            assert r.data.tags["optuna.state"] == trial.state.name
    print(
        f"node-b lost during trial {lost} after epoch {step + 1}; trial {continued.number} "
        f"continued it on the head and trained {run.data.metrics['epochs_trained']:.0f} epochs; "
        f"trials: {[(t.number, t.state.name) for t in trials]}"
    )


def wait_for_a_checkpoint_on(rdb, host: str, driver, timeout: float = 300) -> int:
    """The number of a trial training on `host` that has saved a checkpoint."""
    deadline = time.monotonic() + timeout
    while True:
        assert driver.poll() is None, driver.stdout.read()
        assert time.monotonic() < deadline, f"no trial on {host} saved a checkpoint"
        try:
            study = optuna.load_study(study_name="mnist-cnn", storage=rdb)
        except KeyError:  # not created yet
            time.sleep(0.5)
            continue
        for t in study.get_trials(states=(TrialState.RUNNING,)):
            if (t.system_attrs.get("worker") or {}).get("host") == host and (
                t.system_attrs.get("checkpoint_step") is not None
            ):
                return t.number
        time.sleep(0.2)
