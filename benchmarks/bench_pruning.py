"""Pruning benchmark: the same seeded sweep without a pruner and with one, on real MNIST.

    python -m mnist.bench_pruning --data DIR [--trials 12 --epochs 6]

DIR holds MNIST/raw/ in torchvision's layout: the data/ a sweep downloads into, or (as for the
README's numbers) an 8k/2k real-MNIST subset written by the workspace's mnist_subset.py tool.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from mnist.bench import run_sweep


def pruned_sweep(data: Path, work: Path, pruner: str, trials: int, epochs: int) -> dict:
    name = f"prune-{pruner}"
    storage = f"sqlite:///{work}/optuna.db"
    wall = run_sweep(
        data,
        work,
        name,
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra/sweeper/pruner={pruner}",
    )
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
    parser.add_argument("--data", required=True, help="folder with MNIST/raw/")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pruners", default="none,median", help="the first is the baseline")
    args = parser.parse_args()
    pruners = args.pruners.split(",")
    data = Path(args.data).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        results = [pruned_sweep(data, Path(tmp), p, args.trials, args.epochs) for p in pruners]
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
