"""backend=ray: workers as Ray actors, on a Ray instance the sweep starts, or on clusters faked on
this machine as Ray's own tests do (ray.cluster_utils.Cluster: real raylets, no GPU needed to
declare one). Sweeps run as processes of their own: each is a Ray driver."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from harness import APPS, check_invariant, clean_env, error_lines, ok, run_in_process, toy_app
from optuna.trial import TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.backends.local import Replacements, gpu_assignment

pytest.importorskip("ray")  # the [ray] extra, which the test extra installs
# ray.cluster_utils.Cluster.shutdown kills a fake node's processes without waiting for every
# one of them: their Popen objects, collected later, warn that they still ran
pytestmark = pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning")


@contextlib.contextmanager
def fake_cluster(head: dict, *nodes: dict):
    """A Ray cluster of real processes on this machine: the head, and more nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=head)
    handles = [cluster.add_node(**node) for node in nodes]
    cluster.wait_for_nodes()
    try:
        yield cluster, handles
    finally:
        cluster.shutdown()


def intervals(toy) -> list[tuple[float, float]]:
    return [
        (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        for t in toy.study().get_trials()
        if t.state == TrialState.COMPLETE
    ]


# ---- the local backend's GPUs, as a pure function --------------------------------------------


@pytest.mark.parametrize(
    "n, gpus, share, expected",
    [
        (3, [], None, [None, None, None]),  # no GPU: nothing set
        (4, ["0", "1"], None, ["0", "1", "0", "1"]),  # round robin
        (4, ["0", "1"], 0.5, ["0", "0", "1", "1"]),  # two per GPU, one GPU after another
        (4, ["3"], 0.25, ["3", "3", "3", "3"]),  # four on one
        (2, ["0", "1", "2", "3"], 2, ["0,1", "2,3"]),  # two whole GPUs each
        (2, ["0", "1"], 0, ["", ""]),  # none: hidden
    ],
)
def test_local_workers_get_their_gpus(n, gpus, share, expected):
    assert gpu_assignment(n, gpus, share) == expected


def test_a_killed_or_trained_worker_is_always_replaced_and_one_that_cannot_start_is_not(
    capsys,
):
    # (local processes and Ray actors alike; once a sweep replaced 3 per slot in all, and the
    # chaos soak's kills left it with one worker)
    policy = Replacements()

    def again(slot=1, trained=False, killed=False, work_left=True):
        return policy.replace(slot, work_left, trained, killed)

    assert all(again(killed=True) for _ in range(50))  # SIGKILL before it trained, 50 times
    assert all(again(trained=True) for _ in range(50))  # its trials took it down
    assert again() and again()  # exited with an error, untrained: twice
    assert again(trained=True)  # it trained: the count starts again
    assert [again(), again(), again()] == [True, True, False]
    assert "worker 1 exited with an error 3 times in a row" in capsys.readouterr().err
    assert again(slot=2)  # the other slots go on
    assert not again(slot=3, killed=True, work_left=False)  # nothing left to do


@pytest.mark.parametrize(
    "n, gpus, share, message",
    [
        (5, ["0"], 0.25, "need 2 GPUs; this machine shows 1"),
        (2, [], 0.5, "this machine shows none"),
        (3, ["0", "1"], 1, "must fit the 2 GPUs"),
        (1, ["0", "1"], 1.5, "a share below 1 or whole GPUs"),
    ],
)
def test_local_gpus_that_cannot_fit_are_refused(n, gpus, share, message):
    from mlflow_study_sweeper.errors import SweepConfigError

    with pytest.raises(SweepConfigError, match=message):
        gpu_assignment(n, gpus, share)


# ---- Ray ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_local_ray_instance_runs_two_workers_and_the_invariant_holds(tmp_path):
    toy = toy_app(tmp_path)
    proc = toy.spawn(
        "hydra.sweeper.backend=ray",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=6",
        "epoch_seconds=0.3",  # 3 epochs: long enough for both workers to take trials
    )
    ok(proc)
    check_invariant(toy, n_trials=6)
    assert proc.stdout.count(" runs on node ") == 2
    workers = {keys.worker(t) for t in toy.study().get_trials()}
    assert len(workers) == 2  # both actors' workers trained trials
    toy.close()


@pytest.mark.slow
def test_gpu_shares_pack_four_trials_on_one_declared_gpu(tmp_path):
    # one node that declares a GPU it does not have: Ray hands out shares of it all the same
    with fake_cluster({"num_cpus": 4, "num_gpus": 1}) as (cluster, _):
        toy = toy_app(tmp_path)
        proc = toy.spawn(
            f"hydra.sweeper.ray.address={cluster.address}",
            "hydra.sweeper.backend=ray",
            "hydra.sweeper.n_jobs=4",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.resources={cpu: 1, gpu: 0.25}",
            "hydra.sweeper.pruner=null",
            "epoch_seconds=1",
            "log_env=true",
        )
        ok(proc)
    check_invariant(toy, n_trials=4)
    assert proc.stdout.count("CUDA_VISIBLE_DEVICES=0") == 4  # each worker's placement line
    _, children = toy.runs()
    assert [r.data.tags["CUDA_VISIBLE_DEVICES"] for r in children] == ["0"] * 4
    spans = intervals(toy)
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all 4 at once
    toy.close()


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "journal", "tracking"])
def test_a_file_store_on_a_multi_node_cluster_is_refused_before_anything_exists(
    tmp_path, postgres, store
):
    settings = {
        "sqlite": [],  # the toy's own: sqlite:///optuna.db and mlflow.db
        "journal": [f"hydra.sweeper.storage={tmp_path}/optuna.journal"],
        "tracking": [f"hydra.sweeper.storage={postgres}/postgres"],  # a shared storage...
    }[store]  # ...and the toy's sqlite tracking store
    said = {
        "sqlite": "hydra.sweeper.storage=sqlite:///",
        "journal": "hydra.sweeper.storage=/",
        "tracking": "hydra.sweeper.tracking_uri=sqlite:///",
    }[store]
    with fake_cluster({"num_cpus": 1}, {"num_cpus": 1}) as (cluster, _):
        toy = toy_app(tmp_path)
        address = f"hydra.sweeper.ray.address={cluster.address}"
        proc = toy.spawn("hydra.sweeper.backend=ray", address, *settings)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (error,) = error_lines(proc)
        assert said in error and "the other 1 node(s)" in error and "Traceback" not in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_runtime_env_uploads_the_app_folder_to_the_workers(tmp_path):
    """The app is not installed on the nodes: Ray ships its folder (working_dir)."""
    for name in ("curve_app.py", "config.yaml", "publish.py"):
        shutil.copy(APPS / name, tmp_path / name)
    with fake_cluster({"num_cpus": 2}) as (cluster, _):
        toy = toy_app(tmp_path)
        argv = ["curve_app.py", *toy.argv(
            "hydra.sweeper.backend=ray",
            f"hydra.sweeper.ray.address={cluster.address}",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.ray.runtime_env={working_dir: ., excludes: [multirun, '*.db']}",
        )[1:]]  # fmt: skip
        env = clean_env()
        env["PYTHONPATH"] = env["PYTHONPATH"].replace(str(APPS), "")  # the hook from the copy
        proc = subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        ok(proc)
    check_invariant(toy)
    # each job ran in the workers' copy of the folder, which Ray made
    hydra_files = list((tmp_path / "multirun").glob("*/.hydra/hydra.yaml"))
    assert hydra_files
    for file in hydra_files:
        cwd = yaml.safe_load(file.read_text())["hydra"]["runtime"]["cwd"]
        assert "working_dir_files" in cwd and cwd != str(tmp_path), cwd
    toy.close()


