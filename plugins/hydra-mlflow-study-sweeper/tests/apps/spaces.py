"""Search-space functions for app.py (x, y) that the sweeper must refuse, and one it takes."""

from omegaconf import DictConfig


def adds_w(cfg: DictConfig, trial) -> None:
    trial.suggest_float("+w", 0.0, 1.0)  # a new key, as in Hydra's example


def adds_mode_or_null(cfg: DictConfig, trial) -> None:
    trial.suggest_categorical("+mode", [None, "fast"])  # a choice of null (the grammar has none)


def adds_w_as_int(cfg: DictConfig, trial) -> None:
    trial.suggest_int("+w", 0, 1)  # adds_w's param, of another kind


def suggests_missing_key(cfg: DictConfig, trial) -> None:
    trial.suggest_float("w", 0.0, 1.0)  # w is not in the config, and no +


def adds_existing_key(cfg: DictConfig, trial) -> None:
    trial.suggest_int("+epochs", 1, 3)  # epochs is in the config already


def redefines_x(cfg: DictConfig, trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)  # the grammar searches x over (-5.5, 5.5)


def redefines_x_as_choice(cfg: DictConfig, trial) -> None:
    trial.suggest_categorical("x", [0.0, 1.0])  # a kind Optuna itself refuses to mix


def one_argument(trial) -> None:
    trial.suggest_float("+w", 0.0, 1.0)


def raises(cfg: DictConfig, trial) -> None:
    raise RuntimeError("the function is broken")


def sets_the_config(cfg: DictConfig, trial) -> None:
    cfg.x = 1.0  # the config it is given is read-only


def not_a_key(cfg: DictConfig, trial) -> None:
    trial.suggest_float("a b", 0.0, 1.0)


NOT_A_FUNCTION = 3


def x_and_y(cfg: DictConfig, trial) -> None:
    """The whole space in Python (hydra.sweeper.params empty)."""
    trial.suggest_float("x", -1.0, 1.0)
    trial.suggest_float("y", -1.0, 1.0)


def fails_on_trial_1(cfg: DictConfig, trial) -> None:
    """Fine on the checks' corners (throwaway trials numbered 0), wrong on the sweep's trial 1."""
    if trial.number == 1:
        trial.suggest_float("w", 0.0, 1.0)


def suggests_w_twice(cfg: DictConfig, trial) -> None:
    trial.suggest_float("+w", 0.0, 1.0)
    trial.suggest_float("++w", 0.0, 1.0)  # the same config key under another Optuna name
