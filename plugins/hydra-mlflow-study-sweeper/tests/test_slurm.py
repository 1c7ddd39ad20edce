"""backend=slurm on a real single-node Slurm cluster (slurm_cluster.py: slurmctld and slurmd of
this machine, 2 CPUs, 2 fake GPUs), with PostgreSQL and `mlflow server` as the shared stores.
No mock of sbatch: the sweeps submit real array jobs and watch the real queue."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from harness import check_invariant, error_lines, ok, toy_app
from optuna.trial import TrialState
from servers import create_database

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.backends.slurm import DEFAULT_CONF, Layout, time_limit_seconds

SLURM = "hydra.sweeper.backend=slurm"


@pytest.fixture
def shared_toy(tmp_path, postgres, mlflow_server):
    """The toy sweep with stores every node reaches: PostgreSQL, an MLflow server."""
    storage = create_database(postgres, f"optuna_{tmp_path.name}".lower()[:60])
    toy = toy_app(tmp_path / "sweep", storage=storage)
    toy.tracking_uri = mlflow_server
    yield toy
    toy.close()


@pytest.fixture
def journal_toy(tmp_path, mlflow_server):
    """The toy sweep with a journal file as its study (a folder every node would mount) and an
    MLflow server: a cluster without a database server."""
    toy = toy_app(tmp_path / "sweep", storage=str(tmp_path / "shared" / "optuna.journal"))
    (tmp_path / "shared").mkdir()
    toy.tracking_uri = mlflow_server
    yield toy
    toy.close()


def task_lines(toy) -> dict[str, str]:
    """Each task's first line in its output: JOB_INDEX -> the rest of it."""
    lines = {}
    for out in sorted((toy.sweep_dir / "slurm").glob("*.out")):
        match = re.match(r"task (\S+) on \S+: (.*)", out.read_text().splitlines()[0])
        assert match, out.read_text()
        lines[match.group(1)] = match.group(2)
    return lines


@pytest.mark.parametrize(
    "n, cpu, gpu, expected",
    [
        (4, 0.5, 0.5, Layout(2, 2, 1, 1, 1)),  # two workers per task, on its one GPU
        (3, 1, 0.25, Layout(1, 3, 3, 1, 1)),  # four fit a GPU: the three in one task
        (5, 2, 0.5, Layout(3, 2, 4, 1, 2)),  # the last task has one worker
        (2, None, None, Layout(2, 1, 1, 0, 1)),  # one CPU each, no GPU
        (2, 4, 2, Layout(2, 1, 4, 2, 4)),  # whole GPUs
    ],
)
def test_workers_are_packed_into_tasks(n, cpu, gpu, expected):
    assert Layout.of(n, cpu, gpu) == expected


@pytest.mark.slow
@pytest.mark.parametrize("study", ["postgresql", "journal"])
def test_four_workers_share_two_gpus_in_two_tasks_and_the_invariant_holds(slurm, request, study):
    toy = request.getfixturevalue("shared_toy" if study == "postgresql" else "journal_toy")
    started = time.monotonic()
    proc = toy.spawn(
        SLURM,
        "hydra.sweeper.n_jobs=4",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.resources={cpu: 0.5, gpu: 0.5}",
        "hydra.sweeper.pruner=null",
        "epoch_seconds=1",
        "log_env=true",
        env=slurm.env,
    )
    ok(proc)
    print(f"4 workers on Slurm, 6 trials: {time.monotonic() - started:.0f} s")
    check_invariant(toy, n_trials=6)
    assert "Submitted 2 Slurm task(s) of 2 worker(s) each" in proc.stdout
    tasks = task_lines(toy)
    assert sorted(tasks.values()) == [
        "2 worker(s), CUDA_VISIBLE_DEVICES=0",
        "2 worker(s), CUDA_VISIBLE_DEVICES=1",
    ]
    gpu_of = {task: line.rsplit("=", 1)[1] for task, line in tasks.items()}
    runs = {r.info.run_id: r for r in toy.all_runs()}
    workers = set()
    for trial in toy.study().get_trials():
        if trial.system_attrs.get("failure") == "surplus":  # asked by two workers at once
            continue
        label = trial.system_attrs[keys.WORKER]
        workers.add((label["slurm"], label["pid"]))
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["CUDA_VISIBLE_DEVICES"] == gpu_of[label["slurm"]]
    assert {task for task, _ in workers} == set(tasks)  # both tasks trained
    assert slurm.jobs() == []
    script = (toy.sweep_dir / "slurm" / "workers.sbatch").read_text()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=1" in script
    # the stores as the watching command resolved them, through the environment
    assert "'hydra.sweeper.storage=${oc.env:SWEEP_STORAGE_URL}'" in script


