"""Parallel benchmark: trials per hour, 1 worker x 2 threads against 2 workers x 1 thread.

python ../shared/tools/mnist_subset.py bench-data
python -m mnist.bench_parallel --data bench-data [--trials 6 --epochs 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sweep_wall(data: Path, work: Path, n_jobs: int, threads: int, trials: int, epochs: int):
    name = f"jobs{n_jobs}"
    command = [
        sys.executable,
        str(REPO / "sweep.py"),
        "-m",
        f"data.root={data}",
        "data.val_size=1000",
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={n_jobs}",
        "hydra.sweeper.pruner=null",  # the same work in both runs
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage=sqlite:///{work}/optuna.db",
        f"hydra.sweep.dir={work}/{name}",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"mlflow.experiment_name={name}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=work, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with MNIST/raw/ (mnist_subset.py)")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    data = Path(args.data).resolve()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        one = sweep_wall(data, Path(tmp), 1, cores, args.trials, args.epochs)
        two = sweep_wall(data, Path(tmp), 2, max(1, cores // 2), args.trials, args.epochs)
    print(f"{args.trials} trials x {args.epochs} epochs on {cores} cores, {data}")
    for label, wall in (
        (f"1 worker x {cores} threads", one),
        (f"2 workers x {cores // 2} thread", two),
    ):
        print(f"{label:<24} {wall:7.0f} s  {args.trials / wall * 3600:6.0f} trials/hour")
    print(f"speed-up {one / two:.2f}x (wall time includes each process's ~10 s of imports)")


if __name__ == "__main__":
    main()
