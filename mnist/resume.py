"""The MNIST app's part in continuing an interrupted trial: a checkpoint per epoch, and its load.

After each epoch's validation, the whole training state (weights, Adam's moments, the loops'
epoch counters, the random generators and the training data's shuffling position) goes into
the trial's MLflow run as `resume/epoch-<n>.ckpt`; the sweeper is told with
`checkpoint_saved(n)`. A trial that continues one (`continues()`) loads it and trains only the
remaining epochs: on CPU with `trainer.deterministic=true` it ends with exactly the values of
an uninterrupted run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from mlflow_study_sweeper import (
    CHECKPOINT_DIR,
    Continuation,
    checkpoint_artifact,
    checkpoint_saved,
)

from mnist.data import TensorBatches


class EpochCheckpoint(pl.Callback):
    """Saves the training state after each validation; restores the generators on resume.

    Its state (part of every checkpoint Lightning writes) is the random generators' and the
    training batches' shuffling generator's, all tensors, so the checkpoint loads with
    `weights_only=True`.
    """

    def __init__(self, run_id: str | None, train: TensorBatches) -> None:
        """`run_id`: the trial's run, where it uploads; None on a DDP rank > 0, which takes
        part in the save (Lightning's barrier) and uploads nothing."""
        self.run_id = run_id
        self.train = train
        self.restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state = {"torch": torch.get_rng_state(), "data_order": self.train.generator.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = state_dict  # applied when training starts, after Lightning's restore

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.restored is None:
            return
        torch.set_rng_state(self.restored["torch"])
        self.train.generator.set_state(self.restored["data_order"])
        if "cuda" in self.restored and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.restored["cuda"])

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(checkpoint_artifact(epoch)).name
            trainer.save_checkpoint(path)  # every rank: rank 0 writes it
            if self.run_id is None:
                return
            mlflow.MlflowClient().log_artifact(self.run_id, str(path), CHECKPOINT_DIR)
        checkpoint_saved(epoch)  # only now: a kill during the upload keeps the previous one


def download(continuation: Continuation, folder: str) -> str:
    """The checkpoint a continuing trial starts from, as a local file."""
    artifact = checkpoint_artifact(continuation.step)
    return mlflow.MlflowClient().download_artifacts(continuation.run_id, artifact, folder)
