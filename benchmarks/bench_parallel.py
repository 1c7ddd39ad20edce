"""Parallel benchmark: trials per hour, 1 worker x all cores' threads against 2 workers x half.

    python -m benchmarks.bench_parallel --data DIR [--trials 6 --epochs 2 --batches 0]

DIR holds MNIST/raw/ in torchvision's layout: full MNIST (the data/ a sweep downloads into) or,
as for the README's numbers, an 8k/2k real-MNIST subset (the workspace's mnist_subset.py tool
writes one). Run it from the repository root.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.common import DATA_HELP, data_folder, describe_data, limit_batches, run_sweep


def sweep_wall(
    data: Path, work: Path, n_jobs: int, threads: int, trials: int, epochs: int, *overrides: str
) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return run_sweep(
        data,
        work,
        f"jobs{n_jobs}",
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.n_jobs={n_jobs}",
        "hydra.sweeper.pruner=null",  # the same work in both runs
        *overrides,
        env=env,
    )


def compare_workers(data: Path, trials: int, epochs: int, *overrides: str) -> dict:
    """Wall seconds of the same sweep with 1 worker x all cores and 2 workers x half each."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // 2)
    with tempfile.TemporaryDirectory() as tmp:
        one = sweep_wall(data, Path(tmp), 1, cores, trials, epochs, *overrides)
        two = sweep_wall(data, Path(tmp), 2, threads, trials, epochs, *overrides)
    return {"cores": cores, "threads": threads, "one_s": one, "two_s": two}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument(
        "--batches", type=int, default=0, help="training batches per epoch (0: full epochs)"
    )
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    data = data_folder(args.data)
    r = compare_workers(data, args.trials, args.epochs, *limit_batches(args.batches))
    print(
        f"{args.trials} trials x {args.epochs} epochs on {r['cores']} cores; {describe_data(data)}"
    )
    for label, wall in (
        (f"1 worker x {r['cores']} threads", r["one_s"]),
        (f"2 workers x {r['threads']} threads", r["two_s"]),
    ):
        print(f"{label:<24} {wall:7.0f} s  {args.trials / wall * 3600:6.0f} trials/hour")
    print(
        f"speed-up {r['one_s'] / r['two_s']:.2f}x (wall time includes each sweep's start: "
        f"~10 s of imports, and the publish step at its end)"
    )


if __name__ == "__main__":
    main()