# the tasks look like another machine: only Slurm (or heartbeats) can tell the watching command
# that a worker is gone, and the heartbeat's grace is long
ELSEWHERE = (
    "hydra.sweeper.slurm.setup=['export SWEEP_HOST_ID=compute-node']",
    "hydra.sweeper.heartbeat_grace=300",
)


def paused_sweep(toy, slurm, tmp_path, *overrides):
    """The toy sweep on Slurm, one worker, its first trial paused at its third epoch's report
    (epoch 2, checkpointed after it once the pause ends): (the command, the pause's file)."""
    marker = tmp_path / "paused"
    proc = toy.popen(
        SLURM,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.pruner=null",
        "checkpoint=true",
        "epochs=6",
        "epoch_seconds=0.3",
        *overrides,
        env={
            **slurm.env,
            "SWEEP_PAUSE_AT": "epoch-reported:3",
            "SWEEP_PAUSE_FILE": str(marker),
            "SWEEP_FAULT_ROLE": "worker",
            "SWEEP_FAULT_ONCE": str(tmp_path / "once"),
        },
    )
    deadline = time.monotonic() + 180
    while not marker.exists() or not marker.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(proc.communicate()[0][-4000:])
        time.sleep(0.2)
    return proc, marker


def finish(proc, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["scancel", "node lost"])
def test_a_task_stopped_mid_trial_is_replaced_and_its_trial_continued(
    slurm, shared_toy, tmp_path, how
):
    toy = shared_toy
    proc, marker = paused_sweep(toy, slurm, tmp_path, *ELSEWHERE)
    try:
        (task,) = slurm.jobs()
        stopped = time.time()
        if how == "scancel":  # SIGTERM: the worker closes its own trial, then exits 143
            assert slurm.run("scancel", task).returncode == 0
        else:  # the task's shell and worker SIGKILLed at once: nothing of them runs after it,
            # no exit status is written, as when a node is lost; only Slurm's queue tells
            worker = int(marker.read_text())
            shell = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
            os.kill(shell, signal.SIGKILL)
            os.kill(worker, signal.SIGKILL)
    finally:
        out = finish(proc)
    why = (
        "its worker(s) exited with 143"
        if how == "scancel"
        else "it left the queue before its workers ended"
    )
    assert f"Slurm task {task} is lost: {why}" in out, out[-4000:]
    check_invariant(toy, n_trials=2)
    trials = toy.study().get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL
    reason = first.user_attrs["fail_reason"]
    if how == "scancel":
        assert reason == "stopped by SIGTERM while training"
    else:
        assert f"its Slurm task {task} ended: {why}" in reason, reason
    assert first.datetime_complete.timestamp() - stopped < 30  # not after the 300 s grace
    (continued,) = [t for t in trials if t.user_attrs.get("continues_trial") == 0]
    assert continued.state == TrialState.COMPLETE and continued.params == first.params
    assert continued.system_attrs[keys.WORKER]["slurm"] != task  # its replacement's
    assert "replaces it" in out
    assert slurm.jobs() == []


@pytest.mark.slow
def test_the_time_limits_signal_stops_the_trial_at_its_next_epoch_and_a_fresh_task_continues(
    slurm, shared_toy, tmp_path
):
    """USR1 to the task's shell alone, as Slurm sends it (--signal=B:USR1@lead): the shell
    hands it on, the worker stops its trial at the next epoch, checkpointed, and leaves."""
    toy = shared_toy
    proc, marker = paused_sweep(toy, slurm, tmp_path)
    try:
        (task,) = slurm.jobs()
        signalled = slurm.run("scancel", "--signal=USR1", "--batch", task)
        assert signalled.returncode == 0, signalled.stderr
        time.sleep(2)  # the worker heard it (its line below says so), paused in epoch 2's report
        marker.unlink()  # epoch 2 checkpointed; epoch 3's report stops the trial
    finally:
        out = finish(proc)
    said = (toy.sweep_dir / "slurm" / f"{task}.out").read_text()  # the worker's output
    assert "Slurm's signal: this task's time limit is near" in said, said[-4000:]
    assert "This worker leaves: its Slurm job's time limit is near" in said
    assert f"Slurm task {task} left before its time limit: a fresh task takes its place" in out
    assert f"Slurm task {task} is lost" not in out
    check_invariant(toy, n_trials=2)
    trials = toy.study().get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL and keys.failure(first) == "interrupted"
    reason = "stopped at epoch 3: its Slurm job's time limit is near (USR1)"
    assert first.user_attrs["fail_reason"] == reason
    (continued,) = [t for t in trials if t.user_attrs.get("continues_trial") == 0]
    assert continued.state == TrialState.COMPLETE and continued.params == first.params
    assert continued.system_attrs[keys.WORKER]["slurm"] != task  # the fresh task's
    # only the epochs after the checkpoint (2) were trained again: 3, 4, 5
    assert sorted(continued.intermediate_values) == [0, 1, 2, 3, 4, 5]
    assert slurm.jobs() == []


