"""A Lightning callback that reports a validation metric to the sweep after every epoch.

Under DDP (`strategy=ddp`), it also keeps the sweep alive when a rank dies: Lightning's launcher
watches the ranks it started and, when one exits with an error, SIGKILLs them all *and its own
process*, which is the sweep's (or its worker's) when the job runs in it. The callback narrows
that to the ranks: rank 0 then fails at its next collective, the trial fails, the sweep goes on.
This module is the only one that touches Lightning's private API (its launcher's observer).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import pytorch_lightning as pl

from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.trial.job_side import report

# lightning_fabric.strategies.launchers.subprocess_script._ChildProcessObserver's thread name
OBSERVER_THREAD = "child-process-observer"


class PruningCallback(pl.Callback):
    """Reports `monitor` after each validation; stops training when the pruner says so.

    The epoch that was cut still ends, so its metrics are logged; the sweeper records the
    trial as PRUNED. `pruned_at_epoch` says where, or is None. Under DDP every rank calls the
    report and gets rank 0's decision, so all ranks stop at the same epoch.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor
        self.pruned_at_epoch: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank == 0:
            spare_this_process()

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        crash_point("train-batch")  # a test's fault point: a rank killed mid-epoch

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        epoch = trainer.current_epoch
        value = trainer.callback_metrics[self.monitor].item()
        if report(value, step=epoch, total=trainer.max_epochs):
            self.pruned_at_epoch = epoch
            trainer.should_stop = True


def spare_this_process() -> None:
    """Lightning's observers of the ranks started from this process kill only those ranks."""
    for thread in threading.enumerate():
        if thread.name == OBSERVER_THREAD and hasattr(thread, "_child_processes"):
            thread._terminate_all = _ranks_only(thread._child_processes)  # type: ignore[attr-defined]


def _ranks_only(procs: list[Any]):
    def terminate() -> None:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)

    return terminate
