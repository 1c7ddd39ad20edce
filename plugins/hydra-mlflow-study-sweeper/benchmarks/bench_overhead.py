"""What the sweeper costs per trial beyond the task, against the least code that does the same.

    python benchmarks/bench_overhead.py [--trials 60,1000] [--rounds 3] [--starts 5] [--no-counts]

The task is the README's sphere app (x**2 + y**2: microseconds), with the random sampler and
SQLite stores, so a trial's time is all orchestration. The least code that does the same work
is, per trial: ask, a child MLflow run under a parent with two params and the metric, tell
(`LEAST_CODE` below). For each size in `--trials`, both run as fresh processes on fresh stores,
interleaved (which goes first alternates), `--rounds` times; a trial's cost is the median gap
between consecutive trials' starts (as Optuna records them) after the first five, and beside it
the mean gap from the sixth trial's start to the last one's. Then, per size, one sweep of ours
and one of the least code run with counters on MLflow's client, on Optuna's storage, on the
databases' commits, on the garbage collector and (ours) on Hydra's job runner: where the time
goes. And the time from start to exit of a one-trial sweep in a new folder, the README's first
run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

APP = """
import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> float:
    return cfg.x**2 + cfg.y**2


if __name__ == "__main__":
    main()
"""
CONFIG = """
defaults:
  - _self_
  - override hydra/sweeper: mlflow_study

x: 0.0
y: 0.0

hydra:
  sweeper:
    direction: minimize
    study_name: toy
    n_trials: 10
    seed: 0
    params:
      x: interval(-5.5, 5.5)
      y: interval(-5.5, 5.5)
"""
LEAST_CODE = """
import sys

import optuna
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

n, folder = int(sys.argv[1]), sys.argv[2]
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.create_study(
    study_name="least", storage=f"sqlite:///{folder}/optuna.db",
    sampler=optuna.samplers.RandomSampler(seed=0),
)
client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
experiment = client.create_experiment("least")
parent = client.create_run(experiment, run_name="sweep").info.run_id
space = {
    "x": optuna.distributions.FloatDistribution(-5.5, 5.5),
    "y": optuna.distributions.FloatDistribution(-5.5, 5.5),
}
for _ in range(n):
    trial = study.ask(space)
    run = client.create_run(
        experiment, run_name=f"trial-{trial.number}", tags={MLFLOW_PARENT_RUN_ID: parent}
    ).info.run_id
    client.log_batch(run, params=[Param(k, repr(v)) for k, v in trial.params.items()])
    value = trial.params["x"] ** 2 + trial.params["y"] ** 2
    client.log_metric(run, "value", value)
    client.set_terminated(run)
    study.tell(trial, value)
client.set_terminated(parent)
"""
# one sweep with counters, ours or the least code's: MLflow client calls and Optuna storage calls
# (each a round trip to the database) and the time spent in them (outermost calls only), the
# transactions committed per database (each a sync of its SQLite file), the garbage collector's
# time, and (ours) the time of a trial's job beyond its task
COUNTED = """
import atexit, collections, gc, json, os, runpy, sys, threading, time

import optuna.storages
import sqlalchemy
from mlflow.tracking import MlflowClient

calls = collections.Counter()
seconds = collections.Counter()
# what Optuna's cache in front of an RDBStorage calls instead of the public methods
ROUND_TRIPS = ("_create_new_trial", "_set_trial_param", "_get_trials", "_get_best_trial_id")
depth = threading.local()


def counted(cls, prefix):
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") and name not in ROUND_TRIPS or not callable(fn):
            continue

        def wrap(fn=fn, key=f"{prefix}.{name}"):
            def inner(*args, **kwargs):
                calls[key] += 1
                outer = not getattr(depth, prefix, 0)
                setattr(depth, prefix, getattr(depth, prefix, 0) + 1)
                started = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(depth, prefix, getattr(depth, prefix) - 1)
                    if outer:
                        seconds[prefix] += time.perf_counter() - started
            return inner

        setattr(cls, name, wrap())


counted(MlflowClient, "mlflow")
counted(optuna.storages.RDBStorage, "optuna")


@sqlalchemy.event.listens_for(sqlalchemy.engine.Engine, "commit")
def commit(conn):
    # a transaction that wrote (the driver began it before the first change) syncs the file
    wrote = getattr(conn.connection.dbapi_connection, "in_transaction", True)
    name = str(conn.engine.url.database).rsplit("/", 1)[-1]
    calls[f"commit.{name} {'writes' if wrote else 'reads'}"] += 1


gc_started = [0.0]


def on_gc(phase, info):
    if phase == "start":
        gc_started[0] = time.perf_counter()
    else:
        seconds["gc"] += time.perf_counter() - gc_started[0]
        calls["gc.passes"] += 1


