"""Exactly once, whatever dies: kills at named points, dead workers, lost hosts, then a rerun.

The toy app (tests/apps) sweeps in seconds, so every point of the lifecycle can be killed.
After any single kill and a rerun of the same command, the invariant below must hold.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from harness import ToyApp, check_invariant, error_lines, ok, toy_app
from optuna.trial import TrialState

# the lifecycle, in order; "epoch-reported:2" is the middle of trial 0's training
KILL_POINTS = [
    "study-created",
    "mlflow-store-built",
    "stores-created",
    "after-ask",
    "run-created",
    "after-run-start",
    "epoch-reported:2",
    "after-job",
    "after-tell",
    "end-tagged",
    "end-published",
    "end-registered",
    "end-aliased",
    "end-reported",
    "end-parent-closed",
    "end-claimed",
    "before-exit",
]
# the default run covers one point per phase; .ci/run covers them all
QUICK = {"run-created", "after-job", "end-registered"}


@pytest.mark.parametrize(
    "point",
    [p if p in QUICK else pytest.param(p, marks=pytest.mark.slow) for p in KILL_POINTS],
)
def test_a_kill_at_any_point_then_a_rerun_finishes_exactly_once(toy, point):
    if point == "mlflow-store-built":
        (toy.path / "mlflow.db").unlink()  # the sweep makes its store itself
    killed = toy.spawn(env={"SWEEP_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    rerun = toy.run()
    ok(rerun)
    check_invariant(toy)
    # and a third run changes nothing: the end is not done twice
    again = toy.run()
    ok(again)
    assert "already has 3 finished trials" in again.stdout
    check_invariant(toy)


@pytest.mark.slow
def test_a_kill_between_the_jobs_run_end_and_tell_leaves_no_finished_run_for_a_failed_trial(toy):
    killed = toy.spawn(env={"SWEEP_CRASH_AT": "after-job"})
    assert killed.returncode == -signal.SIGKILL
    (trial,) = toy.study().get_trials()
    assert trial.state == TrialState.RUNNING
    ok(toy.run())
    trial = toy.study().get_trials()[0]
    run = toy.client().get_run(trial.user_attrs["mlflow_run_id"])
    assert trial.state == TrialState.FAIL
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    assert "died" in run.data.tags["failure_reason"]


# a process that dies inside a write transaction big enough to reach the file (cache_size=1)
DIE_IN_A_TRANSACTION = """
import os, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size = 1")
db.execute("BEGIN IMMEDIATE")
db.execute("CREATE TABLE dead_transaction (x)")
db.execute("INSERT INTO dead_transaction SELECT randomblob(2000) FROM (WITH RECURSIVE"
           " c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 20) SELECT i FROM c)")
