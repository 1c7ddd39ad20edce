"""MNIST read with torchvision, held as tensors on the training device, served in slices."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.datasets import MNIST

from mnist.errors import ConfigValueError, UserFacingError

# the four uncompressed IDX files torchvision reads from ROOT/MNIST/raw/
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MEAN, STD = 0.1307, 0.3081


class MNISTNotFoundError(UserFacingError, FileNotFoundError):
    """The MNIST files are missing and could not be downloaded."""


def raw_dir(root: str | Path) -> Path:
    return Path(root).expanduser().resolve() / "MNIST" / "raw"


def ensure_mnist(root: str | Path, download: bool = True) -> Path:
    """Return the raw folder, downloading MNIST into it if allowed; raise a clear error if not."""
    folder = raw_dir(root)
    missing = [name for name in RAW_FILES if not (folder / name).is_file()]
    if not missing:
        return folder
    reason = "downloading is off (data.download=false)"
    if download:
        try:
            MNIST(str(Path(root).expanduser().resolve()), train=True, download=True)
            MNIST(str(Path(root).expanduser().resolve()), train=False, download=True)
            return folder
        except Exception as err:  # no internet, a proxy, a mirror down: all end the same way
            reason = f"the download failed ({type(err).__name__}: {err})".splitlines()[0]
    raise MNISTNotFoundError(
        f"MNIST is not in {folder}: missing {', '.join(missing)}, and {reason}. "
        f"Put the four files {', '.join(RAW_FILES)} (uncompressed IDX, torchvision's layout) "
        f"in that folder, or point data.root at a folder that has MNIST/raw/ inside."
    )


def check_sizes(folder: Path, batch_size: int, val_size: int) -> None:
    """val_size and batch_size against the training set's size, read from the IDX header."""
    try:
        with open(Path(folder) / RAW_FILES[1], "rb") as labels:
            n = int.from_bytes(labels.read(8)[4:8], "big")
    except OSError:
        return  # reading the data will say what is wrong with it
    if not 0 < val_size < n:
        raise ConfigValueError(
            f"data.val_size={val_size} must be between 1 and {n - 1}: the training set in "
            f"{folder} has {n} images"
        )
    if batch_size > n - val_size:
        raise ConfigValueError(
            f"data.batch_size={batch_size} is larger than the {n - val_size} training images "
            f"left after data.val_size={val_size}: lower it"
        )


class MNISTCorruptError(UserFacingError, ValueError):
    """The MNIST files exist but cannot be read."""


@functools.lru_cache(maxsize=4)
def _read_split(folder: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # parsing 60k images costs ~0.3 s: cache it for the trials of an in-process sweep
    root = str(Path(folder).parent.parent)
    try:
        dataset = MNIST(root, train=train, download=False)
    except Exception as err:  # torchvision asserts on a bad magic number, numpy on a short file
        raise MNISTCorruptError(
            f"cannot read the MNIST {'training' if train else 'test'} files in {folder} "
            f"({type(err).__name__}: {err or 'not an IDX file'}): they are corrupt or truncated; "
            f"delete them to download again, or copy them afresh"
        ) from err
    images = (dataset.data.unsqueeze(1).float() / 255.0 - MEAN) / STD
    return images, dataset.targets.long()


class TensorBatches:
    """Batches sliced from tensors already on the device: no per-sample indexing or collation."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        _, world = ddp_rank()
        return -(-self.shard_size(world) // self.batch_size)

    def shard_size(self, world: int) -> int:
        return -(-len(self.labels) // world)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        rank, world = ddp_rank()
        if self.shuffle or world > 1:
            # shuffled, the same order on every rank: the same seed, the same draws
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            if world > 1:  # as DistributedSampler: padded to equal shards, one per rank
                size = self.shard_size(world)
                order = order.repeat(-(-size * world // n))[: size * world][rank::world]
            order = order.to(self.images.device)
            images, labels = self.images[order], self.labels[order]
        else:
            images, labels = self.images, self.labels
        for start in range(0, len(labels), self.batch_size):
            yield images[start : start + self.batch_size], labels[start : start + self.batch_size]


def ddp_rank() -> tuple[int, int]:
    """(rank, world size) of this process's DDP group; (0, 1) outside one. Every rank gets
    batches of its own share, and as many batches as the others (a rank with one batch more
    would wait for the others' gradients for ever)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class MNISTSplits:
    train: TensorBatches
    val: TensorBatches
    test: TensorBatches


def load_test_set(root: str | Path, batch_size: int = 256) -> TensorBatches:
    """The MNIST test set alone (what the publish hook scores), on the CPU."""
    folder = ensure_mnist(root, download=False)
    return TensorBatches(*_read_split(str(folder), False), batch_size)


def load_mnist(
    root: str | Path,
    batch_size: int = 64,
    val_size: int = 5000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> MNISTSplits:
    """MNIST on `device`: a seeded train/val split of the training set, and the test set."""
    folder = ensure_mnist(root, download=download)
    images, labels = _read_split(str(folder), True)
    if not 0 < val_size < len(labels):
        raise ConfigValueError(
            f"data.val_size={val_size} must be between 1 and {len(labels) - 1}: "
            f"the training set in {folder} has {len(labels)} images"
        )
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    test_images, test_labels = _read_split(str(folder), False)
    device = torch.device(device)

    def on_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(device) for t in tensors]

    return MNISTSplits(
        train=TensorBatches(
            *on_device(images[train_idx], labels[train_idx]), batch_size, shuffle=True, seed=seed
        ),
        val=TensorBatches(*on_device(images[val_idx], labels[val_idx]), batch_size),
        test=TensorBatches(*on_device(test_images, test_labels), batch_size),
    )
