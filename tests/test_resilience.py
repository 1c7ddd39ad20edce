"""A sweep that survives: crashes, Ctrl-C, failing and diverging trials, bad input, dead servers.

Each test runs the real sweep.py and reads both stores back; nothing may be left RUNNING.
"""

import re
import signal
import socket
import time

import pytest
import yaml
from fake_mnist import write_mnist
from mnist_sweep import SweepDir, assert_ok
from optuna.trial import TrialState

# no pruner: these tests count finished trials exactly
STEADY = ("hydra.sweeper.pruner=null", "trainer.max_epochs=4")


def paused_at(sweep, point: str, *overrides: str):
    """Start the sweep; return it once it waits at fault point `point` (see _faults.py)."""
    marker = sweep.path / "paused"
    proc = sweep.popen(*overrides, env={"SWEEP_PAUSE_AT": point, "SWEEP_PAUSE_FILE": str(marker)})
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"the sweep never reached {point}"
        time.sleep(0.2)
    return proc


def assert_nothing_running(sweep):
    assert [r.info.run_name for r in sweep.runs() if r.info.status == "RUNNING"] == []
    try:
        study = sweep.study()
    except KeyError:
        return
    assert [t.number for t in study.get_trials() if t.state == TrialState.RUNNING] == []


def check_resumed(sweep, interrupted: int, n_trials: int, child_status: str) -> None:
    study = sweep.study()
    trials = study.get_trials()
    assert trials[interrupted].state == TrialState.FAIL
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n_trials
    assert [t.number for t in trials] == list(range(len(trials)))  # numbering continued
    runs = sweep.runs()
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    by_id = {r.info.run_id: r for r in runs}
    lost = by_id[trials[interrupted].user_attrs["mlflow_run_id"]]
    assert lost.info.status == child_status
    assert lost.data.tags["optuna.state"] == "FAIL"
    assert all(
        r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id
        for r in runs
        if r not in parents
    )
    assert_nothing_running(sweep)
    # one job folder per trial number: the resumed sweep wrote new ones beside the old ones
    dirs = sorted(int(p.name.split("-")[1]) for p in sweep.sweep_dir.glob("trial-*"))
    assert dirs == [t.number for t in trials]
    # each job was handed its trial and run through hydra.job.env_set
    hydra_cfg = yaml.safe_load((sweep.sweep_dir / "trial-0" / ".hydra" / "hydra.yaml").read_text())
    env_set = hydra_cfg["hydra"]["job"]["env_set"]
    assert env_set["SWEEP_TRIAL_NUMBER"] == "0"
    assert env_set["MLFLOW_RUN_ID"] == trials[0].user_attrs["mlflow_run_id"]


# 4 epochs per trial: the 6th epoch report is trial 1's second epoch, in the middle of training
TRIAL_1_MID_TRAINING = "epoch-reported:6"


def test_killed_mid_trial_resumes(sweep):
    proc = sweep.spawn(
        "hydra.sweeper.n_trials=3", *STEADY, env={"SWEEP_CRASH_AT": TRIAL_1_MID_TRAINING}
    )
    assert proc.returncode == -signal.SIGKILL
    assert sweep.study().get_trials()[1].state == TrialState.RUNNING  # what a crash leaves

    resumed = sweep.run("hydra.sweeper.n_trials=3", *STEADY)
    assert_ok(resumed)
    assert "trial 1 is marked FAIL: its worker" in resumed.stderr + resumed.stdout
    check_resumed(sweep, interrupted=1, n_trials=3, child_status="FAILED")