os._exit(9)
"""


@pytest.mark.parametrize("store", ["optuna.db", "mlflow.db"])
def test_a_store_left_with_a_hot_journal_is_rolled_back_and_the_rerun_finishes(toy, store):
    # what a SIGKILL inside SQLite's write leaves (CI, a random kill): the rerun's check of
    # the file, read-only, could not read it ("attempt to write a readonly database")
    killed = toy.spawn(env={"SWEEP_CRASH_AT": "after-tell"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    db = toy.path / store
    died = subprocess.run([sys.executable, "-c", DIE_IN_A_TRANSACTION, str(db)])
    assert died.returncode == 9
    assert (toy.path / f"{store}-journal").stat().st_size > 0
    read_only = contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True))
    with read_only as ro, pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.execute("SELECT * FROM sqlite_master")  # the journal is hot: it must be rolled back
    ok(toy.run())
    assert not (toy.path / f"{store}-journal").exists()  # the rerun rolled it back
    with contextlib.closing(sqlite3.connect(db)) as rolled_back:
        names = rolled_back.execute("SELECT name FROM sqlite_master").fetchall()
    assert ("dead_transaction",) not in names  # the dead transaction is not kept
    check_invariant(toy)


@pytest.mark.slow
def test_random_kills_then_reruns_hold_the_invariant(tmp_path):
    """Ten SIGKILLs at seeded random moments of a sweep, each followed by a rerun."""
    import random

    timing = toy_app(tmp_path / "timing")
    started = time.monotonic()
    ok(timing.spawn())
    whole = time.monotonic() - started
    rng = random.Random(7)
    for i in range(10):
        toy = toy_app(tmp_path / f"kill-{i}")
        proc = toy.popen()
        time.sleep(rng.uniform(0, whole))
        proc.kill()
        proc.communicate()
        ok(toy.run())
        check_invariant(toy)


def test_a_dead_n_jobs_worker_is_noticed_and_the_sweep_finishes(toy):
    once = toy.path / "crashed-once"
    proc = toy.run(
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=6",
        "epoch_seconds=1",  # the worker starts (imports) while the first trials train
        env={
            "SWEEP_CRASH_AT": "epoch-reported:2",
            "SWEEP_FAULT_ROLE": "worker",
            "SWEEP_FAULT_ONCE": str(once),
        },
    )
    ok(proc)
    assert once.exists()  # the worker really was killed
    assert "died (exit -9)" in proc.stderr
    check_invariant(toy, n_trials=6)
    failed = [
        t
        for t in toy.study().get_trials()
        if t.state == TrialState.FAIL and t.system_attrs["failure"] != "surplus"  # given back
    ]
    assert len(failed) == 1 and "died while training" in failed[0].user_attrs["fail_reason"]


@pytest.mark.slow
def test_sigterm_stops_the_workers_and_a_rerun_resumes(toy):
    marker = toy.path / "paused"
    proc = toy.popen(
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=4",
        "epoch_seconds=0.3",
        env={
            "SWEEP_PAUSE_AT": "epoch-reported:2",
            "SWEEP_FAULT_ROLE": "main",
            "SWEEP_PAUSE_FILE": str(marker),
        },
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out
    study = toy.study()
    assert [t.number for t in study.get_trials() if t.state == TrialState.RUNNING] == []
    runs = toy.all_runs()
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    stopped = [r for r in runs if r.data.tags.get("failure_reason", "").startswith("stopped by")]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    ok(toy.run("hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4"))
    check_invariant(toy, n_trials=4)


def lost_host(toy: ToyApp) -> float:
    """Host B trains trial 0 and dies; this host's sweep must fail it and finish. Returns
    the seconds from B's death to trial 0 being FAIL."""
    marker = toy.path / "paused"
    fast = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.heartbeat_grace=4")
    other = toy.popen(
        *fast,
        env={
            "SWEEP_HOST_ID": "host-b",
            "SWEEP_PAUSE_AT": "epoch-reported:1",
            "SWEEP_PAUSE_FILE": str(marker),
        },
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert other.poll() is None and time.monotonic() < deadline, other.stdout.read()
        time.sleep(0.2)
    here = toy.popen(*fast, "epoch_seconds=0.5")
    time.sleep(2)  # this host joins while host B's trial still beats
    other.kill()
    killed_at = time.time()
    other.communicate()
    out, _ = here.communicate(timeout=300)
    assert here.returncode == 0, out
    check_invariant(toy)
    trial = toy.study().get_trials()[0]
    assert trial.state == TrialState.FAIL
    assert "stopped sending heartbeats" in trial.user_attrs["fail_reason"]
    return trial.datetime_complete.timestamp() - killed_at


def test_a_lost_host_is_found_by_its_silent_heartbeat_on_sqlite(toy):
    seconds = lost_host(toy)
    print(f"lost host detected after {seconds:.1f} s (grace 4 s, interval 1 s)")
    assert seconds <= 4 + 1 + 1.5  # grace + one interval + one loop of this host


@pytest.mark.slow
def test_a_lost_host_is_found_by_its_silent_heartbeat_on_postgres(tmp_path, postgres):
    from servers import create_database

    toy = toy_app(tmp_path, storage=create_database(postgres, "optuna_lost_host"))
    try:
        seconds = lost_host(toy)
    finally:
        toy.close()
    print(f"lost host detected after {seconds:.1f} s on PostgreSQL (grace 4 s, interval 1 s)")
    assert seconds <= 4 + 1 + 1.5


def test_a_changed_search_space_is_one_error_and_the_study_is_untouched(toy):
    ok(toy.run("hydra.sweeper.n_trials=2", "epochs=0"))
    changed = toy.run("hydra.sweeper.n_trials=3", "epochs=0", "x=tag(log, interval(0.1, 5))")
    assert changed.returncode == 2
    (error,) = error_lines(changed)
    assert "hydra.sweeper.params.x changed from [-5.5, 5.5] to log [0.1, 5.0]" in error
    assert "hydra.sweeper.study_name" in error and "Traceback" not in changed.stderr
    assert len(toy.study().get_trials()) == 2
    ok(toy.run("epochs=0"))
    check_invariant(toy, ends=2)  # the study ended at 2 trials, and again at 3


def test_a_trial_past_its_timeout_fails_and_the_sweep_goes_on(toy):
    proc = toy.run(
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.trial_timeout=2",
        "epoch_seconds=0.2",
        "epochs=choice(1, 60)",
    )
    ok(proc)
    trials = toy.study().get_trials()
    timed_out = [t for t in trials if t.state == TrialState.FAIL]
    assert timed_out and all(t.params["epochs"] == 60 for t in timed_out)
    by_id = {r.info.run_id: r for r in toy.all_runs()}
    for trial in timed_out:
        assert trial.system_attrs["failure"] == "timeout"
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FAILED" and "trial_timeout=2" in run.data.tags["failure_reason"]
    check_invariant(toy)


@pytest.mark.slow
def test_deleted_runs_do_not_break_a_resume_and_a_deleted_experiment_is_one_error(toy):
    ok(toy.run("hydra.sweeper.n_trials=2", "epochs=0"))
    client = toy.client()
    parent = [r for r in toy.all_runs() if r.data.tags.get("sweep.role") == "sweep"][0]
    child = toy.study().get_trials()[0].user_attrs["mlflow_run_id"]
    client.delete_run(parent.info.run_id)
    client.delete_run(child)
    ok(toy.run("epochs=0"))
    parents = [r for r in toy.all_runs() if r.data.tags.get("sweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id != parent.info.run_id
    client.delete_experiment(client.get_experiment_by_name("toy").experiment_id)
    proc = toy.run("hydra.sweeper.n_trials=4", "epochs=0")
    assert proc.returncode == 2 and "mlflow experiments restore" in proc.stderr


@pytest.mark.slow
def test_an_mlflow_server_down_for_30_s_mid_trial_loses_nothing(tmp_path, stoppable_mlflow_server):
    """MLflow's client retries a refused connection for about two minutes: a server that is
    back within that wait costs the sweep the wait and nothing else."""
    server = stoppable_mlflow_server
    toy = toy_app(tmp_path / "sweep")
    toy.tracking_uri = server.url
    proc = toy.popen("hydra.sweeper.n_trials=3", "epochs=6", "epoch_seconds=1")
    lines = []
    for line in proc.stdout:  # the progress lines: one per epoch when not on a terminal
        lines.append(line)
        if line.startswith("[trial 0] epoch 2/6"):
            break
    server.stop()  # in the middle of trial 0: its end, and trial 1's start, meet a dead server
    stopped = time.monotonic()
    time.sleep(30)
    assert proc.poll() is None, "".join(lines) + proc.stdout.read()  # still waiting, not failed
    server.start()
    print(f"the server was down for {time.monotonic() - stopped:.0f} s")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, "".join(lines) + out
    try:
        check_invariant(toy)  # 3 finished trials, no run RUNNING, one parent, one best, the end
        runs = {r.info.run_id: r for r in toy.all_runs()}
        for trial in toy.study().get_trials():  # every finished trial's result reached its run
            assert runs[trial.user_attrs["mlflow_run_id"]].data.metrics["value"] == trial.value
    finally:
        toy.close()
