"""Sweep the MNIST CNN: `python sweep.py -m` runs the Optuna study in conf/; without -m, one run."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hydra_plugins.mnist_sweeper.search_space import quote_cli_params
from mnist.config import register_configs
from mnist.errors import UserFacingError
from mnist.tracking import absolute_uri
from mnist.train import StudyRef, run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    study = None
    if in_sweep:
        sweeper = hydra_cfg.sweeper
        storage = absolute_uri(sweeper.storage, hydra_cfg.runtime.cwd) if sweeper.storage else None
        study = StudyRef(name=sweeper.study_name, storage=storage, pruner=sweeper.pruner)
    try:
        return run(cfg, study=study, in_sweep=in_sweep, start_dir=hydra_cfg.runtime.cwd)
    except UserFacingError as err:
        if in_sweep:
            raise  # the sweeper records it as the trial's failure
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv[1:] = quote_cli_params(sys.argv[1:])
    main()
