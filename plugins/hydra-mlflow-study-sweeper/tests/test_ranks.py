"""Trials on several devices (trial/ranks.py): which rank a process is, the trial's overrides
handed to the ranks, a job that starts ranks of its own (torchrun-style, on gloo) pruned and
complete, and workers given two GPUs each, locally and on Ray. The MNIST app's tests/test_ddp.py
runs Lightning's DDP under the sweeper."""

from __future__ import annotations

import os
import sys

import pytest
from harness import PUBLISHING, ToyApp, check_invariant, ok
from optuna.trial import TrialState

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.trial import ranks


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, 0),  # one process
        ({"RANK": "3", "LOCAL_RANK": "1"}, 3),  # torchrun: the global rank
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "WORLD_SIZE": "2"}, 1),  # Lightning's launcher
        ({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2"}, 0),  # ... in its rank 0
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 2),  # another node
    ],
)
def test_a_process_knows_its_rank_from_the_standard_variables(monkeypatch, env, expected):
    for name in contract.DISTRIBUTED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert contract.rank() == expected
    monkeypatch.setenv(contract.TRIAL_ID, "7")
    assert contract.is_rank_job() == (expected > 0)  # only within a trial
    monkeypatch.delenv(contract.TRIAL_ID)
    assert not contract.is_rank_job()


def test_the_trial_s_overrides_reach_its_ranks_whatever_they_hold(monkeypatch):
    overrides = ["x=1.5", "name='a b,c'", "uri=${oc.env:SWEEP_ARG_3}", 'q="[1, 2]"', "k=\\'"]
    ((name, value),) = contract.overrides_variable(overrides).items()
    assert set(value) <= set("0123456789abcdef")  # Hydra's env_set passes it on untouched
    monkeypatch.setenv(name, value)
    assert contract.job_overrides() == overrides


def test_a_worker_started_during_a_job_does_not_inherit_the_job_s_variables():
    env = {"PATH": "/bin", "SWEEP_STORAGE_URL": "sqlite:///o.db", contract.TRIAL_ID: "4",
           contract.MLFLOW_RUN_ID: "abc", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}  # fmt: skip
    assert contract.without_job(env) == {"PATH": "/bin", "SWEEP_STORAGE_URL": "sqlite:///o.db"}


def test_the_variables_a_ddp_launcher_writes_are_put_back_after_the_job(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with ranks.TrialProcesses(trial_id=123456789):
        os.environ["MASTER_ADDR"] = "127.0.0.1"  # as Lightning's launcher does in rank 0
        os.environ["MASTER_PORT"] = "29500"
    assert os.environ["MASTER_ADDR"] == "10.0.0.1" and "MASTER_PORT" not in os.environ


def test_a_rank_left_running_after_its_job_is_killed(tmp_path):
    import subprocess
    import time

    env = dict(os.environ, **{contract.TRIAL_ID: "987654321"})
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)  # exec'd: its environment is the one given
        started = time.monotonic()
        assert ranks.end_ranks(987654321, grace_s=0.5) == [stray.pid]
        assert time.monotonic() - started < 5
        assert not ranks.alive(stray.pid)  # killed and reaped: no zombie either
        assert stray.poll() is not None
        assert other.poll() is None  # not a process of that trial: left alone
    finally:
        other.kill()
        other.wait()


# ---- a job that starts its own ranks (torchrun-style) ----------------------------------------


def toy_of(path, app: str) -> ToyApp:
    """`app` in experiment `toy`, publishing its best model: what check_invariant reads."""
    return ToyApp(path, app, defaults=("hydra.sweeper.experiment_name=toy", *PUBLISHING))


@pytest.mark.slow
def test_a_job_with_ranks_of_its_own_is_pruned_and_completes_on_every_rank(tmp_path):
    pytest.importorskip("torch")
    toy = toy_of(tmp_path, "ranks_app.py")
    proc = toy.run(
        "hydra.sweeper.n_trials=2",
        "+ranks=2",
        "epochs=3",
        "hydra.sweeper.enqueue=[{x: 0.5, y: 0.0}, {x: 5.0, y: 5.0}]",
        "hydra.sweeper.pruner={name: threshold, upper: 10.0}",  # 50 > 10: the second is pruned
    )
    ok(proc)
    check_invariant(toy, n_trials=2)
    complete, pruned = toy.study().get_trials()
    assert complete.state == TrialState.COMPLETE and pruned.state == TrialState.PRUNED
    assert sorted(complete.intermediate_values) == [0, 1, 2] and list(
        pruned.intermediate_values
    ) == [0]
    for trial, epochs in ((complete, "3"), (pruned, "1")):  # both ranks stopped together
        folder = toy.sweep_dir / str(trial.number)
        assert [(folder / f"rank-{r}.epochs").read_text() for r in (0, 1)] == [epochs, epochs]
    # rank 0 logged the curve into the trial's run; no other run was made
    assert len(toy.all_runs()) == 3
    curve = toy.client().get_metric_history(complete.user_attrs["mlflow_run_id"], "curve")
    assert [m.step for m in curve] == [0, 1, 2]
    toy.close()


# ---- two GPUs per worker ----------------------------------------------------------------------


@pytest.mark.slow
def test_local_workers_each_get_two_gpus(tmp_path):
    toy = ToyApp(
        tmp_path, "curve_app.py", defaults=("hydra.sweeper.experiment_name=toy", *PUBLISHING)
    )
    proc = toy.spawn(
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.resources={gpu: 2}",
        "hydra.sweeper.pruner=null",
        "log_env=true",
        "epochs=3",
        "epoch_seconds=1",  # long enough for the second worker to start and take trials
        env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"},  # the GPUs this machine "shows"
    )
    ok(proc)
    check_invariant(toy, n_trials=4)
    _, children = toy.runs()
    assert {r.data.tags["CUDA_VISIBLE_DEVICES"] for r in children} == {"0,1", "2,3"}
    toy.close()


@pytest.mark.slow
def test_a_ray_worker_gets_two_declared_gpus(tmp_path):
    pytest.importorskip("ray")
    from test_ray import fake_cluster

    with fake_cluster({"num_cpus": 2, "num_gpus": 2}) as (cluster, _):
        toy = toy_of(tmp_path, "curve_app.py")
        proc = toy.spawn(
            f"hydra.sweeper.ray.address={cluster.address}",
            "hydra.sweeper.backend=ray",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.resources={cpu: 1, gpu: 2}",
            "log_env=true",
        )
        ok(proc)
    check_invariant(toy, n_trials=2)
    assert "CUDA_VISIBLE_DEVICES=0,1" in proc.stdout  # the worker's placement line
    _, children = toy.runs()
    assert [r.data.tags["CUDA_VISIBLE_DEVICES"] for r in children] == ["0,1"] * 2
    toy.close()
