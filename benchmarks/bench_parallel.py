"""Parallel benchmark: trials per hour, 1 worker x 2 threads against 2 workers x 1 thread.

    python -m mnist.bench_parallel --data DIR [--trials 6 --epochs 2]

DIR holds MNIST/raw/ in torchvision's layout: the data/ a sweep downloads into, or (as for the
README's numbers) an 8k/2k real-MNIST subset written by the workspace's mnist_subset.py tool.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from mnist.bench import run_sweep


def sweep_wall(data: Path, work: Path, n_jobs: int, threads: int, trials: int, epochs: int):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return run_sweep(
        data,
        work,
        f"jobs{n_jobs}",
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={n_jobs}",
        "hydra.sweeper.pruner=null",  # the same work in both runs
        env=env,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with MNIST/raw/")
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
