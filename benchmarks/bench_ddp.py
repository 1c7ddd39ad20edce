"""What a trial on two devices costs: the same sweep with trainer.devices=1 and with
trainer.devices=2 trainer.strategy=ddp (on CPU: two processes, gloo), trial by trial.

    python -m benchmarks.bench_ddp --data DIR [--trials 5 --epochs 1 --batches 2]

With few batches per epoch a trial's seconds are mostly its fixed cost: the difference of the
medians is what DDP adds to a trial (rank 1's start, its imports, the process group, the end's
wait for rank 1). DIR holds MNIST/raw/ (a real subset, or generated files). Run it from the
repository root.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import optuna

from benchmarks.common import DATA_HELP, data_folder, describe_data, run_sweep

LAYOUTS = {
    "1 device": ("trainer.devices=1",),
    "2 devices (ddp)": ("trainer.devices=2", "trainer.strategy=ddp"),
}


def trial_seconds(data: Path, work: Path, name: str, trials: int, epochs: int, batches: int,
                  layout: tuple[str, ...]) -> list[float]:  # fmt: skip
    run_sweep(
        data,
        work,
        name,
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={batches}",
        f"hydra.sweeper.n_trials={trials}",
        "hydra.sweeper.pruner=null",
        *layout,
    )
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{work}/optuna.db")
    return [(t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batches", type=int, default=2, help="training batches per epoch")
    args = parser.parse_args()
    data = data_folder(args.data)
    print(describe_data(data))
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, layout) in enumerate(LAYOUTS.items()):
            seconds = trial_seconds(
                data, Path(tmp), f"ddp{i}", args.trials, args.epochs, args.batches, layout
            )
            medians[label] = statistics.median(seconds)
            print(f"{label:>16}: trial seconds {', '.join(f'{s:.2f}' for s in seconds)}; "
                  f"median {medians[label]:.2f}")  # fmt: skip
    one, two = medians.values()
    print(f"a trial on 2 devices costs {two - one:+.2f} s more than on 1 (median)")


if __name__ == "__main__":
    main()