@pytest.mark.slow
def test_a_requeued_task_closes_its_trial_and_rejoins_the_sweep(slurm, shared_toy, tmp_path):
    """`scontrol requeue` (as a preemption does): SIGTERM, the trial closed and continued, the
    same task back in the queue, not replaced."""
    toy = shared_toy
    proc, marker = paused_sweep(toy, slurm, tmp_path, *ELSEWHERE)
    try:
        (task,) = slurm.jobs()
        requeued = slurm.run("scontrol", "requeue", task)
        assert requeued.returncode == 0, requeued.stderr
    finally:
        out = finish(proc)
    assert f"Slurm task {task} was requeued: it rejoins when it runs again" in out, out[-4000:]
    assert "is lost" not in out and "replaces it" not in out
    check_invariant(toy, n_trials=2)
    trials = toy.study().get_trials()
    first = trials[0]
    assert first.state == TrialState.FAIL
    assert first.user_attrs["fail_reason"] == "stopped by SIGTERM while training"
    (continued,) = [t for t in trials if t.user_attrs.get("continues_trial") == 0]
    assert continued.state == TrialState.COMPLETE and continued.params == first.params
    assert continued.system_attrs[keys.WORKER]["slurm"] == task  # the task rejoined
    runs = (toy.sweep_dir / "slurm" / f"{task}.out").read_text()
    assert runs.count(f"task {task} on ") == 2  # both of its runs, in one output


@pytest.mark.slow
def test_a_task_reaching_its_time_limit_leaves_in_time_and_a_fresh_one_goes_on(slurm, shared_toy):
    """A real 1-minute limit, the signal 20 s before it (Slurm sends it up to 30 s earlier
    still): no trial starts that would end after the signal, the one running stops at an epoch,
    nothing is killed by the limit itself, and fresh tasks finish the study."""
    toy = shared_toy
    out = finish(
        toy.popen(
            SLURM,
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.pruner=null",
            "hydra.sweeper.slurm.time=1",
            "hydra.sweeper.slurm.signal_lead=20",
            "checkpoint=true",
            "epochs=6",
            "epoch_seconds=1.5",
            env=slurm.env,
        ),
        timeout=420,
    )
    assert "left before its time limit: a fresh task takes its place" in out, out[-4000:]
    assert "is lost" not in out, out[-4000:]
    check_invariant(toy, n_trials=4)
    for t in toy.study().get_trials():
        if t.state == TrialState.FAIL:  # only ever stopped at an epoch, before the limit
            assert "its Slurm job's time limit is near" in t.user_attrs["fail_reason"]
    assert slurm.jobs() == []


@pytest.mark.slow
def test_a_detached_sweep_exits_at_once_and_its_last_task_ends_it_once(slurm, shared_toy):
    toy = shared_toy
    sweep = (SLURM, "hydra.sweeper.slurm.detach=true", "hydra.sweeper.n_jobs=2")
    sweep += ("hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=null", "epochs=6")
    sweep += ("epoch_seconds=0.5",)
    proc = toy.run(*sweep, env=slurm.env)
    ok(proc)
    assert toy.study().get_trials() == []  # it left before any task trained
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("Detached: ")]
    job = re.match(r"Detached: Slurm job (\d+) trains", line).group(1)
    assert "hydra.sweeper.status=true`" in line and f"scancel {job}" in line, line
    assert "hydra.sweeper.cancel=true` (the end runs with the trials so far)" in line, line
    assert sorted(slurm.jobs()) == [f"{job}_0", f"{job}_1"]
    # the same command with status=true, while the tasks train: who trains what
    seen, deadline = "", time.monotonic() + 300
    while slurm.jobs():
        assert time.monotonic() < deadline, seen
        status = toy.run(*sweep, "hydra.sweeper.status=true", env=slurm.env)
        ok(status)
        if f"(Slurm job {job}_" in status.stdout:
            seen = status.stdout
        time.sleep(0.5)
    assert seen.splitlines()[1] == "Running:", seen
    check_invariant(toy, n_trials=4)
    outs = [p.read_text() for p in (toy.sweep_dir / "slurm").glob(f"{job}_*.out")]
    assert sum(out.count("model: toy-model version 1 ") for out in outs) == 1  # the end, once
    assert "model: toy-model" not in proc.stdout


