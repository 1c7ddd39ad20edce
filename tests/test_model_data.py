"""The CNN's shape, the tensor-held MNIST splits and the missing-data error."""

import pytest
import torch

from mnist.data import RAW_FILES, MNISTNotFoundError, ensure_mnist, load_mnist
from mnist.model import MNISTClassifier


def test_cnn_architecture():
    model = MNISTClassifier(dropout=0.25, lr=0.01)
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64), (64, 128)]
    fcs = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(4 * 4 * 128, 625), (625, 10)]
    dropout = [m for m in model.classifier if isinstance(m, torch.nn.Dropout)]
    assert dropout[0].p == 0.25
    assert model.configure_optimizers().param_groups[0]["lr"] == 0.01
    assert MNISTClassifier().hparams == {"dropout": 0.1, "lr": 1e-3, "width": 1.0}
    assert model.n_params == 1_379_557  # 320 + 18_496 + 73_856 + 1_280_625 + 6_260


def test_width_scales_every_layer_and_the_cost():
    half = MNISTClassifier(width=0.5)
    convs = [m for m in half.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 16), (16, 32), (32, 64)]
    fcs = [m for m in half.classifier if isinstance(m, torch.nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(4 * 4 * 64, 312), (312, 10)]
    assert half(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    sizes = [MNISTClassifier(width=w).n_params for w in (0.25, 0.5, 1.0, 1.5)]
    assert sizes == sorted(sizes) and sizes[0] < 100_000 < 1_000_000 < sizes[2]


def test_splits_are_seeded_tensors(mnist_root):
    a = load_mnist(mnist_root, batch_size=50, val_size=100, seed=1)
    b = load_mnist(mnist_root, batch_size=50, val_size=100, seed=1)
    c = load_mnist(mnist_root, batch_size=50, val_size=100, seed=2)
    assert len(a.train.labels) == 500 and len(a.val.labels) == 100 and len(a.test.labels) == 200
    assert torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert a.train.images.dtype == torch.float32 and a.train.images.shape[1:] == (1, 28, 28)
    batches = list(a.train)
    assert len(batches) == len(a.train) == 10
    assert sum(len(y) for _, y in batches) == 500
    # shuffled every epoch, the same images
    first, second = next(iter(a.train))[1], next(iter(a.train))[1]
    assert not torch.equal(first, second)


def test_missing_data_names_the_folder_and_files(tmp_path):
    with pytest.raises(MNISTNotFoundError) as err:
        ensure_mnist(tmp_path / "nowhere", download=False)
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    for name in RAW_FILES:
        assert name in message


def test_val_size_must_fit(mnist_root):
    with pytest.raises(ValueError, match="data.val_size=600"):
        load_mnist(mnist_root, val_size=600)


def test_cnn_learns_the_generated_digits(mnist_root):
    torch.manual_seed(0)
    data = load_mnist(mnist_root, batch_size=32, val_size=100, seed=0)
    model = MNISTClassifier(lr=1e-3)
    optimizer = model.configure_optimizers()
    for _ in range(2):
        for x, y in data.train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.val.images).argmax(1) == data.val.labels).float().mean()
    assert accuracy > 0.8  # chance is 0.1
