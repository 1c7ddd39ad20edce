"""Typed schema of the app config (values live in conf/), and checks Hydra cannot express."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mnist.errors import ConfigValueError


@dataclass
class DataConfig:
    root: str = MISSING  # folder holding MNIST/raw/ (torchvision's layout); relative to the cwd
    batch_size: int = MISSING  # training batch size
    val_size: int = MISSING  # images held out of the training set for validation (seeded)
    download: bool = True  # try torchvision's download when the files are missing


@dataclass
class ModelConfig:
    dropout: float = MISSING  # dropout before the last layer, in [0, 1)
    lr: float = MISSING  # Adam learning rate, > 0
    # multiplies the conv channels and the hidden FC units; 1.0 is the given CNN (32/64/128, 625)
    width: float = 1.0


@dataclass
class TrainerConfig:
    max_epochs: int = MISSING
    accelerator: str = "auto"  # cpu, gpu, mps or auto
    devices: int = 1  # devices (processes) per trial; more than 1 needs strategy=ddp
    strategy: str = "auto"  # auto (one device) or ddp (Lightning starts a process per device)
    limit_train_batches: Any = 1.0  # a fraction or a count of batches per epoch (quick runs)
    deterministic: bool = False  # torch deterministic algorithms (slower on GPU)
    # who lays out a run's processes: local = Lightning, on the devices given (also inside a Slurm
    # task); slurm = Slurm's tasks, for one run started by srun with a task per device
    cluster: str = "local"
    verbose: Any = (
        None  # Lightning's banners and progress bars: null = on for a run, off in a sweep
    )


@dataclass
class MLflowConfig:
    tracking_uri: str = MISSING  # sqlite:///mlflow.db, http://host:5000, ...
    experiment_name: str = MISSING
    registered_model_name: str = "mnist-cnn"


@dataclass
class AppConfig:
    seed: int = MISSING
    # the validation metric the study optimises: val_acc or val_loss; or a list for several
    # objectives, e.g. [val_acc, n_params] (the first one a validation metric: it is reported per
    # epoch, for pruning)
    metric: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)


METRICS = {"val_acc": "maximize", "val_loss": "minimize"}
COSTS = {"n_params": "minimize"}  # known before training; a second objective only


def register_configs() -> None:
    ConfigStore.instance().store(name="app_schema", node=AppConfig)
    # the sweep's direction follows `metric` (conf/sweep/optuna.yaml)
    OmegaConf.register_new_resolver("direction_of", direction_of, replace=True)


def direction_of(metric: Any) -> Any:
    """maximize val_acc, minimize val_loss and n_params; a list for a list."""
    if isinstance(metric, str):
        return (METRICS | COSTS).get(metric, "maximize")
    return [direction_of(m) for m in metric]


def metrics_of(cfg: DictConfig | AppConfig) -> list[str]:
    return [cfg.metric] if isinstance(cfg.metric, str) else list(cfg.metric)


def check_config(cfg: DictConfig | AppConfig) -> None:
    """Raise ConfigValueError for values that are well typed but cannot train."""
    problems = []
    if not 0.0 <= cfg.model.dropout < 1.0:
        problems.append(f"model.dropout={cfg.model.dropout} must be in [0, 1)")
    if not cfg.model.lr > 0:
        problems.append(f"model.lr={cfg.model.lr} must be > 0")
    if cfg.data.batch_size < 1:
        problems.append(f"data.batch_size={cfg.data.batch_size} must be >= 1")
    if cfg.data.val_size < 1:
        problems.append(f"data.val_size={cfg.data.val_size} must be >= 1")
    if cfg.trainer.max_epochs < 1:
        problems.append(f"trainer.max_epochs={cfg.trainer.max_epochs} must be >= 1")
    if cfg.trainer.limit_train_batches == 0:
        problems.append("trainer.limit_train_batches=0 trains nothing: use a fraction or a count")
    problems += check_devices(cfg.trainer.devices, cfg.trainer.strategy)
    if cfg.trainer.cluster not in ("local", "slurm"):
        problems.append(f"trainer.cluster={cfg.trainer.cluster!r} must be local or slurm")
    if not 0.0 < cfg.model.width <= 4.0:
        problems.append(f"model.width={cfg.model.width} must be in (0, 4]")
    names = metrics_of(cfg)
    if not names or names[0] not in METRICS:
        problems.append(f"metric={cfg.metric!r} must be one of {', '.join(METRICS)}")
    elif len(names) > 1 and any(n not in METRICS | COSTS for n in names[1:]):
        known = ", ".join(METRICS | COSTS)
        problems.append(f"metric={list(names)}: each must be one of {known}")
    elif len(set(names)) != len(names):
        problems.append(f"metric={list(names)} names an objective twice")
    if problems:
        raise ConfigValueError("; ".join(problems))


STRATEGIES = ("auto", "ddp")


def check_devices(devices: Any, strategy: str) -> list[str]:
    """Several devices per trial: with Lightning's DDP, which starts a process per device."""
    if strategy not in STRATEGIES:
        return [
            f"trainer.strategy={strategy!r}: this app trains with auto (one device) or ddp "
            f"(one process per device, started by Lightning; ddp_spawn, FSDP and DeepSpeed "
            f"are not supported)"
        ]
    if not isinstance(devices, int) or devices < 1:
        return [f"trainer.devices={devices!r} must be a count of devices, 1 or more"]
    if devices > 1 and strategy != "ddp":
        return [
            f"trainer.devices={devices} needs trainer.strategy=ddp (a process per device); "
            f"or run trials in parallel with hydra.sweeper.n_jobs instead"
        ]
    return []


def preflight(cfg: DictConfig) -> None:
    """The sweep's check hook: values that cannot train, and the data they need."""
    from mnist.data import check_sizes, ensure_mnist

    check_config(cfg)
    if cfg.trainer.cluster == "slurm":
        raise ConfigValueError(
            "trainer.cluster=slurm: a sweep's trial runs in its worker's process, not as tasks "
            "that srun started; use trainer.cluster=local (Lightning lays out the trial's "
            "processes on the devices its worker was given, inside a Slurm task too)"
        )
    root = ensure_mnist(cfg.data.root, download=cfg.data.download)
    check_sizes(root, cfg.data.batch_size, cfg.data.val_size)


def flatten(cfg: DictConfig, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resolved config as dotted keys, e.g. {'model.lr': 0.001}."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    container = OmegaConf.to_container(cfg, resolve=True)
    for key, value in container.items():
        if key not in skip:
            walk(value, f"{key}.")
    return out
