"""What the benchmarks share: the data folder, a sweep run as `sweep.py -m`, the results table."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist.data import RAW_FILES, raw_dir

REPO = Path(__file__).resolve().parent.parent
FULL_MNIST = 60_000  # training images in full MNIST
VAL_SIZE = 1000  # validation images every benchmark holds out (data.val_size)
DATA_HELP = (
    "folder with MNIST/raw/ in torchvision's layout: full MNIST (the data/ a sweep downloads "
    "into) or a real-MNIST subset"
)


def data_folder(path: str | Path) -> Path:
    """`path` made absolute; exits with what to do when it holds no MNIST/raw/."""
    root = Path(path).expanduser().resolve()
    missing = [name for name in RAW_FILES if not (raw_dir(root) / name).is_file()]
    if missing:
        sys.exit(
            f"no MNIST in {root}: {raw_dir(root)} lacks {', '.join(missing)}. Pass --data DIR "
            f"with MNIST/raw/ inside (torchvision's layout): the data/ folder a sweep downloads "
            f"into, or a real-MNIST subset"
        )
    return root


def image_count(root: Path, train: bool = True) -> int:
    """Images in the training (or test) split, read from the IDX labels file's header."""
    with open(raw_dir(root) / RAW_FILES[1 if train else 3], "rb") as labels:
        return int.from_bytes(labels.read(8)[4:8], "big")


def describe_data(root: Path) -> str:
    n_train, n_test = image_count(root), image_count(root, train=False)
    kind = "full MNIST" if n_train >= FULL_MNIST else "MNIST subset"
    return f"{kind}: {n_train} training and {n_test} test images in {root}"


def machine() -> str:
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPU cores"
    )


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
        f"data.val_size={VAL_SIZE}",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweeper.storage=sqlite:///{work}/optuna.db",
        f"hydra.sweep.dir={work}/{name}",
        f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
        f"mlflow.experiment_name={name}",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=work, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"sweep {name!r} failed (exit {proc.returncode}): {' '.join(command)}\n"
            f"{proc.stderr[-4000:]}"
        )
    return wall


def limit_batches(batches: int) -> tuple[str, ...]:
    """The override that trains `batches` per epoch; none (full epochs) for 0."""
    return (f"trainer.limit_train_batches={batches}",) if batches else ()


@dataclass
class Row:
    """One line of a results table."""

    benchmark: str
    measure: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target, or nothing to judge it by


def print_table(rows: list[Row]) -> None:
    header = ("benchmark", "measure", "value", "target", "met")
    cells = [
        (
            r.benchmark,
            r.measure,
            r.value,
            r.target or "-",
            {True: "yes", False: "NO"}.get(r.met, "-"),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    for i, line in enumerate([header, *cells]):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))
