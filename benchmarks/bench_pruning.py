"""Pruning benchmark: the same seeded sweep without a pruner and with one, on real MNIST.

    python -m benchmarks.bench_pruning --data DIR [--trials 12 --epochs 6 --pruners none,median]

DIR holds MNIST/raw/ in torchvision's layout: full MNIST (the data/ a sweep downloads into) or,
as for the README's numbers, an 8k/2k real-MNIST subset (the workspace's mnist_subset.py tool
writes one). Run it from the repository root. --batches N trains N batches per epoch
(trainer.limit_train_batches) instead of full epochs, for a quicker run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from benchmarks.common import DATA_HELP, data_folder, describe_data, limit_batches, run_sweep

SAVED_TARGET = 0.40  # at least this share fewer epochs than without a pruner
BEST_WITHIN_PP = 0.5  # best val_acc within this many percentage points of the baseline's


def pruned_sweep(
    data: Path, work: Path, pruner: str, trials: int, epochs: int, *overrides: str
) -> dict:
    """One sweep with `pruner` (a name from hydra.sweeper.pruner's list); what it trained."""
    name = f"prune-{pruner}"
    storage = f"sqlite:///{work}/optuna.db"
    wall = run_sweep(
        data,
        work,
        name,
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.pruner={pruner}",
        *overrides,
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


def compare_pruners(
    data: Path, pruners: list[str], trials: int, epochs: int, *overrides: str
) -> list[dict]:
    """The same seeded sweep once per pruner; the first is the baseline."""
    with tempfile.TemporaryDirectory() as tmp:
        return [pruned_sweep(data, Path(tmp), p, trials, epochs, *overrides) for p in pruners]


def saved_share(results: list[dict], which: int = -1) -> float:
    return 1 - results[which]["epochs"] / results[0]["epochs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument(
        "--batches", type=int, default=0, help="training batches per epoch (0: full epochs)"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pruners", default="none,median", help="the first is the baseline")
    args = parser.parse_args()
    data = data_folder(args.data)
    results = compare_pruners(
        data, args.pruners.split(","), args.trials, args.epochs, *limit_batches(args.batches)
    )
    base = results[0]
    print(f"{args.trials} trials, up to {args.epochs} epochs, TPE seed 42; {describe_data(data)}")
    print(f"{'pruner':<20}{'epochs':>8}{'saved':>8}{'pruned':>8}{'wall s':>9}{'best val_acc':>14}")
    for i, r in enumerate(results):
        print(
            f"{r['pruner']:<20}{r['epochs']:>8}{saved_share(results, i):>8.0%}{r['pruned']:>8}"
            f"{r['wall_s']:>9.0f}{r['best']:>14.4f}  ({(r['best'] - base['best']) * 100:+.2f} pp)"
        )
    print(
        f"target: >= {SAVED_TARGET:.0%} fewer epochs, best val_acc within {BEST_WITHIN_PP} pp "
        f"of the baseline"
    )


if __name__ == "__main__":
    main()