@pytest.mark.slow
def test_a_detached_sweep_on_a_journal_file_fails_a_lost_tasks_trial_through_slurm(
    slurm, journal_toy
):
    """No database server: the study is a journal file, without heartbeats. Each task looks
    like a node of its own, so only Slurm's queue can tell its peer that it is gone."""
    toy = journal_toy
    sweep = (SLURM, "hydra.sweeper.slurm.detach=true", "hydra.sweeper.n_jobs=2")
    sweep += ("hydra.sweeper.n_trials=4", "hydra.sweeper.pruner=null", "checkpoint=true")
    sweep += ("epochs=8", "epoch_seconds=0.5")
    sweep += ("hydra.sweeper.slurm.setup=['export SWEEP_HOST_ID=node-$SLURM_ARRAY_TASK_ID']",)
    proc = toy.run(*sweep, env=slurm.env)
    ok(proc)
    job = re.search(r"Detached: Slurm job (\d+) ", proc.stdout).group(1)
    lost, deadline = None, time.monotonic() + 180
    while lost is None:  # the second task's trial, once it has a checkpoint
        assert time.monotonic() < deadline, slurm.jobs()
        time.sleep(0.3)
        for trial in toy.study().get_trials():
            label = trial.system_attrs.get(keys.WORKER) or {}
            running = trial.state == TrialState.RUNNING and keys.checkpoint_step(trial) is not None
            if running and label.get("slurm") == f"{job}_1":
                lost = trial
    # its shell and worker SIGKILLed at once, as when its node is lost: no exit status, no
    # closing of the trial; the journal says nothing of it
    worker = int(lost.system_attrs[keys.WORKER]["pid"])
    shell = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(shell, signal.SIGKILL)
    os.kill(worker, signal.SIGKILL)
    killed = time.time()
    deadline = time.monotonic() + 240
    while slurm.jobs():  # the first task's worker finishes the sweep
        assert time.monotonic() < deadline, slurm.jobs()
        time.sleep(0.5)
    check_invariant(toy, n_trials=4)
    trials = toy.study().get_trials()
    first = trials[lost.number]
    assert first.state == TrialState.FAIL
    reason = first.user_attrs["fail_reason"]
    assert reason == f"its worker's Slurm task {job}_1 is no longer running (squeue)", reason
    assert first.datetime_complete.timestamp() - killed < 30
    (continued,) = [t for t in trials if t.user_attrs.get("continues_trial") == lost.number]
    assert continued.state == TrialState.COMPLETE
    assert continued.system_attrs[keys.WORKER]["slurm"] == f"{job}_0"
    outs = [p.read_text() for p in (toy.sweep_dir / "slurm").glob(f"{job}_*.out")]
    assert sum(out.count("model: toy-model version 1 ") for out in outs) == 1  # the end, once


def completed(toy) -> list:
    try:
        return [t for t in toy.study().get_trials() if t.state == TrialState.COMPLETE]
    except KeyError:  # no study yet
        return []


