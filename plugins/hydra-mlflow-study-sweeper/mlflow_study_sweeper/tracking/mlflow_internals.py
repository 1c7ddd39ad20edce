"""The one place that touches MLflow's private names; tests/test_relay.py pins them.

MLflow builds the store of a tracking URI, and the artifact repository of an artifact URI, from
registries keyed by scheme; its public API offers entry points, which would change the scheme's
store for every program in the environment. The sweep replaces the builders of its own
process only (see _relay), through the functions here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def tracking_store_builder(scheme: str) -> Callable[..., Any]:
    from mlflow.tracking._tracking_service import utils

    return utils._tracking_store_registry._registry[scheme]


def set_tracking_store_builder(scheme: str, builder: Callable[..., Any]) -> None:
    """This process's store for `scheme` URIs; stores built before are forgotten."""
    from mlflow.tracking._tracking_service import utils

    utils._tracking_store_registry.register(scheme, builder)
    utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()


def artifact_repository_builder(scheme: str) -> Callable[..., Any]:
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

    return _artifact_repository_registry._registry[scheme]


def set_artifact_repository_builder(scheme: str, builder: Callable[..., Any]) -> None:
    """This process's artifact repository for `scheme` URIs; repositories cached per run are
    forgotten."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry
    from mlflow.tracking._tracking_service import utils

    _artifact_repository_registry.register(scheme, builder)
    utils._artifact_repos_cache.clear()