@pytest.mark.slow
def test_resources_no_node_has_are_refused_before_anything_exists(tmp_path):
    toy = toy_app(tmp_path)
    proc = toy.spawn("hydra.sweeper.backend=ray", "hydra.sweeper.resources={cpu: 1, gpu: 2}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (error,) = error_lines(proc)
    assert "fits no node of the Ray cluster" in error and "0 GPUs" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ray_missing_is_one_line_that_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    toy = toy_app(tmp_path)
    proc = run_in_process(toy.argv("hydra.sweeper.backend=ray"), tmp_path, clean_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (error,) = error_lines(proc)
    assert "needs Ray, which is not installed" in error
    assert "pip install 'hydra-mlflow-study-sweeper[ray]'" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_killed_driver_leaves_no_worker_and_a_rerun_resumes(tmp_path):
    with fake_cluster({"num_cpus": 2}) as (cluster, _):
        toy = toy_app(tmp_path)
        args = (
            "hydra.sweeper.backend=ray",
            f"hydra.sweeper.ray.address={cluster.address}",
            "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.n_trials=4",
            "epoch_seconds=0.5",
        )
        driver = toy.popen(*args)
        workers = []
        deadline = time.monotonic() + 120
        while len(workers) < 2:  # "worker 0 runs on node ... its process: pid N)"
            line = driver.stdout.readline()
            assert line and time.monotonic() < deadline, "the workers never started"
            if " runs on node " in line:
                workers.append(int(line.rsplit("pid ", 1)[1].rstrip(")\n")))
        time.sleep(1.5)  # in the middle of their trials
        driver.kill()
        driver.communicate()
        deadline = time.monotonic() + 60  # Ray kills the actors of a dead driver, and they
        while any(alive(pid) for pid in workers):  # take their worker process with them
            assert time.monotonic() < deadline, [p for p in workers if alive(p)]
            time.sleep(0.5)
        ok(toy.spawn(*args))
    check_invariant(toy, n_trials=4)
    toy.close()


@pytest.mark.slow
def test_ray_stopped_under_a_sweep_is_one_line_and_a_rerun_resumes(tmp_path):
    toy = toy_app(tmp_path)
    args = ("hydra.sweeper.backend=ray", "hydra.sweeper.n_jobs=2")
    args += ("epochs=40", "epoch_seconds=0.25")
    driver = toy.popen(*args)
    deadline = time.monotonic() + 120
    for line in driver.stdout:
        assert time.monotonic() < deadline
        if "epoch 3/40" in line:  # the workers train (10 s a trial)
            break
    # this sweep's own Ray instance, killed (`ray stop` would stop every test's Ray as well)
    for pid in descendants(driver.pid):
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"gcs_server" in command or b"/raylet" in command:
                os.kill(pid, signal.SIGKILL)
    out, _ = driver.communicate(timeout=180)
    assert driver.returncode not in (0, None), out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "rerun the command to resume" in errors[0], out[-3000:]
    assert "Traceback" not in out
    ok(toy.spawn(*args))
    check_invariant(toy)
    toy.close()


def descendants(root: int) -> set[int]:
    parent_of = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as stat:
                parent_of[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
    found, grown = {root}, True
    while grown:
        below = {pid for pid, parent in parent_of.items() if parent in found} - found
        found |= below
        grown = bool(below)
    return found - {root}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:  # a zombie is gone
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True
