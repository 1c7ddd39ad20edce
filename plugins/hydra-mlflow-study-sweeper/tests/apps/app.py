"""Sweep your own Hydra app: `python app.py -m` searches x and y to minimise x^2 + y^2.

The app knows nothing of Optuna or MLflow: config.yaml picks the mlflow_study sweeper, which
asks the study for x and y, runs main() once per trial in an MLflow child run (params x, y and
the returned value as metric `value`), and tags the best run at the end.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> float:
    return cfg.x**2 + cfg.y**2


if __name__ == "__main__":
    main()
