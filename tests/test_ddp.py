"""Trials on two devices: the MNIST sweep with `trainer.devices=2 trainer.strategy=ddp` on CPU
(Lightning starts rank 1 by running sweep.py again; gloo), pruned, complete, continued, and
with a rank killed mid-epoch; the sweeper's invariant holds after each, and no process of a
trial is left behind."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from harness import ToyApp, check_invariant
from mnist_sweep import SweepDir, assert_ok
from optuna.trial import TrialState

DDP = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp")
# one good learning rate, and one that learns nothing in an epoch (val_acc < 0.5: pruned)
GOOD, BAD = 0.005, 1e-6
SPACE = "model.lr=tag(log, interval(1e-6, 1e-2))"


def enqueue(*lrs: float) -> str:
    sets = ", ".join(f"{{model.dropout: 0.1, model.lr: {lr}}}" for lr in lrs)
    return f"hydra.sweeper.enqueue=[{sets}]"


def check(sweep: SweepDir, n_trials: int) -> None:
    """The sweeper's invariant, on the MNIST app's stores, and nothing of the sweep running."""
    stores = ToyApp(sweep.path)  # the same files: optuna.db and mlflow.db in the folder
    try:
        check_invariant(stores, n_trials=n_trials, study_name="mnist-cnn", model="mnist-cnn")
    finally:
        stores.close()
    assert left_behind(sweep) == []


def left_behind(sweep: SweepDir, wait_s: float = 10) -> list[int]:
    """Processes still running with this sweep's folder on their command line."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if str(sweep.sweep_dir) in cmdline and state not in ("Z", "X"):
                found.append(int(proc.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def rank_log(sweep: SweepDir, number: int) -> str:
    return (sweep.sweep_dir / f"trial-{number}" / "train_ddp_process_1.log").read_text()


@pytest.mark.slow
def test_ddp_trials_complete_and_prune_with_every_rank_stopping_at_the_same_epoch(sweep):
    proc = sweep.spawn(
        *DDP,
        "hydra.sweeper.n_trials=2",
        SPACE,
        enqueue(GOOD, BAD),
        "hydra.sweeper.pruner={name: threshold, lower: 0.5}",
    )
    assert_ok(proc)
    check(sweep, n_trials=2)
    complete, pruned = sweep.study().get_trials()
    assert complete.state == TrialState.COMPLETE and pruned.state == TrialState.PRUNED
    assert sorted(complete.intermediate_values) == [0, 1]
    assert sorted(pruned.intermediate_values) == [0]  # stopped after its first epoch
    # rank 1 trained each trial's own values, as long as rank 0 did
    for trial, epochs in ((complete, 2), (pruned, 1)):
        log = rank_log(sweep, trial.number)
        assert f"model.lr={trial.params['model.lr']}" in log
        assert f"rank 1: {epochs} epochs trained" in log
    # rank 1 made no run, logged nothing, and wrote no .hydra files
    runs = sweep.runs()
    assert len(runs) == 3  # the parent and the two trials'
    run = sweep.client().get_run(complete.user_attrs["mlflow_run_id"])
    assert [m.step for m in sweep.client().get_metric_history(run.info.run_id, "val_acc")] == [0, 1]
    assert run.data.params["trainer.devices"] == "2"
    for number in (0, 1):
        folder = sweep.sweep_dir / f"trial-{number}"
        assert sorted(p.name for p in (folder / ".hydra").iterdir()) == [
            "config.yaml",
            "hydra.yaml",
            "overrides.yaml",
        ]
        assert "train_ddp_process_1" not in (folder / ".hydra" / "hydra.yaml").read_text()
    assert "rank 1:" not in proc.stdout  # its lines go to its log file


@pytest.mark.slow
def test_an_interrupted_ddp_trial_continues_from_rank_zero_s_checkpoint(sweep):
    same = (*DDP, "hydra.sweeper.n_trials=1", "hydra.sweeper.pruner=null", "trainer.max_epochs=3")
    # the sweep (rank 0) killed after the 1st of 3 epochs; rank 1 dies with it
    killed = sweep.spawn(*same, env={"SWEEP_CRASH_AT": "epoch-reported:1"})
    assert killed.returncode == -signal.SIGKILL
    assert left_behind(sweep) == []
    (trial,) = sweep.study().get_trials()
    assert trial.system_attrs["checkpoint_step"] == 0

    resumed = sweep.spawn(*same)
    assert_ok(resumed)
    assert "trial 0 was interrupted after epoch 1: a new trial" in resumed.stdout
    check(sweep, n_trials=1)
    old, new = sweep.study().get_trials()
    assert new.state == TrialState.COMPLETE and new.user_attrs["continues_trial"] == 0
    assert sorted(new.intermediate_values) == [0, 1, 2]
    run = sweep.client().get_run(new.user_attrs["mlflow_run_id"])
    assert run.data.metrics["epochs_trained"] == 2  # epochs 2 and 3, on both ranks
    assert "rank 1: 2 epochs trained" in rank_log(sweep, new.number)


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_fails_its_trial_and_the_sweep_goes_on(sweep, tmp_path):
    started = time.monotonic()
    proc = sweep.spawn(
        *DDP,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=null",
        "hydra.sweeper.max_failure_rate=0.5",
        env={  # the first rank 1 to reach its 3rd training batch SIGKILLs itself
            "SWEEP_CRASH_AT": "train-batch:3",
            "SWEEP_FAULT_ROLE": "rank",
            "SWEEP_FAULT_ONCE": str(tmp_path / "once"),
        },
    )
    took = time.monotonic() - started
    assert_ok(proc)
    check(sweep, n_trials=2)
    failed, *others = sweep.study().get_trials()
    assert failed.state == TrialState.FAIL, failed.user_attrs
    assert failed.intermediate_values == {}  # it died in its first epoch
    assert [t.state for t in others] == [TrialState.COMPLETE] * 2
    run = sweep.client().get_run(failed.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"
    reason = run.data.tags["failure_reason"]
    assert re.search(r"Connection closed|Connection reset|peer|Broken pipe", reason), reason
    # bounded: gloo notices the lost peer at once; no collective waits for its timeout
    failed_after = (failed.datetime_complete - failed.datetime_start).total_seconds()
    assert failed_after < 60, failed_after
    assert took < 240, took
    print(f"the trial failed {failed_after:.1f} s after it started; the sweep took {took:.0f} s")
