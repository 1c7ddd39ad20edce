"""The services a sweep depends on go away and come back: a PostgreSQL storage restarted (as a
crash or a failover does it, `pg_ctl -m immediate`), for less and for more than the limit; an
`mlflow server` stopped for longer than MLflow's own retries, and a sweep killed meanwhile.

Each test runs real sweeps as processes of their own against servers of its own, stopped at a
named moment (a line the sweep prints).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from harness import ToyApp, check_invariant, error_lines, toy_app
from optuna.trial import TrialState
from servers import create_database

# heartbeats every second, judged after 4: an outage of 30 s is many times the grace
FAST_HEARTBEATS = ("hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.heartbeat_grace=4")


class Output:
    """A process's merged output, read as it comes (a test waits for a line)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.text()}"
            time.sleep(0.1)

    def finish(self, timeout: float = 600) -> str:
        self.proc.wait(timeout=timeout)
        self.thread.join(timeout=10)
        self.proc.stdout.close()
        return self.text()

    def text(self) -> str:
        return "".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)


def sweep_on(tmp_path, server, name: str) -> ToyApp:
    return toy_app(tmp_path, storage=create_database(server.url, name))


def two_hosts(toy: ToyApp, *overrides: str) -> tuple[Output, Output]:
    """This machine's sweep and a worker that looks like another machine's (its trials are
    watched through heartbeats), both training before this returns."""
    args = (*FAST_HEARTBEATS, "epochs=8", "epoch_seconds=1", *overrides)
    here = Output(toy.popen(*args))
    here.wait_for("epoch 1/8")
    there = Output(toy.popen(*args, env={"SWEEP_HOST_ID": "host-b"}))
    there.wait_for("epoch 1/8")
    return here, there


def outage(server, seconds: float) -> float:
    """Crash the server, keep it down `seconds`, start it; returns how long it was down."""
    server.stop("immediate")
    down = time.monotonic()
    time.sleep(seconds)
    server.start()
    return time.monotonic() - down


def rides_it_out(toy: ToyApp, outputs: tuple[Output, Output], n_trials: int) -> None:
    for out in outputs:
        text = out.finish()
        assert out.proc.returncode == 0, text
        assert "Traceback" not in text, text
        # one line when the storage went, one when it came back
        assert out.count("The Optuna storage postgresql://") == 1, text
        assert out.count("is unreachable") == 1 and out.count("is back after") == 1, text
    check_invariant(toy, n_trials=n_trials)
    trials = toy.study().get_trials()
    # no trial failed for the outage: not its job, not its heartbeat, not the host that judged
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [(t.number, t.user_attrs.get("fail_reason")) for t in failed] == []
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == len(trials)


@pytest.mark.parametrize(
    "seconds",
    [pytest.param(30, marks=pytest.mark.slow), pytest.param(180, marks=pytest.mark.outage)],
    ids=["30 s", "3 min"],
)
def test_postgres_down_costs_the_wait_and_nothing_else(tmp_path, stoppable_postgres, seconds):
    toy = sweep_on(tmp_path, stoppable_postgres, f"outage{seconds}")
    try:
        outputs = two_hosts(toy, "hydra.sweeper.n_trials=4")
        down = outage(stoppable_postgres, seconds)
        print(f"PostgreSQL was down for {down:.0f} s while two hosts trained")
        rides_it_out(toy, outputs, n_trials=4)
    finally:
        toy.close()


