"""The project's CNN (the MLflow autolog example's architecture) as a LightningModule."""

import math

import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from mnist.errors import UserFacingError


class NonFiniteLossError(UserFacingError, RuntimeError):
    """Training produced a NaN or infinite loss: the trial diverged."""


def widths(width: float) -> tuple[int, int, int, int]:
    """The conv channels and hidden FC units at `width` (1.0: 32, 64, 128 and 625)."""
    return tuple(max(1, round(n * width)) for n in (32, 64, 128, 625))  # type: ignore[return-value]


class MNISTClassifier(pl.LightningModule):
    def __init__(self, dropout: float = 0.1, lr: float = 1e-3, width: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2, c3, hidden = widths(width)  # width 1.0 is exactly the given CNN
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14 -> 7
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, padding=1),  # 7 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * 4 * c3, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )
        # one metric object per stage: a shared one would mix train and val counts. Training
        # keeps plain running sums instead (loss x images, correct; images seen in an int):
        # per-step self.log and metric updates cost ~5% of a CPU step, and the epoch means are
        # all that is logged
        self.register_buffer("_train_sums", torch.zeros(2), persistent=False)
        self._train_seen = 0
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    @property
    def n_params(self) -> int:
        """Trainable parameters: the cost objective of a multi-objective sweep."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == y).sum()
            # in place, scaled by a Python number: no tensor made from a host value each step,
            # which on a GPU would be a blocking host-to-device copy
            self._train_sums.add_(torch.stack((loss.detach() * len(y), correct.to(loss.dtype))))
        self._train_seen += len(y)
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_sums.zero_()
        self._train_seen = 0

    def train_epoch_sums(self) -> torch.Tensor:
        """(loss x images, correct, images) of this process's training batches this epoch."""
        seen = torch.tensor([float(self._train_seen)], device=self._train_sums.device)
        return torch.cat((self._train_sums, seen))

    def train_epoch_metrics(self) -> dict[str, float]:
        """Mean loss and accuracy over the training batches of the current epoch."""
        loss_sum, correct = self._train_sums.tolist()
        seen = self._train_seen
        return {"loss": loss_sum / seen, "acc": correct / seen} if seen else {}

    def on_train_epoch_end(self) -> None:
        for key, value in self.train_epoch_metrics().items():
            self.log(key, value, on_epoch=True, sync_dist=True)  # DDP: the ranks' mean

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # stop a diverged trial at once instead of training on NaNs for the remaining epochs
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(loss.item()):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at epoch {self.current_epoch}, "
                f"step {batch_idx} (lr={self.hparams.lr}): the trial diverged"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        # under DDP the mean over every rank's batches (an all-reduce at the epoch's end)
        self.log("val_loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val_acc", self.val_acc, on_epoch=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), on_epoch=True)
        self.log("test_acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
