"""Pruning benchmark: the same seeded sweep without a pruner and with one, on real MNIST.

python ../shared/tools/mnist_subset.py bench-data
python -m mnist.bench_pruning --data bench-data [--trials 12 --epochs 6 --pruners none,hyperband]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent


def run_sweep(data: Path, work: Path, pruner: str, trials: int, epochs: int) -> dict:
    name = f"prune-{pruner}"
    storage = f"sqlite:///{work}/optuna.db"
    command = [
        sys.executable,
        str(REPO / "sweep.py"),
        "-m",
        f"data.root={data}",
        "data.val_size=1000",
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra/sweeper/pruner={pruner}",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={work}/{name}",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"mlflow.experiment_name={name}",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=work)
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=name, storage=storage)
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return {
        "pruner": pruner,
        "epochs": sum(len(t.intermediate_values) for t in finished),
        "wall_s": wall,
        "best": study.best_value,
        "pruned": sum(t.state == TrialState.PRUNED for t in finished),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with MNIST/raw/ (mnist_subset.py)")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pruners", default="none,median", help="the first is the baseline")
    args = parser.parse_args()
    pruners = args.pruners.split(",")
    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_sweep(data, Path(tmp), p, args.trials, args.epochs) for p in pruners]
    base = results[0]
    print(f"{args.trials} trials, up to {args.epochs} epochs, TPE seed 42, {data}")
    print(f"{'pruner':<20}{'epochs':>8}{'saved':>8}{'pruned':>8}{'wall s':>9}{'best val_acc':>14}")
    for r in results:
        saved = 1 - r["epochs"] / base["epochs"]
        print(
            f"{r['pruner']:<20}{r['epochs']:>8}{saved:>8.0%}{r['pruned']:>8}{r['wall_s']:>9.0f}"
            f"{r['best']:>14.4f}  ({(r['best'] - base['best']) * 100:+.2f} pp)"
        )
    print("target: >= 40% fewer epochs, best val_acc within 0.5 pp of the baseline")


if __name__ == "__main__":
    main()
