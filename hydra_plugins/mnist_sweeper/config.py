"""The sweeper's settings under hydra.sweeper, stored with Hydra's ConfigStore."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mnist.study import PRUNERS, SAMPLERS


@dataclass
class MnistOptunaSweeperConf:
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    _target_: str = "hydra_plugins.mnist_sweeper.sweeper.MnistOptunaSweeper"
    # the sweeper builds sampler and pruner itself (a grid sampler needs the search space)
    _recursive_: bool = False
    # group hydra/sweeper/sampler (tpe, random, cmaes, gp, grid, qmc), or a short name, or a
    # mapping with _target_ and arguments
    sampler: Any = MISSING
    # group hydra/sweeper/pruner (median, percentile, successive_halving, hyperband, threshold,
    # none), or a short name, null, or a mapping with _target_ and arguments
    pruner: Any = MISSING
    # maximize or minimize; must agree with the app's `metric`
    direction: str = "maximize"
    # the study ends with this many finished (complete or pruned) trials, across all workers
    n_trials: int = 20
    # trials trained at once on this machine, each in its own worker process
    n_jobs: int = 1
    # sqlite:///file.db, postgresql://..., a .journal file path, or null (memory, one process)
    storage: Any = "sqlite:///optuna.db"
    # the same name and storage continue the same study
    study_name: str = "mnist-cnn"
    # the sweep stops once failed trials exceed this share of max(n_trials, trials run);
    # 0 stops at the first failure, 1 never stops
    max_failure_rate: float = 0.25
    # search space: dotted config key -> Hydra override grammar, e.g. interval(0.0, 0.5)
    params: dict[str, Any] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="mnist_optuna", node=MnistOptunaSweeperConf, provider="mnist"
)
for name, node in SAMPLERS.items():
    seeded = node if name == "grid" else {**node, "seed": "${seed}"}  # the app's seed
    ConfigStore.instance().store(
        group="hydra/sweeper/sampler", name=name, node=seeded, provider="mnist"
    )
for name, node in PRUNERS.items():
    ConfigStore.instance().store(
        group="hydra/sweeper/pruner", name=name, node=node, provider="mnist"
    )
