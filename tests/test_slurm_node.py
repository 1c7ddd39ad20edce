"""Lightning on a machine with Slurm: a login node (Slurm's `srun` on the PATH, not used) and
a sweep's worker inside an sbatch task (SLURM_* variables of the task). Lightning reads both
from the PATH and the environment, which is what these tests set: an `srun` that fails if run,
and the variables an sbatch array task has."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import optuna
import pytest
import torch
from mnist_sweep import assert_ok
from pytorch_lightning.plugins.environments import LightningEnvironment, SLURMEnvironment

from mnist.train import build_trainer, process_layout

# what `sbatch --array=0-3` gives task 2 of job 41 (Slurm 22.05), one task per array element
SBATCH_TASK = {
    "SLURM_JOB_ID": "43",
    "SLURM_ARRAY_JOB_ID": "41",
    "SLURM_ARRAY_TASK_ID": "2",
    "SLURM_JOB_NAME": "mnist-sweep",
    "SLURM_NTASKS": "1",
    "SLURM_NPROCS": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "node1",
    "SLURM_NODELIST": "node1",
    "SLURM_CPUS_ON_NODE": "2",
    "SLURM_TASKS_PER_NODE": "1",
}


@pytest.fixture
def srun_on_path(tmp_path) -> dict[str, str]:
    """An environment whose PATH has an `srun` (one that fails: nothing here may call it)."""
    folder = tmp_path / "slurm-bin"
    folder.mkdir()
    srun = folder / "srun"
    srun.write_text("#!/bin/sh\necho 'srun must not be called' >&2\nexit 3\n")
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_a_sweep_and_a_run_on_a_login_node_train(sweep, srun_on_path):
    """Lightning's PossibleUserWarning ("srun is available but not used"), at every Trainer and
    fit, failed every trial under the tests' error filter; for users it was a wrong hint."""
    assert_ok(sweep.run("hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=null", env=srun_on_path))
    states = [t.state for t in sweep.study().get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2
    assert_ok(sweep.run(multirun=False, env=srun_on_path))


def test_a_sweep_inside_an_sbatch_task_trains(sweep, srun_on_path):
    assert_ok(
        sweep.run(
            "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=null", env=srun_on_path | SBATCH_TASK
        )
    )
    states = [t.state for t in sweep.study().get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2


def trainer_in(env: dict[str, str], cluster: str, devices: int, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with process_layout(cluster):
        return build_trainer(
            torch.device("cpu"),
            [],
            verbose=False,
            cluster=cluster,
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_epochs=1,
        )


@pytest.mark.parametrize("devices", [1, 2])
def test_in_an_sbatch_task_lightning_lays_out_the_devices_it_was_given(
    devices, srun_on_path, monkeypatch
):
    """The task's SLURM_* variables describe the worker's task (one task, no srun per device):
    Lightning's Slurm environment would take the layout from them (and refuses devices=2 with
    one task); with trainer.cluster=local (the default) Lightning starts its own processes on
    the devices it was given."""
    trainer = trainer_in(srun_on_path | SBATCH_TASK, "local", devices, monkeypatch)
    # (the connector holds it for a single device too; a multi-device strategy holds it as well)
    assert isinstance(trainer._accelerator_connector.cluster_environment, LightningEnvironment)
    assert trainer.num_devices == devices
    assert trainer.world_size == devices
    if devices > 1:  # the processes are Lightning's own, not srun's
        assert trainer.strategy.launcher is not None
        assert not trainer.strategy.cluster_environment.creates_processes_externally


def test_trainer_cluster_slurm_is_slurms_layout(srun_on_path, monkeypatch):
    """The choice for one run started by srun with a task per device: the ranks are Slurm's."""
    env = srun_on_path | SBATCH_TASK | {"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    env |= {"SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2", "SLURM_NTASKS_PER_NODE": "2"}
    trainer = trainer_in(env, "slurm", 2, monkeypatch)
    assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert trainer.global_rank == 1 and trainer.world_size == 2


def test_a_sweep_refuses_trainer_cluster_slurm(sweep):
    proc = sweep.run("hydra.sweeper.n_trials=2", "trainer.cluster=slurm")
    assert proc.returncode == 2  # a config error, as every config error of the app
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "trainer.cluster=slurm" in errors[0], proc.stderr[-2000:]
    assert not Path(sweep.path, "optuna.db").exists() or sweep.study().get_trials() == []


def test_trainer_cluster_must_be_local_or_slurm(sweep):
    proc = sweep.run("trainer.cluster=lsf", multirun=False)
    assert proc.returncode == 2  # a config error, as every config error of the app
    assert "trainer.cluster='lsf' must be local or slurm" in proc.stderr