@pytest.mark.parametrize(
    "sig, code, why",
    [
        pytest.param(signal.SIGINT, 130, "Ctrl-C", marks=pytest.mark.slow),
        (signal.SIGTERM, 143, "SIGTERM"),
    ],
)
def test_ctrl_c_or_sigterm_stops_cleanly_and_resumes(sweep, sig, code, why):
    proc = paused_at(sweep, TRIAL_1_MID_TRAINING, "hydra.sweeper.n_trials=3", *STEADY)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "Resume with the same command" in out
    study = sweep.study()
    assert study.get_trials()[1].state == TrialState.FAIL
    assert why in study.get_trials()[1].user_attrs["fail_reason"]
    (parent,) = [r for r in sweep.runs() if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.info.status == "KILLED"
    assert_nothing_running(sweep)

    resumed = sweep.run("hydra.sweeper.n_trials=3", *STEADY)
    assert_ok(resumed)
    check_resumed(sweep, interrupted=1, n_trials=3, child_status="KILLED")
    # a preempted trial is not lost: a new one with its parameters continues from its checkpoint
    (continued,) = [t for t in sweep.study().get_trials() if "continues_trial" in t.user_attrs]
    assert continued.user_attrs["continues_trial"] == 1
    assert continued.state == TrialState.COMPLETE
    assert continued.params == sweep.study().get_trials()[1].params


def test_an_interrupted_trial_continues_from_its_last_epoch_to_the_same_result(sweep):
    """Killed after its 2nd of 4 epochs, the trial continues: epochs 3-4 only, same values."""
    same = (
        "hydra.sweeper.n_trials=1",
        *STEADY,
        "trainer.deterministic=true",
        "trainer.accelerator=cpu",
        "hydra.sweeper.enqueue=[{model.dropout: 0.2, model.lr: 0.002}]",
    )
    # as processes of their own: the comparison below is to the last bit, same threads and all
    killed = sweep.spawn(*same, env={"SWEEP_CRASH_AT": "epoch-reported:2"})
    assert killed.returncode == -signal.SIGKILL
    (trial,) = sweep.study().get_trials()
    first_run = trial.user_attrs["mlflow_run_id"]
    assert trial.system_attrs["checkpoint_step"] == 1  # the state after the 2nd epoch
    client = sweep.client()
    saved = [f.path for f in client.list_artifacts(first_run, "resume")]
    assert saved == ["resume/epoch-1.ckpt"]  # the older one was dropped once this one was saved

    resumed = sweep.spawn(*same)
    assert_ok(resumed)
    assert "trial 0 was interrupted after epoch 2: a new trial" in resumed.stdout
    old, new = sweep.study().get_trials()
    assert old.state == TrialState.FAIL and new.state == TrialState.COMPLETE
    assert new.params == old.params and new.user_attrs["continues_trial"] == 0
    assert sorted(new.intermediate_values) == [0, 1, 2, 3]  # the pruner sees the whole curve
    run = client.get_run(new.user_attrs["mlflow_run_id"])
    assert run.data.tags["continues_run"] == first_run
    assert run.data.metrics["epochs_trained"] == 2  # only epochs 3 and 4 were trained
    for key in ("acc", "loss", "val_acc", "val_loss"):  # and the run carries the whole curve
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1, 2, 3], key
    # both runs' checkpoints are removed once the trial is finished (keep_checkpoints=false)
    assert client.list_artifacts(first_run, "resume") == []
    assert client.list_artifacts(run.info.run_id, "resume") == []

    # the same trial, never interrupted: the same result, to the last bit
    whole = SweepDir(sweep.path / "whole", sweep.mnist_root)
    whole.path.mkdir()
    assert_ok(whole.spawn(*same, "hydra.sweeper.keep_checkpoints=true"))
    (uninterrupted,) = whole.study().get_trials()
    reference = whole.client().get_run(uninterrupted.user_attrs["mlflow_run_id"])
    assert reference.data.metrics["epochs_trained"] == 4
    for key in ("acc", "loss", "val_acc", "val_loss"):
        assert run.data.metrics[key] == reference.data.metrics[key], key
    assert new.intermediate_values == uninterrupted.intermediate_values
    # keep_checkpoints=true keeps the last one, of the 4th epoch
    kept = whole.client().list_artifacts(reference.info.run_id, "resume")
    assert [f.path for f in kept] == ["resume/epoch-3.ckpt"]
    print(f"checkpoint of the width-1.0 CNN: {kept[0].file_size / 1e6:.1f} MB")


