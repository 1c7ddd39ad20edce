"""Config composition: the defaults the README promises, and typos that must fail."""

import re

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from mnist_sweep import REPO
from omegaconf import OmegaConf

from mnist.config import ConfigValueError, check_config, flatten, register_configs

register_configs()


def load(*overrides: str, hydra: bool = False):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def test_defaults():
    cfg = load(hydra=True)
    assert cfg.seed == 42 and cfg.metric == "val_acc"
    assert cfg.data.root == "data/" and cfg.data.batch_size == 64 and cfg.data.val_size == 5000
    assert cfg.model.dropout == 0.1 and cfg.model.lr == 1e-3
    assert cfg.trainer.accelerator == "auto"
    assert cfg.mlflow.tracking_uri == "sqlite:///mlflow.db"
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("MlflowStudySweeper")
    assert sweeper.n_trials == 20 and sweeper.direction == "maximize"
    assert sweeper.storage == "sqlite:///optuna.db"
    assert sweeper.sampler == "tpe" and sweeper.pruner == "median"
    # the app feeds the sweeper from its own keys
    assert sweeper.seed == 42 and sweeper.metric == "val_acc"
    assert sweeper.tracking_uri == "sqlite:///mlflow.db"
    assert sweeper.experiment_name == "mnist-sweep"
    assert sweeper.registry.name == "mnist-cnn" and sweeper.registry.metric == "test_acc"
    assert dict(sweeper.params) == {
        "model.dropout": "interval(0.0, 0.5)",
        "model.lr": "tag(log, interval(1e-4, 1e-2))",
    }
    check_config(cfg)


@pytest.mark.parametrize("override", ["model.dropuot=0.2", "trainer.max_epoch=3", "lr=0.1"])
def test_typo_in_an_override_is_an_error(override):
    with pytest.raises(ConfigCompositionException):
        load(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dropout=1.0", "model.dropout=1.0 must be in [0, 1)"),
        ("model.dropout=-0.1", "must be in [0, 1)"),
        ("model.lr=0", "model.lr=0.0 must be > 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be >= 1"),
        ("metric=acc", "metric='acc' must be one of val_acc, val_loss"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 trains nothing"),
        ("trainer.devices=2", "trainer.devices=2 needs trainer.strategy=ddp"),
        ("trainer.devices=0", "trainer.devices=0 must be a count of devices, 1 or more"),
        ("trainer.strategy=ddp_spawn", "trainer.strategy='ddp_spawn': this app trains with"),
        ("trainer.strategy=fsdp", "FSDP and DeepSpeed are not supported"),
    ],
)
def test_values_that_cannot_train(override, message):
    with pytest.raises(ConfigValueError, match=re.escape(message)):
        check_config(load(override))


@pytest.mark.parametrize(
    "overrides", [("trainer.devices=2", "trainer.strategy=ddp"), ("trainer.strategy=ddp",)]
)
def test_several_devices_train_with_ddp(overrides):
    check_config(load(*overrides))


def test_flatten_gives_dotted_keys():
    flat = flatten(load())
    assert flat["model.lr"] == 1e-3 and flat["data.batch_size"] == 64
    assert OmegaConf.is_config(load())


def test_the_direction_follows_the_metric():
    assert load("metric=val_loss", hydra=True).hydra.sweeper.direction == "minimize"
    assert load(hydra=True).hydra.sweeper.direction == "maximize"
