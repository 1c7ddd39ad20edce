"""Benchmark on real MNIST: Lightning vs a hand-written loop, sweep overhead, 2-epoch val_acc.

    python -m mnist.bench --data DIR

DIR holds MNIST/raw/ in torchvision's layout: the data/ a sweep downloads into, or (as for the
README's numbers) an 8k/2k real-MNIST subset written by the workspace's mnist_subset.py tool.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from torch.nn import functional as F

from mnist.data import load_mnist
from mnist.model import MNISTClassifier
from mnist.train import build_trainer, pick_device

REPO = Path(__file__).resolve().parent.parent


def hand_loop_seconds(data, device: torch.device) -> float:
    torch.manual_seed(0)
    model = MNISTClassifier().to(device)
    optimizer = model.configure_optimizers()
    model.train()
    sync(device)
    start = time.perf_counter()
    for x, y in data.train:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - start


def lightning_seconds(data, device: torch.device) -> float:
    torch.manual_seed(0)
    model = MNISTClassifier()
    trainer = build_trainer(device, callbacks=[], verbose=False, max_epochs=1)
    sync(device)
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=data.train)  # training only, as in the hand loop
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_sweep(data_root: Path, work: Path, name: str, *overrides: str, env=None) -> float:
    """Run `sweep.py -m` on real MNIST with its stores in `work`; return its wall seconds."""
    command = [
        sys.executable,
        str(REPO / "sweep.py"),
        "-m",
        f"data.root={data_root}",
        "data.val_size=1000",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage=sqlite:///{work}/optuna.db",
        f"hydra.sweep.dir={work}/{name}",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"mlflow.experiment_name={name}",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=work, env=env)
    return time.perf_counter() - start


def sweep_overheads(data_root: Path, work: Path, n_trials: int) -> tuple[float, list[float]]:
    """Run one sweep; return its wall time and, per trial, the time spent outside training.

    A trial's overhead is the time from its start to the next trial's start, minus the seconds
    its job spent in Trainer.fit: the sweeper's ask/tell, composing the job config, opening the
    trial, creating and closing the MLflow run, the checkpoint artifact, the progress line.
    """
    wall = run_sweep(
        data_root,
        work,
        "overhead",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=20",
        "hydra.sweeper.pruner=null",  # every trial trains the same number of batches
        f"hydra.sweeper.n_trials={n_trials}",
    )
    uri, storage = f"sqlite:///{work}/mlflow.db", f"sqlite:///{work}/optuna.db"
    client = MlflowClient(uri)
    trials = optuna.load_study(study_name="overhead", storage=storage).get_trials()
    overheads = []
    for trial, following in zip(trials, trials[1:], strict=False):
        train = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics["train_seconds"]
        gap = (following.datetime_start - trial.datetime_start).total_seconds()
        overheads.append(gap - train)
    return wall, overheads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with MNIST/raw/")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()
    device = pick_device(args.accelerator)
    data = load_mnist(args.data, batch_size=64, val_size=1000, seed=0, device=device)
    n = len(data.train.labels)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {n} training images")

    # the comparison is training alone: no validation loader, as in the hand-written loop
    warnings.filterwarnings("ignore", ".*validation_step.* but have no .val_dataloader")
    lightning_seconds(data, device)  # warm-up: first-call costs (kernels, allocator)
    hand, light = [], []
    for _ in range(args.repeats):
        hand.append(hand_loop_seconds(data, device))
        light.append(lightning_seconds(data, device))
    hand_rate, light_rate = n / statistics.median(hand), n / statistics.median(light)
    print(
        f"throughput (median of {args.repeats} epochs): hand-written loop {hand_rate:.0f} "
        f"samples/s, Lightning trial {light_rate:.0f} samples/s, ratio "
        f"{light_rate / hand_rate:.3f} (target >= 0.95)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wall, overheads = sweep_overheads(Path(args.data).resolve(), work, 6)
        print(
            f"sweep overhead per trial (time outside Trainer.fit, trials 0-4 of a 6-trial "
            f"sweep): median {statistics.median(overheads):.2f} s, max {max(overheads):.2f} s "
            f"(target <= 1 s); the whole command took {wall:.1f} s"
        )

        pl.seed_everything(0, verbose=False)
        from omegaconf import OmegaConf

        from mnist.config import register_configs
        from mnist.train import run

        register_configs()
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose(
                "config",
                overrides=[
                    f"data.root={Path(args.data).resolve()}",
                    "data.val_size=1000",
                    "trainer.max_epochs=2",
                    f"trainer.accelerator={args.accelerator}",
                    f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
                    "mlflow.experiment_name=accuracy",
                ],
            )
        started = time.perf_counter()
        val_acc = run(cfg, in_sweep=True)
        print(
            f"2-epoch trial, dropout={cfg.model.dropout} lr={cfg.model.lr}: val_acc={val_acc:.4f} "
            f"on {OmegaConf.select(cfg, 'data.val_size')} real validation digits "
            f"(expect >= 0.96), {time.perf_counter() - started:.1f} s"
        )


if __name__ == "__main__":
    main()
