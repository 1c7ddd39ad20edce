"""A toy with a conditional param: `optimizer.name` searched with choice(adam, sgd) in the
grammar, `optimizer.momentum` suggested by `space` below only where the optimizer is sgd (the
README's example). No torch: the "loss" is a formula of the params. Its switches: per-epoch
reports and checkpoints (as curve_app.py), two objectives.
"""

import time

import hydra
from omegaconf import DictConfig

from mlflow_study_sweeper import checkpoint_saved, continues, report


def space(cfg: DictConfig, trial) -> None:
    """hydra.sweeper.search_space: momentum exists only for SGD."""
    if trial.params["optimizer.name"] == "sgd":
        trial.suggest_float("optimizer.momentum", 0.0, cfg.max_momentum)


def check(cfg: DictConfig) -> None:
    """hydra.sweeper.check: a momentum above momentum_limit cannot run."""
    if cfg.optimizer.momentum > cfg.momentum_limit:
        raise ValueError(f"momentum {cfg.optimizer.momentum} is above {cfg.momentum_limit}")


@hydra.main(version_base="1.3", config_path=".", config_name="optimizer")
def main(cfg: DictConfig) -> float:
    opt = cfg.optimizer
    if opt.name == "adam" and opt.momentum != 0.0:
        # an earlier SGD trial's momentum must not stay in the config of a later Adam trial
        raise ValueError(f"adam was given the momentum {opt.momentum} of another trial")
    loss = (cfg.lr - 0.01) ** 2 * 1e4 + (0.3 if opt.name == "adam" else (opt.momentum - 0.9) ** 2)
    continuation = continues() if cfg.checkpoint else None
    for epoch in range(continuation.step + 1 if continuation else 0, cfg.epochs):
        time.sleep(cfg.epoch_seconds)
        if report(loss * (1 + 1 / (epoch + 1)), step=epoch, total=cfg.epochs):
            break
        if cfg.checkpoint:
            checkpoint_saved(epoch)
    if cfg.pareto:  # a second objective: SGD is cheaper
        return {"loss": loss, "cost": 1.0 if opt.name == "adam" else 0.5 + opt.momentum}
    return loss


if __name__ == "__main__":
    main()
