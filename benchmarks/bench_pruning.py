"""Pruning benchmark: the same seeded sweep without a pruner and with one, on real MNIST.

    python -m benchmarks.bench_pruning --data DIR [--trials 12 --epochs 6 --pruners none,median]
    python -m benchmarks.bench_pruning --data DIR --pareto [--trials 16 --epochs 5]

DIR holds MNIST/raw/ in torchvision's layout: full MNIST (the data/ a sweep downloads into) or,
as for the README's numbers, an 8k/2k real-MNIST subset (the workspace's mnist_subset.py tool
writes one). Run it from the repository root. --batches N trains N batches per epoch
(trainer.limit_train_batches) instead of full epochs, for a quicker run.

--pareto runs the multi-objective preset (sweep=pareto: val_acc against n_params, searching
dropout, lr and model.width) without a pruner and with the median pruner, and prints both
fronts: the epochs saved, and how the front found with pruning differs from the one without
(its members, and the hypervolume: the share of [0, 1] x [0, n_params of width 1.0] the front
dominates, higher is better).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna
from mlflow_study_sweeper.keys import curve
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


def pareto_sweep(data: Path, work: Path, pruner: str, trials: int, epochs: int, *overrides) -> dict:
    """The multi-objective preset with `pruner`: what it trained, and its Pareto front."""
    name = f"pareto-{pruner}"
    wall = run_sweep(
        data,
        work,
        name,
        "sweep=pareto",
        f"trainer.max_epochs={epochs}",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.pruner={pruner}",
        *overrides,
    )
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work}/optuna.db")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    # the sweeper keeps a multi-objective trial's per-epoch values itself (see _objectives.py)
    epochs = sum(len(curve(t)) for t in finished)
    front = sorted(
        (
            {
                "width": t.params["model.width"],
                "dropout": t.params["model.dropout"],
                "lr": t.params["model.lr"],
                "val_acc": t.values[0],
                "n_params": int(t.values[1]),
            }
            for t in study.best_trials  # Optuna's Pareto front of the complete trials
        ),
        key=lambda r: r["n_params"],
    )
    return {
        "pruner": pruner,
        "epochs": epochs,
        "wall_s": wall,
        "pruned": sum(t.state == TrialState.PRUNED for t in finished),
        "front": front,
        "hypervolume": hypervolume(front),
    }


FULL_WIDTH_PARAMS = 1_379_557  # the given CNN (model.width=1.0): the reference point's cost


def hypervolume(front: list[dict]) -> float:
    """Share of [0, 1] val_acc x [0, FULL_WIDTH_PARAMS] parameters that the front dominates."""
    area, points = 0.0, sorted(front, key=lambda r: r["n_params"])
    for point, following in zip(points, [*points[1:], None], strict=True):
        upto = following["n_params"] if following else FULL_WIDTH_PARAMS
        area += point["val_acc"] * max(upto - point["n_params"], 0)
    return area / FULL_WIDTH_PARAMS


def compare_pareto(data: Path, trials: int, epochs: int, *overrides: str) -> list[dict]:
    """The multi-objective preset without a pruner, then with the median pruner."""
    with tempfile.TemporaryDirectory() as tmp:
        return [
            pareto_sweep(data, Path(tmp), p, trials, epochs, *overrides) for p in ("none", "median")
        ]


def same_members(a: dict, b: dict) -> int:
    """Front members (by parameters) that both fronts share."""
    key = lambda r: (r["width"], r["dropout"], r["lr"])  # noqa: E731
    return len({key(r) for r in a["front"]} & {key(r) for r in b["front"]})


def print_pareto(results: list[dict]) -> None:
    none, median = results
    saved = saved_share(results)
    head = ("epochs", 8), ("saved", 8), ("pruned", 8), ("wall s", 9), ("front", 7)
    print(f"{'pruner':<8}" + "".join(f"{h:>{w}}" for h, w in head) + f"{'hypervolume':>13}")
    for r in results:
        print(
            f"{r['pruner']:<8}{r['epochs']:>8}{1 - r['epochs'] / none['epochs']:>8.0%}"
            f"{r['pruned']:>8}{r['wall_s']:>9.0f}{len(r['front']):>7}{r['hypervolume']:>13.4f}"
        )
    print(f"fronts share {same_members(none, median)} member(s); median saved {saved:.0%} epochs")
    for r in results:
        print(f"front with pruner {r['pruner']}:")
        print(f"  {'width':>6} {'dropout':>8} {'lr':>9} {'val_acc':>8} {'n_params':>9}")
        for p in r["front"]:
            print(
                f"  {p['width']:>6.3f} {p['dropout']:>8.3f} {p['lr']:>9.2e} {p['val_acc']:>8.4f} "
                f"{p['n_params']:>9}"
            )


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
    parser.add_argument("--pareto", action="store_true", help="the multi-objective preset")
    args = parser.parse_args()
    data = data_folder(args.data)
    if args.pareto:
        results = compare_pareto(data, args.trials, args.epochs, *limit_batches(args.batches))
        print(
            f"sweep=pareto, {args.trials} trials, up to {args.epochs} epochs; {describe_data(data)}"
        )
        print_pareto(results)
        return
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
