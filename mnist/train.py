"""One training run of the CNN: logs to its MLflow run, reports epochs, returns the metric.

In a sweep the sweeper hands the run over (MLFLOW_RUN_ID) and `mlflow.start_run()` resumes it;
without one, this makes its own run. Either way this module knows MLflow, not the sweeper,
except for the per-epoch report that lets a sweep prune.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from mlflow_study_sweeper import PruningCallback, continues, current_trial, rank
from omegaconf import DictConfig
from pytorch_lightning.plugins.environments import LightningEnvironment, SLURMEnvironment
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from mnist import resume
from mnist.config import check_config, flatten, metrics_of
from mnist.data import ensure_mnist, load_mnist
from mnist.model import MNISTClassifier, NonFiniteLossError
from mnist.publish import save_checkpoint

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing for users to act on
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", module="pytorch_lightning")


class EpochLogger(pl.Callback):
    """Logs acc/loss/val_acc/val_loss once per epoch (step = epoch) to the active MLflow run.

    After the epoch's validation, before its checkpoint and its report to the sweep: a trial
    interrupted there has this epoch's metrics in its run. Counts the epochs it saw. Under DDP
    the training sums of every rank are added up, and rank 0 alone logs (`log=False` on the
    others).
    """

    def __init__(self, log: bool = True) -> None:
        self.logs = log
        self.epochs = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: MNISTClassifier) -> None:
        if trainer.sanity_checking:
            return
        # the module's running sums hold the whole training epoch by now; every rank's
        sums = trainer.strategy.reduce(pl_module.train_epoch_sums(), reduce_op="sum")
        metrics = epoch_means(sums)
        metrics |= {
            k: trainer.callback_metrics[k].item()
            for k in ("val_acc", "val_loss")
            if k in trainer.callback_metrics
        }
        if self.logs:
            mlflow.log_metrics(metrics, step=trainer.current_epoch)
        self.epochs += 1


def epoch_means(sums: torch.Tensor) -> dict[str, float]:
    """Mean loss and accuracy from (loss x images, correct, images) summed over the epoch."""
    loss_sum, correct, seen = sums.tolist()
    return {"loss": loss_sum / seen, "acc": correct / seen} if seen else {}


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        # under DDP each rank's own GPU (Lightning's launcher sets LOCAL_RANK in the ranks > 0)
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def quiet_lightning(quiet: bool) -> None:
    # Lightning's banners ("GPU available", "Seed set", tips) are INFO logs
    level = logging.WARNING if quiet else logging.INFO
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(level)


# Lightning's hint, at every Trainer and fit on a machine where Slurm's `srun` exists but did not
# start this process (a login node, a sweep's worker in an sbatch task)
SRUN_HINT = r"The `srun` command is available on your system but is not used"


def cluster_environment(cluster: str) -> LightningEnvironment | SLURMEnvironment:
    """Who lays out a run's processes (trainer.cluster).

    `local` (the default): Lightning itself, on the devices this process was given (a sweep's
    worker sets CUDA_VISIBLE_DEVICES), also inside a Slurm task, whose SLURM_* variables describe
    the worker's task, not the trial; Lightning installs no Slurm requeue handler either, so a
    Slurm signal reaches the sweeper's worker. `slurm`: Slurm's tasks, for one run started by
    `srun` with a task per device.
    """
    return SLURMEnvironment() if cluster == "slurm" else LightningEnvironment()


@contextlib.contextmanager
def process_layout(cluster: str):
    """Around the Trainer and its fit: with trainer.cluster=local the process layout is
    Lightning's own, so its hint to start the run with `srun` is wrong and is not shown."""
    with warnings.catch_warnings():
        if cluster != "slurm":
            warnings.filterwarnings("ignore", SRUN_HINT, PossibleUserWarning)
        yield


def build_trainer(
    device: torch.device,
    callbacks: list[pl.Callback],
    verbose: bool,
    cluster: str = "local",
    **options: Any,
) -> pl.Trainer:
    quiet_lightning(not verbose)
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type,
        plugins=[cluster_environment(cluster)],
        callbacks=callbacks,
        logger=False,  # metrics go to MLflow through EpochLogger, once per epoch
        enable_checkpointing=False,
        enable_progress_bar=verbose,
        enable_model_summary=verbose,
        num_sanity_val_steps=0,  # a sanity pass would report a bogus epoch to the pruner
        **options,
    )


def tracking_uri(cfg: DictConfig, start_dir: Path) -> str:
    uri = cfg.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((start_dir / uri[len(prefix) :]).resolve())
    return uri


