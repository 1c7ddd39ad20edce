"""Benchmark on real MNIST: Lightning vs a hand-written loop, sweep overhead, 2-epoch val_acc.

    python -m benchmarks.bench_speed --data DIR [--repeats 7 --images N --overhead-trials 6]

DIR holds MNIST/raw/ in torchvision's layout: full MNIST (the data/ a sweep downloads into) or,
as for the README's numbers, an 8k/2k real-MNIST subset (the workspace's mnist_subset.py tool
writes one). Run it from the repository root.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from mlflow.tracking import MlflowClient

from benchmarks.common import (
    DATA_HELP,
    REPO,
    VAL_SIZE,
    data_folder,
    describe_data,
    machine,
    run_sweep,
    sync,
)
from mnist.data import TensorBatches, load_mnist
from mnist.model import MNISTClassifier
from mnist.train import build_trainer, pick_device

BATCH_SIZE = 64  # the app's default (conf/data/mnist.yaml)
RATIO_TARGET = 0.95  # Lightning's throughput against the hand-written loop's
OVERHEAD_TARGET_S = 1.0  # sweep time outside Trainer.fit per trial
VAL_ACC_TARGET = 0.96  # after a 2-epoch trial at the defaults

# the comparison is training alone: no validation loader, in either loop
warnings.filterwarnings("ignore", ".*validation_step.* but have no .val_dataloader")


def training_batches(
    data_root: Path, device: torch.device, images: int | None = None
) -> TensorBatches:
    """The app's shuffled training batches on `device`; the first `images` of them if given."""
    train = load_mnist(
        data_root, batch_size=BATCH_SIZE, val_size=VAL_SIZE, seed=0, device=device, download=False
    ).train
    if images and images < len(train.labels):
        train = TensorBatches(
            train.images[:images], train.labels[:images], BATCH_SIZE, shuffle=True, seed=0
        )
    return train


def hand_loop_seconds(batches: TensorBatches, device: torch.device) -> float:
    """One epoch of a hand-written training loop doing a trial's work, without a Trainer.

    The same work as the Lightning epoch: the module's training_step (forward, loss, the
    running sums behind acc/loss), its NaN check after each batch, the epoch's means at the end.
    Only the loop around them differs, so the ratio measures Lightning's loop.
    """
    torch.manual_seed(0)
    model = MNISTClassifier().to(device)
    optimizer = model.configure_optimizers()
    model.train()
    sync(device)
    start = time.perf_counter()
    model.on_train_epoch_start()
    for batch_idx, batch in enumerate(batches):
        optimizer.zero_grad()
        loss = model.training_step(batch, batch_idx)
        loss.backward()
        optimizer.step()
        model.on_train_batch_end(loss, batch, batch_idx)
    model.train_epoch_metrics()
    sync(device)
    return time.perf_counter() - start


def lightning_seconds(batches: TensorBatches, device: torch.device) -> float:
    """One epoch of Trainer.fit as a trial builds it (without its per-epoch callbacks)."""
    torch.manual_seed(0)
    model = MNISTClassifier()
    trainer = build_trainer(device, callbacks=[], verbose=False, max_epochs=1)
    sync(device)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=batches)  # training only, as in the hand loop
    sync(device)
    return time.perf_counter() - start


