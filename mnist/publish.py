"""The best trial as a served model: its checkpoint tested once and logged as an MLflow Model.

`publish_best` is the sweep's publish hook (conf/sweep/optuna.yaml); the sweeper then registers
the model and moves @champion by test_acc.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import infer_signature
from omegaconf import DictConfig
from torch import nn

from mnist.data import MEAN, STD, load_test_set
from mnist.model import MNISTClassifier

# a progress bar per download would break the sweep's one-line-per-trial output
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

CHECKPOINT = "checkpoint/model.pt"  # each complete trial's weights, an artifact of its run


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


def save_checkpoint(run_id: str, model: MNISTClassifier) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(CHECKPOINT).name
        torch.save(model.state_dict(), path)
        mlflow.MlflowClient().log_artifact(run_id, str(path), str(Path(CHECKPOINT).parent))


def load_checkpoint(run_id: str, dropout: float, width: float = 1.0) -> MNISTClassifier:
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.MlflowClient().download_artifacts(run_id, CHECKPOINT, tmp)
        # weights only: a checkpoint is data, never code to run
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = MNISTClassifier(dropout=dropout, width=width)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256
) -> float:
    # 256 images at a time: the first conv's activations for 1000 took 100 MB more at the peak
    correct = 0
    for start in range(0, len(labels), batch):
        logits = model(images[start : start + batch])
        correct += (logits.argmax(1) == labels[start : start + batch]).sum().item()
    return correct / len(labels)


def publish_best(run_id: str, config: DictConfig) -> float:
    """Test the run's checkpoint once (test_acc on the run), log it as MLflow Model `model`."""
    cnn = load_checkpoint(run_id, config.model.dropout, config.model.width)
    test = load_test_set(config.data.root)  # not the training set: the test split alone
    test_acc = accuracy(cnn, test.images, test.labels)
    reader = DigitReader(cnn).eval()
    # raw pixels, as a client sends them; the model normalises itself
    example = (test.images[:2, 0] * STD + MEAN).mul(255).round().clamp(0, 255)
    example = example.numpy().astype(np.float32)
    with torch.no_grad():
        signature = infer_signature(example, reader(torch.from_numpy(example)).numpy())
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("test_acc", test_acc)
        mlflow.pytorch.log_model(
            reader,
            name="model",
            signature=signature,
            input_example=example,
            code_paths=[str(Path(__file__).parent)],  # the model unpickles mnist.model classes
            # listed, not inferred: inference loads the model in a subprocess for ~10 s
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pytorch-lightning"],
        )
    return test_acc
