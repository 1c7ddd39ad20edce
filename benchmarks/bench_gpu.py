"""Trials per GPU-hour of the MNIST sweep with 1, 2 and 4 trials sharing one GPU.

    python -m benchmarks.bench_gpu --data DIR [--trials 8 --epochs 2 --backend local]

For a machine with a GPU (it refuses to run without one): the same sweep, n_jobs workers with
hydra.sweeper.resources.gpu=1/n_jobs, so 1, 2 or 4 trials train on GPU 0 at once. The rate is
the finished trials over the trial phase (first trial's start to last trial's end, from the
study), so imports and the end are left out; the wall time of each sweep is printed too. With
--backend ray the workers are actors of a Ray instance started for each sweep. Sized to run
in about 5 minutes on one recent GPU with the 8k/2k real-MNIST subset (mnist_subset.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna

from benchmarks.common import DATA_HELP, data_folder, describe_data, run_sweep

SHARES = (1, 2, 4)  # trials per GPU


def gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    return out.splitlines()[0] if out else None


def trials_per_gpu_hour(work: Path, name: str) -> tuple[float, int]:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work}/optuna.db")
    done = [t for t in study.get_trials() if t.datetime_complete and t.state.is_finished()]
    first = min(t.datetime_start.timestamp() for t in done)
    last = max(t.datetime_complete.timestamp() for t in done)
    return len(done) / (last - first) * 3600, len(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    args = parser.parse_args()
    data = data_folder(args.data)
    gpu = gpu_name()
    if gpu is None:
        raise SystemExit("no GPU here (nvidia-smi lists none): this benchmark needs one")
    print(f"{gpu}; {describe_data(data)}; {args.trials} trials x {args.epochs} epochs each")
    print(f"{'trials per GPU':>15} {'trials/GPU-hour':>16} {'wall s':>8}")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["CUDA_VISIBLE_DEVICES"] = "0"  # one GPU, shared
    for share in SHARES:
        with tempfile.TemporaryDirectory() as tmp:
            work, name = Path(tmp), f"share{share}"
            wall = run_sweep(
                data,
                work,
                name,
                f"hydra.sweeper.n_trials={args.trials}",
                f"hydra.sweeper.n_jobs={share}",
                f"hydra.sweeper.resources={{gpu: {1 / share}}}",
                f"hydra.sweeper.backend={args.backend}",
                "hydra.sweeper.pruner=null",  # the same work whatever the share
                f"trainer.max_epochs={args.epochs}",
                "trainer.accelerator=gpu",
                env=env,
            )
            rate, done = trials_per_gpu_hour(work, name)
        print(f"{share:>15} {rate:>16.0f} {wall:>8.0f}   ({done} trials)")


if __name__ == "__main__":
    main()