@dataclass
class SpeedResult:
    images: int  # per epoch
    hand_s: list[float]
    lightning_s: list[float]

    @property
    def ratios(self) -> list[float]:
        """Per run: Lightning's throughput over the hand loop's (epochs timed back to back)."""
        return [h / light for h, light in zip(self.hand_s, self.lightning_s, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def best_ratio(self) -> float:
        """The fastest hand epoch over the fastest Lightning epoch: other load only adds time."""
        return min(self.hand_s) / min(self.lightning_s)

    def rates(self) -> tuple[float, float]:
        """Median samples/s of the hand loop and of Lightning."""
        return (
            self.images / statistics.median(self.hand_s),
            self.images / statistics.median(self.lightning_s),
        )


def measure_speed(
    batches: TensorBatches,
    device: torch.device,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> SpeedResult:
    """`repeats` runs of one hand-loop epoch and one Lightning epoch, back to back.

    The order alternates from run to run, so a machine that slows down or speeds up over the
    measurement favours neither loop; each run's ratio compares two neighbouring epochs.
    """
    n = 20 * BATCH_SIZE
    warm = TensorBatches(batches.images[:n], batches.labels[:n], BATCH_SIZE)
    hand_loop_seconds(warm, device)  # first-call costs (kernels, allocator, Lightning's imports)
    lightning_seconds(warm, device)
    result = SpeedResult(len(batches.labels), [], [])
    for run in range(repeats):
        if run % 2 == 0:
            hand = hand_loop_seconds(batches, device)
            light = lightning_seconds(batches, device)
        else:
            light = lightning_seconds(batches, device)
            hand = hand_loop_seconds(batches, device)
        result.hand_s.append(hand)
        result.lightning_s.append(light)
        if progress:
            progress(
                f"run {run + 1}/{repeats}: hand loop {hand:.2f} s, Lightning {light:.2f} s, "
                f"ratio {hand / light:.3f}"
            )
    return result


def sweep_overheads(
    data_root: Path, work: Path, n_trials: int, batches: int = 20, *overrides: str
) -> tuple[float, list[float], list[float]]:
    """Run one sweep; return its wall time and, per trial, the time outside training and in it.

    A trial's overhead is the time from its start to the next trial's start, minus the seconds
    its job spent in Trainer.fit: the sweeper's ask/tell, composing the job config, opening the
    trial, creating and closing the MLflow run, the checkpoint artifact, the progress line.
    """
    wall = run_sweep(
        data_root,
        work,
        "overhead",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={batches}",
        "hydra.sweeper.pruner=null",  # every trial trains the same number of batches
        f"hydra.sweeper.n_trials={n_trials}",
        *overrides,
    )
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    storage = f"sqlite:///{work}/optuna.db"
    trials = optuna.load_study(study_name="overhead", storage=storage).get_trials()
    overheads, trains = [], []
    for trial, following in zip(trials, trials[1:], strict=False):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        train = run.data.metrics["train_seconds"]
        gap = (following.datetime_start - trial.datetime_start).total_seconds()
        overheads.append(gap - train)
        trains.append(train)
    return wall, overheads, trains


@contextmanager
def environment(**values: str):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def trial_val_acc(
    data_root: Path, work: Path, accelerator: str, epochs: int = 2, *overrides: str
) -> tuple[float, float, str]:
    """One run of the app at its defaults (mnist.train.run); val_acc, seconds, its values."""
    from hydra import compose, initialize_config_dir

    from mnist.config import register_configs
    from mnist.train import run

    register_configs()
    uri, name = f"sqlite:///{work}/mlflow.db", "accuracy"
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"data.root={data_root}",
                f"data.val_size={VAL_SIZE}",
                f"trainer.max_epochs={epochs}",
                f"trainer.accelerator={accelerator}",
                "trainer.verbose=false",
                f"mlflow.tracking_uri={uri}",
                f"mlflow.experiment_name={name}",
                *overrides,
            ],
        )
    # its artifacts (the checkpoint) go under work, not into ./mlruns of the current folder
    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=(work / "artifacts").as_uri())
    started = time.perf_counter()
    with environment(MLFLOW_TRACKING_URI=uri):  # a user's MLFLOW_TRACKING_URI would win in run()
        val_acc = run(cfg, start_dir=work)
    values = f"dropout={cfg.model.dropout} lr={cfg.model.lr}"
    return val_acc, time.perf_counter() - started, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help=DATA_HELP)
    parser.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="hand/Lightning epoch pairs; the ratio is their median",
    )
    parser.add_argument(
        "--images", type=int, default=0, help="time epochs of the first N training images (0: all)"
    )
    parser.add_argument("--overhead-trials", type=int, default=6)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    data_root = data_folder(args.data)
    device = pick_device(args.accelerator)
    print(f"device {device}, {machine()}; {describe_data(data_root)}")

    batches = training_batches(data_root, device, args.images)
    speed = measure_speed(batches, device, args.repeats, progress=print)
    hand_rate, light_rate = speed.rates()
    print(
        f"throughput over {speed.images} images per epoch: hand-written loop {hand_rate:.0f} "
        f"samples/s, Lightning trial {light_rate:.0f} samples/s (medians of {args.repeats} "
        f"epochs each); ratio {speed.ratio:.3f}, the median of the runs' "
        f"{', '.join(f'{r:.3f}' for r in speed.ratios)} (target >= {RATIO_TARGET}); fastest "
        f"epoch against fastest, {speed.best_ratio:.3f}"
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wall, overheads, _ = sweep_overheads(data_root, work, args.overhead_trials)
        print(
            f"sweep overhead per trial (time outside Trainer.fit, trials 0-{len(overheads) - 1} "
            f"of a {args.overhead_trials}-trial sweep): median {statistics.median(overheads):.2f}"
            f" s, max {max(overheads):.2f} s (target <= {OVERHEAD_TARGET_S:g} s); the whole "
            f"command took {wall:.1f} s"
        )
        val_acc, seconds, values = trial_val_acc(data_root, work, args.accelerator)
        print(
            f"2-epoch trial, {values}: val_acc={val_acc:.4f} on {VAL_SIZE} real validation "
            f"digits (expect >= {VAL_ACC_TARGET}), {seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
