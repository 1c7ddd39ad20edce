"""A Lightning callback that reports a validation metric to the sweep after every epoch."""

from __future__ import annotations

import pytorch_lightning as pl

from mlflow_study_sweeper.trial.job_side import report


class PruningCallback(pl.Callback):
    """Reports `monitor` after each validation; stops training when the pruner says so.

    The epoch that was cut still ends, so its metrics are logged; the sweeper records the
    trial as PRUNED. `pruned_at_epoch` says where, or is None.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.pruned_at_epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        value = trainer.callback_metrics[self.monitor].item()
        if report(value, step=epoch, total=trainer.max_epochs):
            self.pruned_at_epoch = epoch
            trainer.should_stop = True