gc.callbacks.append(on_gc)


def timed(cls, name, key):
    fn = getattr(cls, name)

    def inner(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - started

    setattr(cls, name, inner)


try:  # ours: a trial's job, whole (its config made, Hydra's per-job output, the task), and the task
    from mlflow_study_sweeper.trial import launch
except ImportError:
    launch = None
if launch is not None and "least" not in sys.argv[1]:
    timed(launch.InProcessJobs, "run", "job")
    made = launch.InProcessJobs.__init__

    def init(self, hydra_context, task_function, *args, **kwargs):
        def task(cfg):
            started = time.perf_counter()
            try:
                return task_function(cfg)
            finally:
                seconds["task"] += time.perf_counter() - started

        made(self, hydra_context, task, *args, **kwargs)

    launch.InProcessJobs.__init__ = init
# counted from the sixth trial's ask to the last one's, as the mean gap between trials' starts
# (a trial asked for, by study.ask or otherwise, is a Trial made for a new trial id)
N, window, seen = int(os.environ["BENCH_TRIALS"]), {}, set()
made_trial = optuna.trial.Trial.__init__


def asked(self, study, trial_id):
    if trial_id not in seen:
        seen.add(trial_id)
        calls["asks"] += 1
        if calls["asks"] in (6, N):
            seconds["wall"] = time.perf_counter()
            window[calls["asks"]] = (calls.copy(), seconds.copy())
    made_trial(self, study, trial_id)


optuna.trial.Trial.__init__ = asked


def report():
    (calls_6, seconds_6), (calls_n, seconds_n) = window[6], window[N]
    counts = {"calls": calls_n - calls_6, "seconds": seconds_n - seconds_6}
    print("COUNTS " + json.dumps(counts))


atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def trial_starts(storage: str, study_name: str) -> list[float]:
    import optuna

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    return [t.datetime_start.timestamp() for t in trials]


def per_trial_seconds(storage: str, study_name: str) -> float:
    """The median gap between consecutive trials' starts, after the first five."""
    starts = trial_starts(storage, study_name)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)][5:]
    return statistics.median(gaps)


def mean_trial_seconds(storage: str, study_name: str) -> float:
    """From the sixth trial's start to the last one's, per trial: the slow ones count too."""
    starts = trial_starts(storage, study_name)[5:]
    return (starts[-1] - starts[0]) / (len(starts) - 1)


def run(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=clean_env())
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_"))}
    return env | {"PYTHONUNBUFFERED": "1"}


def sweep_args(n: int, study: str) -> list[str]:
    return [
        sys.executable, "app.py", "-m", f"hydra.sweeper.n_trials={n}",
        "hydra.sweeper.sampler=random", f"hydra.sweeper.study_name={study}",
    ]  # fmt: skip


def app_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "app.py").write_text(APP)
    (folder / "config.yaml").write_text(CONFIG)
    return folder


def ours(root: Path, name: str, n: int) -> tuple[float, float]:
    """(median, mean) seconds per trial of one sweep of ours, a fresh process on fresh stores."""
    folder = app_folder(root / name)
    run(sweep_args(n, "toy"), folder)
    url = f"sqlite:///{folder}/optuna.db"
    return per_trial_seconds(url, "toy"), mean_trial_seconds(url, "toy")


def least(root: Path, name: str, n: int) -> tuple[float, float]:
    """(median, mean) seconds per trial of the least code, a fresh process on fresh stores."""
    folder = root / name
    folder.mkdir()
    run([sys.executable, str(root / "least.py"), str(n), str(folder)], folder)
    url = f"sqlite:///{folder}/optuna.db"
    return per_trial_seconds(url, "least"), mean_trial_seconds(url, "least")


