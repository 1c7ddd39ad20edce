"""The best trial as a served model: its checkpoint as an MLflow Model, tested, registered."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from torch import nn

from mnist.data import MEAN, STD, load_mnist
from mnist.model import MNISTClassifier

# a progress bar per download would break the sweep's one-line-per-trial output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CHECKPOINT = "checkpoint/model.pt"  # each complete trial's weights, an artifact of its run
CHAMPION = "champion"


class DigitReader(nn.Module):
    """The served form of the CNN: 28x28 images with pixels 0-255 in, digit classes out."""

    def __init__(self, cnn: MNISTClassifier) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.cnn((x / 255.0 - MEAN) / STD).argmax(dim=1)


def save_checkpoint(client: MlflowClient, run_id: str, model: MNISTClassifier) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT).name
        torch.save(model.state_dict(), path)
        client.log_artifact(run_id, str(path), str(Path(CHECKPOINT).parent))


def load_checkpoint(client: MlflowClient, run_id: str, dropout: float) -> MNISTClassifier:
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, CHECKPOINT, tmp)
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = MNISTClassifier(dropout=dropout)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    for start in range(0, len(labels), 1000):
        logits = model(images[start : start + 1000])
        correct += (logits.argmax(1) == labels[start : start + 1000]).sum().item()
    return correct / len(labels)


@dataclass
class Published:
    model_uri: str
    version: str
    test_acc: float
    champion_moved: bool
    previous_champion: str | None
    previous_test_acc: float | None


def publish_best(
    client: MlflowClient,
    tracking_uri: str,
    run_id: str,
    parent_run_id: str,
    registered_model_name: str,
    data_root: Path,
    dropout: float,
    tags: dict[str, str],
) -> Published:
    """Log the best run's checkpoint as model `model`, test it, register it, maybe crown it."""
    cnn = load_checkpoint(client, run_id, dropout)
    data = load_mnist(data_root, val_size=1, download=False)  # only the test split is used
    test_acc = accuracy(cnn, data.test.images, data.test.labels)
    for target in (run_id, parent_run_id):
        client.log_metric(target, "test_acc", test_acc)

    reader = DigitReader(cnn).eval()
    # raw pixels, as a client sends them; the model normalises itself
    example = (data.test.images[:2, 0] * STD + MEAN).mul(255).round().clamp(0, 255)
    example = example.numpy().astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, reader(torch.from_numpy(example)).numpy())
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            reader,
            name="model",
            signature=signature,
            input_example=example,
            code_paths=[str(Path(__file__).parent)],  # the model unpickles mnist.model classes
            # listed, not inferred: inference loads the model in a subprocess for ~10 s
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pytorch-lightning"],
        )
    version = mlflow.register_model(
        info.model_uri,
        registered_model_name,
        tags={**tags, "run_id": run_id, "test_acc": f"{test_acc:.6f}"},
    ).version

    previous, previous_acc = None, None
    try:
        current = client.get_model_version_by_alias(registered_model_name, CHAMPION)
        previous, previous_acc = current.version, float(current.tags.get("test_acc", "nan"))
    except MlflowException:
        pass  # no champion yet
    moved = previous is None or not previous_acc >= test_acc  # NaN never keeps the alias
    if moved:
        client.set_registered_model_alias(registered_model_name, CHAMPION, version)
    return Published(info.model_uri, str(version), test_acc, moved, previous, previous_acc)
