"""One trial: train the CNN with the config's values, log it as an MLflow run, return the metric."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from mnist import tracking
from mnist.config import check_config, flatten
from mnist.data import ensure_mnist, load_mnist
from mnist.model import MNISTClassifier, NonFiniteLossError
from mnist.registry import save_checkpoint
from mnist.study import job_trial

log = logging.getLogger(__name__)
# Lightning 2.6 calls a torch pytree API that torch 2.14 deprecates; nothing for users to act on
warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", module="pytorch_lightning")


@dataclass
class StudyRef:
    """Where a job finds its study: the sweeper's settings, as Hydra passes them to each job."""

    name: str
    storage: str | None
    pruner: Any


class EpochLogger(pl.Callback):
    """Logs acc/loss/val_acc/val_loss once per epoch (step = epoch) to the trial's MLflow run."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.epochs_logged = 0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: MNISTClassifier) -> None:
        # callbacks run before the module's own on_train_epoch_end: ask it for this epoch's means
        metrics = pl_module.train_epoch_metrics()
        metrics |= {
            k: trainer.callback_metrics[k].item()
            for k in ("val_acc", "val_loss")
            if k in trainer.callback_metrics
        }
        tracking.log_metrics(self.client, self.run_id, metrics, step=trainer.current_epoch)
        self.epochs_logged += 1


class PruningCheck(pl.Callback):
    """Reports the metric to Optuna after each validation; stops training when told to prune."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at_epoch: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.metric not in trainer.callback_metrics:
            return
        value = trainer.callback_metrics[self.metric].item()
        if not math.isfinite(value):
            return  # the run fails as diverged; a NaN must not reach the pruner's statistics
        epoch = trainer.current_epoch
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.pruned_at_epoch = epoch
            trainer.should_stop = True  # this epoch still ends, so its metrics are logged


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def quiet_lightning(quiet: bool) -> None:
    # Lightning's banners ("GPU available", "Seed set", tips) are INFO logs
    level = logging.WARNING if quiet else logging.INFO
    for name in ("pytorch_lightning", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(level)


def build_trainer(
    device: torch.device, callbacks: list[pl.Callback], verbose: bool, **options: Any
) -> pl.Trainer:
    quiet_lightning(not verbose)
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else device.type,
        callbacks=callbacks,
        logger=False,  # metrics go to MLflow through EpochLogger, once per epoch
        enable_checkpointing=False,
        enable_progress_bar=verbose,
        enable_model_summary=verbose,
        num_sanity_val_steps=0,  # a sanity pass would report a bogus epoch to the pruner
        **options,
    )


def run(
    cfg: DictConfig,
    study: StudyRef | None = None,
    in_sweep: bool = False,
    start_dir: str | Path | None = None,
) -> float:
    """Train once with cfg, log to MLflow, return cfg.metric of the last epoch.

    In a sweep (cfg.trial set by the sweeper) the run is a child of the sweep's parent run and
    the metric is reported to the Optuna trial after every epoch, which may prune it.
    Relative paths (data.root, a sqlite tracking URI) resolve against start_dir (default: cwd).
    """
    start_dir = Path(start_dir or Path.cwd())
    check_config(cfg)
    verbose = (not in_sweep) if cfg.trainer.verbose is None else bool(cfg.trainer.verbose)
    quiet_lightning(not verbose)
    pl.seed_everything(cfg.seed, verbose=verbose)
    device = pick_device(cfg.trainer.accelerator)
    # missing data is the user's to fix: say so before any run exists
    ensure_mnist(start_dir / cfg.data.root, download=cfg.data.download)
    client = tracking.connect(tracking.absolute_uri(cfg.mlflow.tracking_uri, start_dir))
    experiment = tracking.experiment_id(client, cfg.mlflow.experiment_name)

    trial = None
    tags = {"sweep.role": tracking.TRIAL_ROLE if cfg.trial.number is not None else "run"}
    if cfg.trial.number is not None:
        assert study is not None, "a sweep job needs the study's name and storage"
        trial = job_trial(study.name, study.storage, study.pruner, cfg.trial.id)
        tags |= {
            "optuna.study_name": study.name,
            "optuna.trial_number": str(cfg.trial.number),
            "optuna.state": "RUNNING",
        }
    name = f"trial-{cfg.trial.number}" if trial is not None else "single-run"
    run_id = tracking.start_run(
        client, experiment, name, flatten(cfg), tags, parent_run_id=cfg.trial.parent_run_id
    )
    if trial is not None:
        trial.set_user_attr("mlflow_run_id", run_id)

    logger_cb = EpochLogger(client, run_id)
    pruning = PruningCheck(trial, cfg.metric) if trial is not None else None
    started = time.perf_counter()
    try:
        data = load_mnist(
            start_dir / cfg.data.root,
            batch_size=cfg.data.batch_size,
            val_size=cfg.data.val_size,
            seed=cfg.seed,
            device=device,
            download=False,
        )
        model = MNISTClassifier(dropout=cfg.model.dropout, lr=cfg.model.lr)
        trainer = build_trainer(
            device,
            callbacks=[logger_cb] + ([pruning] if pruning else []),
            verbose=verbose,
            max_epochs=cfg.trainer.max_epochs,
            devices=cfg.trainer.devices,
            limit_train_batches=cfg.trainer.limit_train_batches,
            deterministic=cfg.trainer.deterministic,
        )
        trainer.fit(model, train_dataloaders=data.train, val_dataloaders=data.val)
        value = trainer.callback_metrics[cfg.metric].item()
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{cfg.metric} is {value} after training: the trial diverged")
        seconds = time.perf_counter() - started
        tracking.log_metrics(client, run_id, {"train_seconds": seconds}, step=0)
        if pruning is not None and pruning.pruned_at_epoch is not None:
            tracking.end_run(
                client,
                run_id,
                "KILLED",
                {"optuna.state": "PRUNED", "pruned_at_epoch": pruning.pruned_at_epoch},
            )
            raise optuna.TrialPruned(
                f"pruned at epoch {pruning.pruned_at_epoch} with {cfg.metric}={value:.4f}"
            )
        if trial is not None:  # the sweep publishes the best trial's own weights, not a rerun
            save_checkpoint(client, run_id, model)
        tracking.end_run(client, run_id, "FINISHED", {"optuna.state": "COMPLETE"} if trial else {})
        return value
    except optuna.TrialPruned:
        raise
    except Exception as err:
        tracking.end_run(
            client,
            run_id,
            "FAILED",
            {"optuna.state": "FAIL", "failure_reason": f"{type(err).__name__}: {err}"},
        )
        raise
    except BaseException as err:  # Ctrl-C (Lightning turns it into SystemExit) or a kill signal
        tracking.end_run(
            client,
            run_id,
            "KILLED",
            {"optuna.state": "FAIL", "failure_reason": f"interrupted ({type(err).__name__})"},
        )
        raise