@pytest.mark.slow
def test_postgres_down_past_the_limit_is_one_error_and_a_rerun_resumes(
    tmp_path, stoppable_postgres
):
    toy = sweep_on(tmp_path, stoppable_postgres, "outage_limit")
    try:
        args = ("hydra.sweeper.storage_outage_limit=8s", "epochs=8", "epoch_seconds=1")
        out = Output(toy.popen(*args))
        out.wait_for("epoch 2/8")
        stoppable_postgres.stop("immediate")
        text = out.finish(timeout=120)
        stoppable_postgres.start()
        assert out.proc.returncode == 1, text
        assert "Traceback" not in text, text
        errors = [line for line in text.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, text
        assert "unreachable for more than 8s (hydra.sweeper.storage_outage_limit)" in errors[0]
        assert "rerun the same command to resume" in errors[0]
        # nothing is left RUNNING in MLflow: the parent failed, the trial's run was killed
        runs = toy.all_runs()
        assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
        (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
        assert parent.data.tags["sweep.state"] == "storage_unreachable"
        rerun = toy.spawn(*args)
        assert rerun.returncode == 0 and error_lines(rerun) == [], rerun.stderr[-3000:]
        check_invariant(toy)
        # the trial in flight was failed by the rerun, its run closed as it: one FAIL, no more
        failed = [t for t in toy.study().get_trials() if t.state == TrialState.FAIL]
        assert [t.number for t in failed] == [0]
        assert "died while training" in failed[0].user_attrs["fail_reason"]
    finally:
        toy.close()


# ---- the retry policy and the storage's calls, without a sweep ----------------------------------
def closed_port_error() -> Exception:
    """What SQLAlchemy raises for a PostgreSQL server that is not there (a real refusal)."""
    import sqlalchemy
    from servers import free_port

    engine = sqlalchemy.create_engine(f"postgresql+psycopg://x@127.0.0.1:{free_port()}/x")
    try:
        engine.connect()
    except Exception as err:
        return err
    finally:
        engine.dispose()
    raise AssertionError("a closed port accepted a connection")


def test_a_refused_connection_is_waited_for_and_a_constraint_is_not(tmp_path):
    import sqlalchemy

    from mlflow_study_sweeper.storage.outages import unreachable

    assert unreachable(closed_port_error())
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/x.db")
    with engine.begin() as connection:
        connection.exec_driver_sql("create table t (k integer primary key)")
        connection.exec_driver_sql("insert into t values (1)")
    with pytest.raises(sqlalchemy.exc.IntegrityError) as info, engine.begin() as connection:
        connection.exec_driver_sql("insert into t values (1)")
    assert not unreachable(info.value)
    engine.dispose()


def test_the_limit_stops_every_later_call_with_one_message(capsys):
    from mlflow_study_sweeper.storage.outages import Outages, StorageUnreachable

    refused = closed_port_error()
    outages = Outages("postgresql://u:secret@db/x", limit_s=1.2)
    calls = []

    def down(retrying: bool) -> None:
        calls.append(retrying)
        raise refused

    with pytest.raises(StorageUnreachable) as info:
        outages.call(down)
    assert calls[0] is False and all(calls[1:]) and len(calls) >= 2
    message = str(info.value)
    assert "postgresql://u:***@db/x was unreachable for more than 1s" in message
    assert "secret" not in message and "rerun the same command to resume" in message
    # once given up, a call raises at once, without trying
    with pytest.raises(StorageUnreachable):
        outages.call(lambda retrying: calls.append("tried"))
    assert "tried" not in calls
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and "Connection refused" in err


def test_an_outage_then_an_answer_says_so_once_and_keeps_heartbeats_unjudged(capsys):
    from mlflow_study_sweeper.storage.outages import Outages

    refused = closed_port_error()
    outages = Outages("postgresql://db/x", limit_s=60)
    attempts = iter([refused, refused, None])

    def flaky(retrying: bool) -> str:
        err = next(attempts)
        if err is not None:
            raise err
        return "answered"

    assert outages.call(flaky) == "answered"
    err = capsys.readouterr().err
    assert err.count("is unreachable") == 1 and err.count("is back after") == 1
    assert not outages.calm(grace_s=60)  # silence is not judged within the grace after it
    assert outages.calm(grace_s=0)


def lost_answers(fn):
    """A call policy whose first attempt is applied, then its answer lost with the connection:
    the attempt runs again, told that it is retrying (what a dropped commit does)."""
    fn(False)
    return fn(True)


def test_writes_whose_answer_was_lost_are_not_counted_twice_nor_refused(tmp_path):
    import optuna

    from mlflow_study_sweeper.storage import optuna_internals as internals

    url = f"sqlite:///{tmp_path}/optuna.db"
    # a lost create_new_study reads as "it exists" on the retry: the sweep then loads it, and
    # finds no creator's parent run to wait for (tests/test_lifecycle.py's kills cover that)
    optuna.create_study(study_name="s", storage=url)
    storage = internals.RetryingRDBStorage(url, lost_answers)
    study = optuna.load_study(study_name="s", storage=storage)
    # the claim of the end: inserted by the lost attempt, found ours by the retry
    assert internals.insert_once(study, "claim", {"pid": 1}) is True
    assert internals.insert_once(study, "claim", {"pid": 2}) is False  # another's: refused
    assert internals.replace_if(study, "claim", {"pid": 1}, {"pid": 3}) is True
    assert internals.replace_if(study, "claim", {"pid": 1}, {"pid": 4}) is False
    # through Optuna's cache in front of the storage, which calls its private methods: a lost
    # creation leaves a trial that no worker labels (the sweep fails it after the grace, "created
    # but never started"); a lost param is found there by the retry, not inserted twice
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    lost, asked = study.get_trials()
    assert trial.number == asked.number == 1 and lost.params == {}
    assert asked.params == {"x": trial.params["x"]}
    # told COMPLETE by the lost attempt; the retry finds it finished as asked
    assert internals.set_trial_state(study, internals.trial_id(trial), TrialState.COMPLETE)
    assert study.get_trials()[1].state == TrialState.COMPLETE
    internals.close(study)


# ---- the tracking server ------------------------------------------------------------------------
def tracked_by(toy: ToyApp, server, journal) -> ToyApp:
    toy.tracking_uri = server.url
    toy.defaults += ["log_curve=true"]  # the jobs log a curve and a file per epoch themselves
    toy.journal_env = {"SWEEP_JOURNAL_DIR": str(journal)}
    return toy


def nothing_lost(toy: ToyApp, n_trials: int, epochs: int) -> None:
    """The invariant, and every trial's own logging on its run: the curve, the files."""
    check_invariant(toy, n_trials=n_trials)
    client = toy.client()
    runs = {r.info.run_id: r for r in toy.all_runs()}
    for trial in toy.study().get_trials():
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id is None:  # its worker was killed between asking for it and starting its run
            assert trial.state == TrialState.FAIL, trial.number
            continue
        assert not run_id.startswith("offline"), trial.number  # the study has the real ids
        if trial.state != TrialState.COMPLETE:
            continue
        run = runs[run_id]
        assert run.data.metrics["value"] == trial.value
        curve = client.get_metric_history(run_id, "curve")
        assert sorted(m.step for m in curve) == list(range(epochs)), trial.number
        files = [f.path for f in client.list_artifacts(run_id, "curve")]
        assert files == [f"curve/epoch-{e}.txt" for e in range(epochs)], trial.number


@pytest.mark.outage
def test_a_tracking_server_down_for_5_min_costs_no_trial_and_loses_nothing(
    tmp_path, stoppable_mlflow_server
):
    """Longer than MLflow's own retries (about 4 min): trials complete while it is away, and
    the end waits for it."""
    server = stoppable_mlflow_server
    toy = tracked_by(toy_app(tmp_path / "sweep"), server, tmp_path / "journal")
    out = Output(
        toy.popen("hydra.sweeper.n_trials=5", "epochs=3", "epoch_seconds=1", env=toy.journal_env)
    )
    out.wait_for("[trial 0] epoch 2/3")
    server.stop()
    down = time.monotonic()
    out.wait_for("5/5 finished", timeout=240)  # every trial completes while it is away
    assert time.monotonic() - down < 300
    out.wait_for("Waiting for the MLflow server")
    time.sleep(max(0.0, 300 - (time.monotonic() - down)))
    assert out.proc.poll() is None, out.text()  # the end is waiting, not failed
    server.start()
    print(f"the tracking server was down for {time.monotonic() - down:.0f} s")
    text = out.finish()
    assert out.proc.returncode == 0, text
    assert "Traceback" not in text and "Retrying (Retry" not in text, text
    assert out.count("is unreachable") == 1 and out.count("is back after") == 1, text
    assert out.count("Waiting for the MLflow server") == 1, text
    try:
        nothing_lost(toy, n_trials=5, epochs=3)
    finally:
        toy.close()


@pytest.mark.slow
def test_a_kill_during_a_tracking_outage_then_a_rerun_loses_nothing(
    tmp_path, stoppable_mlflow_server
):
    server = stoppable_mlflow_server
    journal = tmp_path / "journal"
    toy = tracked_by(toy_app(tmp_path / "sweep"), server, journal)
    args = ("hydra.sweeper.n_trials=4", "epochs=3", "epoch_seconds=1")
    out = Output(toy.popen(*args, env=toy.journal_env))
    out.wait_for("[trial 0] epoch 1/3")
    server.stop()
    out.wait_for("2/4 finished", timeout=120)  # two trials ended while it was away ...
    out.wait_for("[trial 2] epoch 2/3")  # ... and a third is half-way
    out.proc.kill()
    out.finish()
    kept = [p for p in journal.rglob("*.jsonl") if p.name != "runs.jsonl"]
    assert kept and all(p.stat().st_size for p in kept)  # on disk, where the rerun finds it
    server.start()
    rerun = toy.spawn(*args, env=toy.journal_env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    assert "writes that an earlier process" in rerun.stderr  # sent first
    assert [p for p in journal.rglob("*.jsonl") if p.name != "runs.jsonl"] == []
    try:
        nothing_lost(toy, n_trials=4, epochs=3)
        # the killed trial: failed by the rerun, its run (created offline) closed as it
        failed = [t for t in toy.study().get_trials() if t.state == TrialState.FAIL]
        assert [t.number for t in failed] == [2]
        run = toy.client().get_run(failed[0].user_attrs["mlflow_run_id"])
        assert run.info.status in ("FAILED", "KILLED") and run.data.tags["optuna.state"] == "FAIL"
    finally:
        toy.close()


@pytest.mark.slow
def test_a_worker_started_during_a_tracking_outage_waits_for_it_then_trains(
    tmp_path, stoppable_mlflow_server
):
    """Chaos found it: a replacement worker that started while the server was away died on its
    first read (the experiment), and could have taken the parent run it could not read for a
    deleted one."""
    from chaos import children

    from mlflow_study_sweeper import keys

    server = stoppable_mlflow_server
    toy = tracked_by(toy_app(tmp_path / "sweep"), server, tmp_path / "journal")
    args = ("hydra.sweeper.n_trials=12", "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner=none")
    args += ("epochs=3", "epoch_seconds=1")
    out = Output(toy.popen(*args, env=toy.journal_env))
    out.wait_for("epoch 1/3")
    deadline = time.monotonic() + 60
    while not (workers := children(out.proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    (first,) = workers
    server.stop()
    time.sleep(2)
    os.kill(first, signal.SIGKILL)  # its replacement starts while the server is away
    out.wait_for(f"worker pid {first} died")
    time.sleep(10)
    server.start()
    text = out.finish()
    assert out.proc.returncode == 0, text
    assert "Traceback" not in text and "not started again" not in text, text
    try:
        nothing_lost(toy, n_trials=12, epochs=3)  # one parent run among them
        pids = {keys.worker(t)[1] for t in toy.study().get_trials()}
        assert len(pids - {str(out.proc.pid), str(first)}) == 1, pids  # the replacement trained
    finally:
        toy.close()


# after each of the end's writes to the tracking server, in order, and just before the process
# exits (the last three come after the last write: nothing is left to keep)
END_POINTS = [
    "end-tagged",
    "end-published",
    "end-registered",
    "end-aliased",
    "end-reported",
    "end-parent-closed",
    "end-claimed",
    "before-exit",
]
WRITES_AFTER = END_POINTS[: END_POINTS.index("end-parent-closed")]


def paused_at(toy: ToyApp, point: str, pause) -> Output:
    """A 2-trial sweep, paused at `point` of its end (the test then stops the server)."""
    env = {**toy.journal_env, "SWEEP_PAUSE_AT": point, "SWEEP_PAUSE_FILE": str(pause)}
    out = Output(toy.popen("hydra.sweeper.n_trials=2", "epochs=2", env=env))
    deadline = time.monotonic() + 120
    while not pause.exists() and time.monotonic() < deadline:
        assert out.proc.poll() is None, out.text()
        time.sleep(0.2)
    assert pause.exists(), out.text()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", END_POINTS)
def test_a_tracking_server_that_goes_away_during_the_end_is_waited_for(
    tmp_path, stoppable_mlflow_server, point
):
    """The server stops after each of the end's writes: the command does not exit 0 until the
    server holds the invariant. Chaos found two holes here: an outage during the end crashed it
    with a traceback (a search the relay cannot answer), and one after the end's last steps
    were made let the command exit 0 with the parent's final writes kept (the parent RUNNING)."""
    server = stoppable_mlflow_server
    toy = tracked_by(toy_app(tmp_path / "sweep"), server, tmp_path / "journal")
    pause = tmp_path / "paused"
    out = paused_at(toy, point, pause)
    server.stop()
    pause.unlink()  # the end goes on, and finds the server away
    deadline = time.monotonic() + 8
    while out.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    exited_while_away = out.proc.poll()
    server.start()
    text = out.finish()
    assert out.proc.returncode == 0, text
    assert "Traceback" not in text, text
    if point in WRITES_AFTER:  # writes were left to make: it waited for the server
        assert exited_while_away is None, text
        waited = out.count("waiting for it to end the sweep") + out.count(
            "Waiting for the MLflow server"
        )
        assert waited == 1, text
    try:
        nothing_lost(toy, n_trials=2, epochs=2)  # the end done once: one version, one best
        assert [p for p in (tmp_path / "journal").rglob("*.jsonl") if p.name != "runs.jsonl"] == []
    finally:
        toy.close()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["Ctrl-C", "time budget"])
def test_a_sweep_that_gives_up_on_its_last_writes_says_where_they_are_and_a_rerun_sends_them(
    tmp_path, stoppable_mlflow_server, how
):
    """The end's last writes are kept (the server went away before them) and the wait for them
    stops: one Error line, exit 1, the writes on disk; the rerun delivers them and the sweep is
    whole."""
    server = stoppable_mlflow_server
    toy = tracked_by(toy_app(tmp_path / "sweep"), server, tmp_path / "journal")
    if how == "time budget":
        toy.defaults += ["hydra.sweeper.timeout=40s"]
    pause = tmp_path / "paused"
    out = paused_at(toy, "end-reported", pause)
    server.stop()
    pause.unlink()
    out.wait_for("Waiting for the MLflow server", timeout=120)
    if how == "Ctrl-C":
        out.proc.send_signal(signal.SIGINT)
    text = out.finish(timeout=120)
    assert out.proc.returncode == 1, text
    assert "Traceback" not in text, text
    errors = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, text
    assert "the sweep ended, and its last" in errors[0] and "are still kept in" in errors[0]
    assert "any sweep command on this machine" in errors[0]
    assert "the next sweep to it from this machine sends them" not in text  # said once
    kept = [p for p in (tmp_path / "journal").rglob("*.jsonl") if p.name != "runs.jsonl"]
    assert kept and all(p.stat().st_size for p in kept)
    server.start()
    rerun = toy.spawn("hydra.sweeper.n_trials=2", "epochs=2", env=toy.journal_env)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "writes that an earlier process" in rerun.stderr  # sent first
    try:
        nothing_lost(toy, n_trials=2, epochs=2)
        assert [p for p in (tmp_path / "journal").rglob("*.jsonl") if p.name != "runs.jsonl"] == []
    finally:
        toy.close()


@pytest.mark.slow
def test_a_run_delivered_before_its_trial_records_it_gets_its_real_id_on_the_trial(
    tmp_path, stoppable_mlflow_server
):
    """The soak found it (seed 3): a trial's run was created while the server was away, and the
    relay delivered it (and told the study its real id) before the loop had recorded the run on
    the trial, which then kept the provisional id for ever."""
    server = stoppable_mlflow_server
    toy = tracked_by(toy_app(tmp_path / "sweep"), server, tmp_path / "journal")
    pause = tmp_path / "paused"
    env = {**toy.journal_env, "SWEEP_PAUSE_AT": "run-created:2", "SWEEP_PAUSE_FILE": str(pause)}
    args = ("hydra.sweeper.n_trials=2", "hydra.sweeper.pruner=none", "epochs=3", "epoch_seconds=1")
    out = Output(toy.popen(*args, env=env))
    out.wait_for("[trial 0] epoch 1/3")
    server.stop()  # trial 1's run is created while the server is away: a provisional id
    deadline = time.monotonic() + 120
    while not pause.exists() and time.monotonic() < deadline:
        assert out.proc.poll() is None, out.text()
        time.sleep(0.2)
    assert pause.exists(), out.text()
    server.start()
    mapped = list((tmp_path / "journal").rglob("runs.jsonl"))
    deadline = time.monotonic() + 120  # the relay delivers it while the loop waits to record it
    while time.monotonic() < deadline and not any(p.read_text().strip() for p in mapped):
        time.sleep(0.5)
        mapped = list((tmp_path / "journal").rglob("runs.jsonl"))
    assert any(p.read_text().strip() for p in mapped), out.text()  # delivered, mapped
    pause.unlink()
    text = out.finish()
    assert out.proc.returncode == 0, text
    try:
        nothing_lost(toy, n_trials=2, epochs=3)  # every trial names its run's real id
    finally:
        toy.close()