def run(cfg: DictConfig, start_dir: str | Path | None = None) -> float | dict[str, float]:
    """Train once with cfg, log to MLflow, return cfg.metric of the last epoch.

    With several metrics (metric=[val_acc, n_params]) a dict of them, as a multi-objective
    sweep wants it.

    Relative paths (data.root, a sqlite tracking URI) resolve against start_dir (default: cwd).
    """
    start_dir = Path(start_dir or Path.cwd())
    check_config(cfg)
    in_sweep = current_trial() is not None
    verbose = (not in_sweep) if cfg.trainer.verbose is None else bool(cfg.trainer.verbose)
    quiet_lightning(not verbose)
    pl.seed_everything(cfg.seed, verbose=verbose)
    device = pick_device(cfg.trainer.accelerator)
    # missing data is the user's to fix: say so before any run exists
    ensure_mnist(start_dir / cfg.data.root, download=cfg.data.download)
    if rank() > 0:  # a further DDP rank, started by Lightning: rank 0 logs and reports
        return train_beside_rank_zero(cfg, start_dir, device, verbose)
    if not in_sweep:  # a sweep hands over its tracking URI, experiment and run
        # the config's own value (which defaults to MLFLOW_TRACKING_URI, see conf/mlflow/)
        mlflow.set_tracking_uri(tracking_uri(cfg, start_dir))
        mlflow.set_experiment(cfg.mlflow.experiment_name)

    with mlflow.start_run(run_name=None if in_sweep else "single-run") as active:
        # the tracking URI may hold a password: it is where runs go, not a trait of this one
        skip = set(active.data.params) | {"mlflow.tracking_uri"}
        mlflow.log_params({k: v for k, v in flatten(cfg).items() if k not in skip})
        if not in_sweep:
            mlflow.set_tag("sweep.role", "run")
        names = metrics_of(cfg)
        pruning = PruningCallback(names[0])  # the first objective is the one reported per epoch
        logger = EpochLogger()
        started = time.perf_counter()
        try:
            values, model = train(
                cfg, start_dir, device, [logger, pruning], verbose, active.info.run_id
            )
        except Exception as err:
            mlflow.set_tag("failure_reason", f"{type(err).__name__}: {err}"[:5000])
            raise
        mlflow.log_metric("train_seconds", time.perf_counter() - started, step=0)
        mlflow.log_metric("epochs_trained", logger.epochs, step=0)  # fewer when it continued
        if pruning.pruned_at_epoch is None:  # the sweep publishes a trial's own weights
            save_checkpoint(active.info.run_id, model)
        return returned(cfg, values)


def train_beside_rank_zero(
    cfg: DictConfig, start_dir: Path, device: torch.device, verbose: bool
) -> float | dict[str, float]:
    """A DDP rank > 0: the same fit (the same callbacks: each takes part in the collectives),
    without MLflow: no run of its own, nothing logged, no checkpoint uploaded."""
    names = metrics_of(cfg)
    logger = EpochLogger(log=False)
    callbacks = [logger, PruningCallback(names[0])]
    log.info("rank %d: model.dropout=%s model.lr=%s", rank(), cfg.model.dropout, cfg.model.lr)
    values, _ = train(cfg, start_dir, device, callbacks, verbose, run_id=None)
    log.info("rank %d: %d epochs trained", rank(), logger.epochs)
    return returned(cfg, values)


def returned(cfg: DictConfig, values: dict[str, float]) -> float | dict[str, float]:
    if isinstance(cfg.metric, str):
        return values[cfg.metric]
    return {name: values[name] for name in metrics_of(cfg)}


def train(
    cfg: DictConfig,
    start_dir: Path,
    device: torch.device,
    callbacks: list,
    verbose: bool,
    run_id: str | None = None,
) -> tuple[dict[str, float], MNISTClassifier]:
    """Fit the CNN; return the last epoch's val_acc and val_loss, n_params, and the model.

    In a sweep it saves a checkpoint per epoch into the run `run_id` (under DDP: every rank
    takes part in the save, rank 0 alone, which has the run, uploads it), and continues from
    one when the trial continues an interrupted one.
    """
    data = load_mnist(
        start_dir / cfg.data.root,
        batch_size=cfg.data.batch_size,
        val_size=cfg.data.val_size,
        seed=cfg.seed,
        device=device,
        download=False,
    )
    model = MNISTClassifier(dropout=cfg.model.dropout, lr=cfg.model.lr, width=cfg.model.width)
    if run_id is not None:
        mlflow.log_metric("n_params", model.n_params, step=0)
    in_sweep = current_trial() is not None
    if in_sweep:  # before the pruning report: the checkpoint exists once the epoch is reported
        callbacks = [*callbacks[:-1], resume.EpochCheckpoint(run_id, data.train), callbacks[-1]]
    continuation = continues() if in_sweep else None
    with process_layout(cfg.trainer.cluster), tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(
            device,
            callbacks=callbacks,
            verbose=verbose,
            cluster=cfg.trainer.cluster,
            max_epochs=cfg.trainer.max_epochs,
            devices=cfg.trainer.devices,
            strategy=cfg.trainer.strategy,
            limit_train_batches=cfg.trainer.limit_train_batches,
            deterministic=cfg.trainer.deterministic,
        )
        # a checkpoint is data, never code to run: weights_only
        ckpt = resume.download(continuation, tmp) if continuation else None
        trainer.fit(
            model,
            train_dataloaders=data.train,
            val_dataloaders=data.val,
            ckpt_path=ckpt,
            weights_only=True,
        )
    values = {k: trainer.callback_metrics[k].item() for k in ("val_acc", "val_loss")}
    for name, value in values.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{name} is {value} after training: the trial diverged")
    return values | {"n_params": float(model.n_params)}, model
