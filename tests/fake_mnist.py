"""Small, learnable MNIST files in torchvision's layout (class-dependent patterns plus noise)."""

import struct
from pathlib import Path

import numpy as np

from mnist.data import RAW_FILES


def patterns(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        # each digit class lights its own 8x8 block of a 3x4 grid, shifted a little at random
        row, col = divmod(int(label), 4)
        dy, dx = rng.integers(-1, 2, size=2)
        y, x = 1 + row * 9 + dy, 1 + col * 7 + dx
        images[i, max(y, 0) : y + 8, max(x, 0) : x + 6] = 255
    return images, labels


def write_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, split_seed in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = patterns(n, split_seed)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )
    assert all((raw / name).is_file() for name in RAW_FILES)
    return Path(root)
