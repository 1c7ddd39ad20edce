"""hydra-optuna-mlflow-sweeper's example app, as its README shows it: its own sweeper, under the
name this sweeper once had (`mlflow_optuna`)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="quadratic")
def main(cfg: DictConfig) -> float:
    return (cfg.x - 1.0) ** 2


if __name__ == "__main__":
    main()
