"""The Hydra-facing sweeper: keeps its settings, and hands the sweep to the lazily imported core."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.mlflow_study_sweeper.config import (
    MlflowStudySweeperConf,
    RayConf,
    RegistryConf,
    ResourcesConf,
    RetryConf,
    SlurmConf,
)


class MlflowStudySweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        plain = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in settings.items()
        }
        # the nested settings as their dataclasses (champion stays a mapping: _objectives reads it)
        nested = {
            "registry": RegistryConf,
            "resources": ResourcesConf,
            "ray": RayConf,
            "retry": RetryConf,
            "slurm": SlurmConf,
        }
        for key, kind in nested.items():
            plain[key] = kind(**(plain.get(key) or {}))
        self.settings = MlflowStudySweeperConf(**plain)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def sweep(self, arguments: list[str]) -> Any:
        from mlflow_study_sweeper import contract

        if contract.is_rank_job():  # the command started again by a trial's job, as a rank
            from mlflow_study_sweeper.trial.ranks import run_rank_job

            return run_rank_job(self.hydra_context, self.task_function, self.config)
        # optuna and mlflow load here, when a sweep runs, not when Hydra scans plugins
        from mlflow_study_sweeper.sweep.command import run_sweep

        return run_sweep(
            self.settings, self.hydra_context, self.task_function, self.config, arguments
        )