def test_failing_and_diverging_trials_do_not_stop_the_sweep(sweep, tmp_path):
    broken = tmp_path / "broken"
    write_mnist(broken)
    (broken / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    proc = sweep.run(
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.pruner=null",
        "trainer.max_epochs=2",
        # 1e6 makes the loss NaN within two steps; the broken folder makes reading fail
        "model.lr=choice(0.001, 1e6)",
        f"data.root=choice({sweep.mnist_root}, {broken})",
    )
    assert_ok(proc)
    trials = sweep.study().get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(finished) == 2 and failed
    runs = {r.info.run_id: r for r in sweep.runs()}
    client = sweep.client()
    reasons = set()
    for trial in failed:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FAILED"
        reason = run.data.tags["failure_reason"]
        reasons.add(reason.split(":")[0])
        if trial.params["model.lr"] == 1e6 and str(broken) not in trial.params["data.root"]:
            assert reason.startswith("NonFiniteLossError")
            # stopped at once: no epoch of NaNs was logged
            assert client.get_metric_history(run.info.run_id, "loss") == []
    assert reasons <= {"NonFiniteLossError", "MNISTCorruptError"}, reasons
    assert all(t.params["model.lr"] == 0.001 for t in finished)
    assert str(broken) not in {t.params["data.root"] for t in finished}
    assert_nothing_running(sweep)


def test_too_many_failures_stop_the_sweep_with_every_run_closed(sweep):
    proc = sweep.run(
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.25",  # one failure allowed
        "hydra.sweeper.pruner=null",
        "trainer.max_epochs=1",
        "model.lr=choice(1e6, 2e6)",  # every trial diverges
    )
    assert proc.returncode == 1
    assert "max_failure_rate=0.25" in proc.stderr and "failure_reason" in proc.stderr
    trials = sweep.study().get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL]
    (parent,) = [r for r in sweep.runs() if r.data.tags.get("sweep.role") == "sweep"]
    assert parent.info.status == "FAILED"
    assert_nothing_running(sweep)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dropuot=0.2", "Key 'dropuot' not in 'ModelConfig'"),
        ("model.lr=interval(1e-4", "interval(1e-4"),
        ("hydra.sweeper.params.model.lr=tag(log, intervl(1e-4, 1e-2))", "intervl"),
        (
            "hydra.sweeper.params.model.dropout=interval(0.2, 1.5)",
            "model.dropout=1.5 must be in [0, 1)",
        ),
        ("hydra.sweeper.params.model.lr=tag(log, interval(0, 0.1))", "model.lr"),
        ("hydra.sweeper.n_trials=0", "n_trials=0 must be a whole number from 1 to 1000000"),
        ("hydra.sweeper.n_trials=-3", "must be a whole number from 1"),
        ("hydra.sweeper.max_failure_rate=2", "max_failure_rate=2.0 must be in [0, 1]"),
        ("trainer.devices=2", "trainer.devices=2 needs trainer.strategy=ddp"),
        ("data.batch_size=10000", "data.batch_size=10000 is larger than the 500 training images"),
        ("data.val_size=600", "data.val_size=600 must be between 1 and 599"),
        ("hydra.sweeper.params.model.lrr=interval(0.1, 0.2)", "no key 'model.lrr'"),
    ],
)
def test_bad_input_fails_before_anything_is_created(sweep, override, message):
    proc = sweep.run(override)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (sweep.path / "optuna.db").exists()
    assert not (sweep.path / "mlflow.db").exists()