@pytest.mark.slow
@pytest.mark.parametrize("detach", [True, False])
def test_a_cancelled_sweep_stops_its_tasks_ends_once_and_its_rerun_resumes(
    slurm, shared_toy, detach
):
    toy = shared_toy
    sweep = (SLURM, f"hydra.sweeper.slurm.detach={str(detach).lower()}", "hydra.sweeper.n_jobs=2")
    sweep += ("hydra.sweeper.n_trials=8", "hydra.sweeper.pruner=null", "checkpoint=true")
    sweep += ("epochs=6", "epoch_seconds=0.5")
    proc = toy.popen(*sweep, env=slurm.env)
    try:
        if detach:
            assert proc.wait(timeout=120) == 0, proc.stdout.read()
        deadline = time.monotonic() + 180
        while not completed(toy):
            assert time.monotonic() < deadline and proc.poll() in (None, 0)
            time.sleep(0.5)
        ok(toy.run(*sweep, "hydra.sweeper.cancel=true", env=slurm.env))
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in out, out[-4000:]
    deadline = time.monotonic() + 120
    while slurm.jobs():  # the tasks' workers stop at their next epoch and leave
        assert time.monotonic() < deadline, slurm.jobs()
        time.sleep(0.5)
    trials = toy.study().get_trials()
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    assert len([t for t in trials if t.state == TrialState.COMPLETE]) < 8
    assert [t for t in trials if "the sweep was cancelled" in keys.fail_reason(t)]
    (parent,) = toy.runs()[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.state"] == "cancelled"
    assert len(toy.client().search_model_versions("name='toy-model'")) == 1  # the end, once
    outs = [p.read_text() for p in (toy.sweep_dir / "slurm").glob("*.out")]
    ends = sum(text.count("model: toy-model version 1 ") for text in [out, *outs])
    assert ends == 1, [out, *outs]
    ok(toy.spawn(*[a for a in sweep if "detach" not in a], env=slurm.env))  # resumed, watched
    check_invariant(toy, n_trials=8, ends=2)


@pytest.mark.slow
def test_sigterm_on_the_watching_command_cancels_its_tasks_and_a_rerun_resumes(
    slurm, shared_toy, tmp_path
):
    toy = shared_toy
    marker = tmp_path / "paused"
    sweep = (SLURM, "hydra.sweeper.n_jobs=2", "hydra.sweeper.n_trials=4", "checkpoint=true")
    sweep += ("hydra.sweeper.pruner=null", "epochs=6", "epoch_seconds=0.3")
    proc = toy.popen(
        *sweep,
        env={
            **slurm.env,
            "SWEEP_PAUSE_AT": "epoch-reported:3",
            "SWEEP_PAUSE_FILE": str(marker),
            "SWEEP_FAULT_ROLE": "worker",
            "SWEEP_FAULT_ONCE": str(tmp_path / "once"),
        },
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        assert len(slurm.jobs()) == 2
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, out[-4000:]
    assert "Traceback" not in out and "Sweep interrupted (SIGTERM)" in out
    assert slurm.jobs() == []  # cancelled, and gone before the command exited
    trials = toy.study().get_trials()
    assert [t.number for t in trials if t.state == TrialState.RUNNING] == []
    assert [r.info.run_name for r in toy.all_runs() if r.info.status == "RUNNING"] == []
    ok(toy.spawn(*sweep, env=slurm.env))
    check_invariant(toy, n_trials=4)


# ---- refusals: one Error line, nothing created (no study, no run, no job) --------------------


def refused(toy, slurm_env, *overrides, env=None) -> str:
    proc = toy.run(SLURM, *overrides, env={**slurm_env, **(env or {})})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = error_lines(proc)
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in toy.path.iterdir()) == []
    return line


def test_no_sbatch_on_the_path_is_refused(tmp_path):
    toy = toy_app(tmp_path)
    line = refused(toy, {"SLURM_CONF": "/nowhere"}, env={"PATH": str(tmp_path / "bin")})
    assert "sbatch, which is not on the PATH" in line


def test_no_slurm_configuration_is_refused(tmp_path):
    if DEFAULT_CONF.exists():
        pytest.skip(f"{DEFAULT_CONF} exists on this machine")
    bin_ = tmp_path.parent / f"{tmp_path.name}-bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text("#!/bin/sh\nexit 1\n")  # on the PATH, never run
    (bin_ / "sbatch").chmod(0o755)
    toy = toy_app(tmp_path)
    line = refused(toy, {}, env={"PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_CONF": ""})
    assert f"{DEFAULT_CONF} does not exist" in line and "export SLURM_CONF=" in line


@pytest.mark.slow
@pytest.mark.parametrize("store", ["storage", "tracking"])
def test_a_store_on_this_machine_is_refused(slurm, postgres, tmp_path, store):
    toy = toy_app(tmp_path / "sweep")
    if store == "tracking":  # a shared storage, and the toy's sqlite tracking store
        toy.storage = create_database(postgres, f"optuna_{tmp_path.name}".lower()[:60])
    line = refused(toy, slurm.env)
    if store == "storage":
        assert "hydra.sweeper.storage=sqlite:///" in line and "use postgresql://" in line
        assert "or a journal file in a folder every node mounts" in line, line
    else:
        assert "hydra.sweeper.tracking_uri=sqlite:///" in line and "an mlflow server" in line
    assert slurm.jobs() == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, said",
    [
        (["hydra.sweeper.resources={cpu: 3}"], "a task needs 3 CPUs and 0 GPUs"),
        (["hydra.sweeper.resources={gpu: 3}"], "a task needs 1 CPUs and 3 GPUs"),
        (
            ["hydra.sweeper.slurm.partition=gpu"],
            "Slurm has no partition 'gpu'; its partitions: main",
        ),
        (["hydra.sweeper.slurm.time=soon"], "hydra.sweeper.slurm.time='soon' is not a Slurm time"),
        (
            ["hydra.sweeper.slurm.time=2", "hydra.sweeper.slurm.signal_lead=120"],
            "hydra.sweeper.slurm.time=2 (120 s) is not longer than "
            "hydra.sweeper.slurm.signal_lead=120 s",
        ),
        (["hydra.sweeper.slurm.signal_lead=0"], "a whole number from 1 to 65535"),
        (["+hydra.sweeper.slurm.options.nodes=2"], "sbatch refuses the workers' options ("),
    ],
)
def test_resources_the_partition_lacks_are_refused(slurm, postgres, tmp_path, overrides, said):
    toy = toy_app(tmp_path / "sweep")
    toy.storage = create_database(postgres, f"optuna_{tmp_path.name}".lower()[:60])
    toy.tracking_uri = create_database(postgres, f"mlflow_{tmp_path.name}".lower()[:60])
    line = refused(toy, slurm.env, *overrides)
    assert said in line, line
    if "CPUs" in said:
        assert "(the largest: 2 CPUs, 2 GPUs)" in line
    assert slurm.jobs() == []