def counted(root: Path, name: str, n: int, argv: list[str], folder: Path) -> dict[str, Any]:
    argv = [sys.executable, str(root / "counted.py"), *argv]
    env = clean_env() | {"BENCH_TRIALS": str(n)}
    proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("COUNTS ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{name} with counters failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return json.loads(line.removeprefix("COUNTS "))


def where_the_time_goes(root: Path, n: int) -> None:
    """One sweep of ours and one of the least code, with counters: calls and seconds per trial,
    from the sixth trial's ask to the last one's."""
    if n < 7:
        return
    folder = app_folder(root / f"counted-ours-{n}")
    mine = counted(root, "ours", n, sweep_args(n, "toy")[1:], folder)
    folder = root / f"counted-least-{n}"
    folder.mkdir()
    theirs = counted(root, "least", n, [str(root / "least.py"), str(n), str(folder)], folder)
    k = n - 6
    print(f"where a trial's time goes, {n} trials (from the 6th ask to the last), per trial:")
    for who, counts in (("ours", mine), ("least", theirs)):
        spent = {key: value / k * 1000 for key, value in counts["seconds"].items()}
        job = spent.get("job", 0.0) - spent.get("task", 0.0)
        rest = spent["wall"] - spent.get("mlflow", 0) - spent.get("optuna", 0) - job
        print(
            f"  {who:5s} {spent['wall']:5.1f} ms: MLflow calls {spent.get('mlflow', 0):5.1f}, "
            f"Optuna storage {spent.get('optuna', 0):5.1f}, the job beyond its task {job:4.1f}, "
            f"the rest {rest:5.1f} (of which gc {spent.get('gc', 0):4.1f})"
        )
    for prefix in ("mlflow", "optuna", "commit", "gc"):
        for who, counts in (("ours", mine), ("least", theirs)):
            items = {k: v for k, v in counts["calls"].items() if k.startswith(prefix + ".")}
            total = sum(items.values()) / k
            top = sorted(items.items(), key=lambda kv: -kv[1])[:9]
            shown = ", ".join(f"{key.split('.', 1)[1]} {v / k:.2f}" for key, v in top)
            print(f"  {prefix:6s} {who:5s} {total:5.2f}: {shown}")
    print("  (mlflow: MlflowClient calls; optuna: RDBStorage calls, each a round trip; commit:")
    print("  transactions committed per database file; the job: its config, folder, .hydra/")
    print("  files and log, logging set up and back)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trials", default="60,1000", help="sweep sizes, comma-separated (default: 60,1000)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=5, help="1-trial sweeps timed")
    parser.add_argument("--no-counts", action="store_true", help="skip where the time goes")
    args = parser.parse_args()
    sizes = [int(n) for n in args.trials.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "least.py").write_text(textwrap.dedent(LEAST_CODE))
        (root / "counted.py").write_text(textwrap.dedent(COUNTED))
        results: dict[int, dict[str, list[tuple[float, float]]]] = {
            n: {"ours": [], "least": []} for n in sizes
        }
        for r in range(args.rounds):  # interleaved: the machine's load hits both alike
            for n in sizes:
                # which goes first alternates, so that a drift in the load favours neither
                pair = [("ours", ours), ("least", least)]
                for who, measure in pair if r % 2 == 0 else pair[::-1]:
                    results[n][who].append(measure(root, f"{who}-{n}-{r}", n))
        print(f"per trial, median of {args.rounds} rounds (sphere app, random sampler, SQLite):")
        print("  (each round: the median gap between trials' starts after the first five, and")
        print("  the mean gap from the sixth trial's start to the last one's)")
        for n in sizes:
            a = statistics.median(m for m, _ in results[n]["ours"])
            b = statistics.median(m for m, _ in results[n]["least"])
            a_mean = statistics.median(m for _, m in results[n]["ours"])
            b_mean = statistics.median(m for _, m in results[n]["least"])
            print(f"  {n} trials:")
            print(
                f"    this sweeper  median {a * 1000:6.1f} ms  mean {a_mean * 1000:6.1f} ms"
                f"   (rounds: {fmt(results[n]['ours'])})"
            )
            print(
                f"    least code    median {b * 1000:6.1f} ms  mean {b_mean * 1000:6.1f} ms"
                f"   (rounds: {fmt(results[n]['least'])})"
            )
            print(f"    ratio         median {a / b:6.2f}x     mean {a_mean / b_mean:6.2f}x")
            # each round's two sweeps ran back to back: their ratio is the least hit by a load
            # that comes and goes
            pairs = zip(results[n]["ours"], results[n]["least"], strict=True)
            paired = [x[0] / y[0] for x, y in pairs]
            shown = ", ".join(f"{r:.2f}" for r in paired)
            print(f"    ratio within each round: median {statistics.median(paired):.2f}x ({shown})")
        sys.stdout.flush()

        if not args.no_counts:
            for n in sizes:
                where_the_time_goes(root, n)
                sys.stdout.flush()

        starts = [
            run(sweep_args(1, "toy"), app_folder(root / f"new-{i}")) for i in range(args.starts)
        ]
        median = statistics.median(starts)
        print(f"a 1-trial sweep in a new folder, start to exit: median {median:.2f} s")
        print(f"  (runs: {', '.join(f'{s:.2f}' for s in starts)})")


def fmt(values: list[tuple[float, float]]) -> str:
    return ", ".join(f"{m * 1000:.1f}/{mean * 1000:.1f}" for m, mean in values)


if __name__ == "__main__":
    main()
