"""Sweep the MNIST CNN: `python sweep.py -m` runs the Optuna study in conf/; without -m, one run."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra_plugins.mlflow_study_sweeper.cli import quote_search_space_args
from omegaconf import DictConfig

from mnist.config import register_configs
from mnist.errors import UserFacingError
from mnist.train import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg, start_dir=HydraConfig.get().runtime.cwd)
    except UserFacingError as err:
        if "-m" in sys.argv or "--multirun" in sys.argv:
            raise  # the sweeper records it as the trial's failure
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    sys.argv[1:] = quote_search_space_args(sys.argv[1:])
    main()
