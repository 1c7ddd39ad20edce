"""What the sweeper costs per trial beyond the task, against the least code that does the same.

    python benchmarks/bench_overhead.py [--trials 60] [--rounds 3]

The task is the README's sphere app (x**2 + y**2: microseconds), with the random sampler and
SQLite stores, so a trial's time is all orchestration. The least code that does the same work
is, per trial: ask, a child MLflow run under a parent with two params and the metric, tell
(`LEAST_CODE` below). Both run as fresh processes on fresh stores, interleaved, `--rounds`
times; a trial's cost is the median gap between consecutive trials' starts (as Optuna records
them), after the first five. Then one sweep of ours runs with counters on MLflow's store, on
Optuna's storage and on Hydra's job runner: where the time goes. And the time from start to
exit of a one-trial sweep in a new folder, the README's first run.
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
# one sweep of ours with counters: MLflow client calls, Optuna storage calls (each a round trip to
# the database), the time of a trial's job beyond its task
COUNTED = """
import atexit, collections, json, runpy, sys, time

import optuna.storages
from mlflow.tracking import MlflowClient

calls = collections.Counter()
seconds = collections.Counter()


def counted(cls, prefix):
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not callable(fn):
            continue

        def wrap(fn=fn, key=f"{prefix}.{name}"):
            def inner(*args, **kwargs):
                calls[key] += 1
                return fn(*args, **kwargs)
            return inner

        setattr(cls, name, wrap())


counted(MlflowClient, "mlflow")
counted(optuna.storages.RDBStorage, "optuna")


def timed(cls, name, key):
    fn = getattr(cls, name)

    def inner(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[key] += time.perf_counter() - started

    setattr(cls, name, inner)


# a trial's job, whole (its config made, Hydra's per-job output, the task), and the task alone
from mlflow_study_sweeper.trial import launch

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
atexit.register(lambda: print("COUNTS " + json.dumps({"calls": calls, "seconds": seconds})))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def per_trial_seconds(storage: str, study_name: str) -> float:
    """The median gap between consecutive trials' starts, after the first five."""
    import optuna

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    starts = [t.datetime_start.timestamp() for t in trials]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)][5:]
    return statistics.median(gaps)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "least.py").write_text(textwrap.dedent(LEAST_CODE))
        (root / "counted.py").write_text(textwrap.dedent(COUNTED))
        ours, least = [], []
        for r in range(args.rounds):  # interleaved: the machine's load hits both alike
            folder = root / f"ours-{r}"
            folder.mkdir()
            (folder / "app.py").write_text(APP)
            (folder / "config.yaml").write_text(CONFIG)
            run(sweep_args(args.trials, "toy"), folder)
            ours.append(per_trial_seconds(f"sqlite:///{folder}/optuna.db", "toy"))
            folder = root / f"least-{r}"
            folder.mkdir()
            run([sys.executable, str(root / "least.py"), str(args.trials), str(folder)], folder)
            least.append(per_trial_seconds(f"sqlite:///{folder}/optuna.db", "least"))
        a, b = statistics.median(ours), statistics.median(least)
        print(f"per trial, median of {args.rounds} rounds x {args.trials} trials (sphere app):")
        print(f"  this sweeper       {a * 1000:6.1f} ms   (rounds: {fmt(ours)})")
        print(f"  least code         {b * 1000:6.1f} ms   (rounds: {fmt(least)})")
        print(f"  ratio              {a / b:6.2f}x")

        folder = root / "counted"
        folder.mkdir()
        (folder / "app.py").write_text(APP)
        (folder / "config.yaml").write_text(CONFIG)
        argv = [sys.executable, str(root / "counted.py"), *sweep_args(args.trials, "toy")[1:]]
        proc = subprocess.run(argv, cwd=folder, capture_output=True, text=True, env=clean_env())
        line = next(x for x in proc.stdout.splitlines() if x.startswith("COUNTS "))
        counts = json.loads(line.removeprefix("COUNTS "))
        print(f"where a sweep of {args.trials} trials goes (whole command, calls per trial):")
        for prefix in ("mlflow", "optuna"):
            items = {k: v for k, v in counts["calls"].items() if k.startswith(prefix)}
            total = sum(items.values()) / args.trials
            top = sorted(items.items(), key=lambda kv: -kv[1])[:8]
            shown = ", ".join(f"{k.split('.', 1)[1]} {v / args.trials:.2f}" for k, v in top)
            print(f"  {prefix:7s} {total:5.2f} calls: {shown}")
        job = (counts["seconds"]["job"] - counts["seconds"]["task"]) / args.trials
        print(f"  hydra   {job * 1000:5.1f} ms per trial running the job beyond the task")
        print("          (its config, folder, .hydra/ files and log, logging set up and back)")

        starts = []
        for i in range(5):
            folder = root / f"new-{i}"
            folder.mkdir()
            (folder / "app.py").write_text(APP)
            (folder / "config.yaml").write_text(CONFIG)
            starts.append(run(sweep_args(1, "toy"), folder))
        median = statistics.median(starts)
        print(f"a 1-trial sweep in a new folder, start to exit: median {median:.2f} s")
        print(f"  (runs: {', '.join(f'{s:.2f}' for s in starts)})")


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.1f}" for v in values)


if __name__ == "__main__":
    main()