def test_the_script_holds_the_settings_and_no_password(tmp_path):
    from mlflow_study_sweeper.backends.slurm import SlurmSettings, SlurmWorkers

    settings = SlurmSettings(
        partition="gpu", time="1:00:00", account="lab", qos="high",
        options={"constraint": "a100", "exclusive": ""}, setup=("module load cuda",),
    )  # fmt: skip
    workers = SlurmWorkers(
        3, 2, 0.5, settings, tmp_path / "slurm", Path("/work"), "big", lambda *a: (False, False)
    )
    argv = ["app.py", "-m", "hydra.sweeper.storage=postgresql://u:secret@db/optuna"]
    saved = list(sys.argv)
    sys.argv[:] = argv
    try:
        secrets = workers.write_script()
    finally:
        sys.argv[:] = saved
    script = workers.script.read_text()
    for line in (
        "#SBATCH --array=0-1", "#SBATCH --cpus-per-task=4", "#SBATCH --gres=gpu:1",
        "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --account=lab",
        "#SBATCH --qos=high", "#SBATCH --constraint=a100", "#SBATCH --exclusive",
        "module load cuda", "cd /work", "export SWEEP_WORKER=1 OMP_NUM_THREADS=2",
        "hydra.sweeper.n_jobs=1 hydra.sweeper.backend=local",
        # a requeue (preemption) runs it again; the time limit's warning, 300 s before it
        "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append",
        "export SWEEP_JOB_STOP_AT=$(( end - 300 ))",
    ):  # fmt: skip
        assert line in script, line
    assert 'sbatch --array="$SLURM' not in script  # the watching command replaces a task that left
    detached = SlurmWorkers(
        3, 2, 0.5, replace(settings, detach=True), tmp_path / "d", Path("/work"), "big",
        lambda *a: (False, False),
    )  # fmt: skip
    sys.argv[:] = argv
    try:
        detached.write_script()
    finally:
        sys.argv[:] = saved
    script = detached.script.read_text()
    assert "SWEEP_WORKER" not in script  # peers: the last to finish ends the sweep
    assert f'sbatch --array="$SLURM_ARRAY_TASK_ID" {tmp_path}/d/workers.sbatch' in script
    assert "secret" not in script and list(secrets.values()) == ["postgresql://u:secret@db/optuna"]


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800), ("2:30", 150), ("1:00:00", 3600), ("1-0", 86400), ("1-2:03", 93780),
        ("2-00:00:05", 172805), ("UNLIMITED", None), ("infinite", None),
    ],
)  # fmt: skip
def test_time_limits_are_read_as_sbatch_writes_them(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["soon", "1:2:3:4", "", "-5"])
def test_other_time_limits_are_not_read(text):
    with pytest.raises(ValueError):
        time_limit_seconds(text)
