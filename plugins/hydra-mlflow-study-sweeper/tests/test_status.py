"""hydra.sweeper.status=true: the same command with one setting shows where its sweep stands,
while it runs (a worker paused at a known epoch) and after it ended; nothing is created."""

from __future__ import annotations

import time

import pytest
from harness import check_invariant, error_lines, ok, toy_app


@pytest.fixture
def toy(tmp_path):
    toy = toy_app(tmp_path / "sweep")
    yield toy
    toy.close()


def status_of(toy, *overrides, env=None):
    proc = toy.run("hydra.sweeper.status=true", *overrides, env=env)
    ok(proc)
    return proc.stdout


@pytest.mark.slow
def test_status_while_it_runs_shows_who_trains_what_and_after_it_the_best(toy):
    marker = toy.path / "paused"
    sweep = ("hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=null", "epoch_seconds=0.05")
    slurm = {"SLURM_ARRAY_JOB_ID": "41", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "43"}
    proc = toy.popen(
        *sweep,
        env={"SWEEP_PAUSE_AT": "epoch-reported:5", "SWEEP_PAUSE_FILE": str(marker), **slurm},
    )
    try:
        deadline = time.monotonic() + 120  # trial 0's 3 epochs, trial 1's 2nd: paused there
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        lines = status_of(toy, *sweep).splitlines()
        assert lines[0].startswith("Sweep toy in sqlite:///")
        assert lines[0].endswith(": 1/4 finished (1 complete, 0 pruned), 0 failed, 1 running"), (
            lines
        )
        assert lines[1] == "Running:"
        assert lines[2].startswith("  trial 1 (x=") and "): epoch 2 value=" in lines[2], lines
        assert f" pid {proc.pid} (Slurm job 41_2)" in lines[2], lines
        assert lines[3].startswith("Best so far: trial 0, value="), lines
        assert lines[4].startswith("Time left: about "), lines
        assert "(3 to go, 1 running, a trial takes" in lines[4] and "n_jobs=1" in lines[4]
    finally:
        marker.unlink(missing_ok=True)  # the sweep goes on
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    check_invariant(toy, n_trials=4)
    lines = status_of(toy, *sweep).splitlines()
    best = toy.study().best_trial
    assert lines[0].endswith(": 4/4 finished (4 complete, 0 pruned), 0 failed, 0 running")
    assert lines[1].startswith(f"Best so far: trial {best.number}, value={best.value:.4f}")
    assert lines[2].startswith("Time left: none, every trial has finished")
    check_invariant(toy, n_trials=4)  # the status changed nothing


def test_status_of_a_sweep_that_has_not_started_creates_nothing(toy):
    proc = toy.run("hydra.sweeper.status=true")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "no sweep yet" in line and "optuna.db does not exist" in line, line
    assert sorted(p.name for p in toy.path.iterdir()) == []
    ok(toy.run("hydra.sweeper.n_trials=1"))
    proc = toy.run("hydra.sweeper.status=true", "hydra.sweeper.study_name=other")
    (line,) = error_lines(proc)
    assert "no study 'other' in sqlite:///" in line and "study_name" in line, line
