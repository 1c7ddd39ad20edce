"""hydra.sweeper.cancel=true: the same command with one setting stops a running sweep early; its
workers stop their trials at the next epoch, checkpointed, the end runs once with the trials it
has, and the command without the setting resumes the sweep to its n_trials."""

from __future__ import annotations

import time

import pytest
from harness import check_invariant, error_lines, ok, toy_app
from optuna.trial import TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.storage import optuna_internals

CANCELLED = "the sweep was cancelled (hydra.sweeper.cancel=true)"


@pytest.fixture
def toy(tmp_path):
    toy = toy_app(tmp_path / "sweep")
    yield toy
    toy.close()


@pytest.mark.slow
def test_a_cancelled_sweep_stops_at_the_next_epoch_ends_once_and_its_rerun_resumes(toy):
    marker = toy.path / "paused"
    sweep = ("hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner=null")
    sweep += ("checkpoint=true", "epochs=5", "epoch_seconds=0.4")
    proc = toy.popen(
        *sweep,
        env={
            # the first process pauses in its second trial, after that trial's second epoch
            "SWEEP_PAUSE_AT": "epoch-reported:7",
            "SWEEP_PAUSE_FILE": str(marker),
            "SWEEP_FAULT_ROLE": "main",
        },
    )
    try:
        deadline = time.monotonic() + 180
        while not (marker.exists() and marker.read_text()):  # it holds the pausing pid
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        # the trial the first process paused in (the other worker's trial may be running too,
        # and may be the lower number when that worker started late)
        pid = marker.read_text()
        paused = [
            t
            for t in toy.study().get_trials()
            if t.state == TrialState.RUNNING and keys.worker(t)[1] == pid
        ]
        assert len(paused) == 1, [(t.number, keys.worker(t)) for t in toy.study().get_trials()]
        asked = toy.run(*sweep, "hydra.sweeper.cancel=true")
        ok(asked)
        assert asked.stdout.startswith("Cancel asked of sweep toy ("), asked.stdout
        assert "rerun the sweep's command to resume it" in asked.stdout
        status = toy.run(*sweep, "hydra.sweeper.status=true")
        ok(status)
        assert status.stdout.splitlines()[1].startswith("Cancelled at "), status.stdout
        time.sleep(3)  # the workers' watch has read the mark (every 2 s)
    finally:
        marker.unlink(missing_ok=True)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    assert "The sweep was cancelled (hydra.sweeper.cancel=true) with " in out, out[-3000:]
    trials = toy.study().get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 1 <= len(finished) < 8
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    # the paused trial stopped at its next report (epoch 2), its checkpoint the epoch before
    stopped = [t for t in trials if CANCELLED in keys.fail_reason(t)]
    assert paused[0].number in [t.number for t in stopped]
    mine = next(t for t in stopped if t.number == paused[0].number)
    assert keys.fail_reason(mine).startswith("stopped at epoch 2: "), keys.fail_reason(mine)
    assert keys.checkpoint_step(mine) == 1
    parents, children = toy.runs()
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.state"] == "cancelled"
    assert [r.info.run_name for r in children if r.info.status == "RUNNING"] == []
    runs = {r.data.tags["optuna.trial_number"]: r for r in children}
    assert runs[str(mine.number)].data.tags["stopped_by"] == "cancel"
    best = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert len(best) == 1  # the end ran, once, with the trials it had
    assert len(toy.client().search_model_versions("name='toy-model'")) == 1
    # the command without the setting takes the mark away and resumes: the stopped trials
    # continue from their checkpoints, and the sweep ends again at n_trials
    rerun = toy.run(*sweep)
    ok(rerun)
    assert "This sweep was cancelled (hydra.sweeper.cancel=true): it resumes." in rerun.stdout
    assert optuna_internals.study_system_attrs(toy.study())[keys.CANCEL] is None
    check_invariant(toy, n_trials=8, ends=2)
    trials = toy.study().get_trials()
    continued = [t for t in trials if t.user_attrs.get(keys.CONTINUES) == mine.number]
    assert len(continued) == 1 and continued[0].state == TrialState.COMPLETE
    (parent,) = toy.runs()[0]
    assert parent.data.tags["sweep.state"] == "finished"


def test_cancel_of_a_finished_sweep_changes_nothing(toy):
    ok(toy.run("hydra.sweeper.n_trials=1"))
    proc = toy.run("hydra.sweeper.n_trials=1", "hydra.sweeper.cancel=true")
    ok(proc)
    assert "has 1/1 finished trials: nothing to cancel." in proc.stdout, proc.stdout
    assert keys.CANCEL not in optuna_internals.study_system_attrs(toy.study())


def test_cancel_of_a_sweep_that_has_not_started_creates_nothing(toy):
    proc = toy.run("hydra.sweeper.cancel=true")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "no sweep yet" in line and "optuna.db does not exist" in line, line
    assert sorted(p.name for p in toy.path.iterdir()) == []


def test_cancel_and_status_together_are_refused(toy):
    proc = toy.run("hydra.sweeper.cancel=true", "hydra.sweeper.status=true")
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "set one of the two" in line, line
    assert sorted(p.name for p in toy.path.iterdir()) == []
