"""The job API under its first name: `from mlflow_study_sweeper import report` is the short one.

Kept so that jobs written against 0.2 (`from hydra_plugins.mlflow_study_sweeper.job import
report, PruningCallback`) run unchanged; both names are the same objects. Hydra's plugin scan
imports this module: the package it re-exports loads the standard library only.
"""

from typing import Any

import mlflow_study_sweeper

__all__ = mlflow_study_sweeper.__all__


def __getattr__(name: str) -> Any:
    return getattr(mlflow_study_sweeper, name)  # PruningCallback, loaded on first use