def test_missing_data_is_one_clear_error(sweep, tmp_path):
    empty = tmp_path / "empty"
    proc = sweep.run(f"data.root={empty}")
    if (empty / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip("this machine reached the internet and downloaded MNIST")
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert str(empty / "MNIST" / "raw") in error[0]
    assert "train-images-idx3-ubyte" in error[0] and "t10k-labels-idx1-ubyte" in error[0]
    # missing data is no corner's fault: the line names none (it once said "model.dropout=0.0")
    assert error[0].startswith("Error: MNIST is not in") and "reaches" not in error[0]
    assert not (sweep.path / "optuna.db").exists()
    assert not (sweep.path / "mlflow.db").exists()


def test_unreachable_tracking_server_fails_fast(sweep):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    started = time.monotonic()
    proc = sweep.run(f"mlflow.tracking_uri=http://127.0.0.1:{port}")
    assert time.monotonic() - started < 60  # imports included; the probe itself takes < 1 s
    assert proc.returncode == 2
    assert f"http://127.0.0.1:{port} does not answer" in proc.stderr
    assert not (sweep.path / "optuna.db").exists()


def test_rerunning_a_complete_study_explains_how_to_continue(sweep):
    assert_ok(sweep.run("hydra.sweeper.n_trials=2", "trainer.max_epochs=1"))
    runs_before = len(sweep.runs())
    again = sweep.run("hydra.sweeper.n_trials=2", "trainer.max_epochs=1")
    assert_ok(again)
    assert "already has 2 finished trials" in again.stdout
    assert "hydra.sweeper.n_trials" in again.stdout and "study_name" in again.stdout
    assert len(sweep.study().get_trials()) == 2
    assert len(sweep.runs()) == runs_before
    # and raising n_trials continues the same study under the same parent
    more = sweep.run("hydra.sweeper.n_trials=3", "trainer.max_epochs=1")
    assert_ok(more)
    assert len(sweep.study().get_trials()) == 3
    assert len([r for r in sweep.runs() if r.data.tags.get("sweep.role") == "sweep"]) == 1
    assert len([r for r in sweep.runs() if r.data.tags.get("best_run") == "true"]) == 1


def test_same_seed_same_trials_and_metrics(tmp_path, mnist_root):
    from mnist_sweep import SweepDir

    results = []
    for name in ("a", "b"):
        path = tmp_path / name
        path.mkdir()
        sweep = SweepDir(path, mnist_root)
        assert_ok(sweep.run("hydra.sweeper.n_trials=2", "trainer.max_epochs=2"))
        trials = sweep.study().get_trials()
        runs = {r.info.run_id: r for r in sweep.runs()}
        results.append(
            [
                (t.params, t.value, runs[t.user_attrs["mlflow_run_id"]].data.metrics["loss"])
                for t in trials
            ]
        )
    assert results[0] == results[1]
    assert re.search(r"\d", str(results[0]))


@pytest.mark.slow
def test_an_mlflow_server_away_while_the_cnn_trains_costs_no_trial_and_loses_nothing(
    sweep, stoppable_mlflow_server, tmp_path
):
    """Stopped after the first epoch, started once every trial has finished: the trials trained
    on, their metrics, checkpoints and weights reached the server afterwards, and the end ran."""
    server = stoppable_mlflow_server
    sweep.tracking_uri = server.url
    proc = sweep.popen(
        "hydra.sweeper.n_trials=3",
        *STEADY,
        env={"SWEEP_JOURNAL_DIR": str(tmp_path / "journal")},
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[trial 0] epoch 1/4"):
            server.stop()
        if "Waiting for the MLflow server" in line:
            break  # every trial finished while it was away; the end waits for it
    assert proc.poll() is None, "".join(lines)
    server.start()
    out = "".join(lines) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert "is unreachable" in out and "is back after" in out and "Traceback" not in out
    study = sweep.study()
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3
    client = sweep.client()
    for trial in study.get_trials():
        run_id = trial.user_attrs["mlflow_run_id"]
        assert len(client.get_metric_history(run_id, "val_acc")) == 4
        assert client.get_run(run_id).info.status == "FINISHED"
        # each trial's weights; its per-epoch checkpoints were tidied when it finished
        assert [f.path for f in client.list_artifacts(run_id, "checkpoint")] == [
            "checkpoint/model.pt"
        ]
        assert client.list_artifacts(run_id, "resume") == []
    assert_nothing_running(sweep)
    assert len(client.search_model_versions("name='mnist-cnn'")) == 1
