"""The sweeper's settings under hydra.sweeper, stored with Hydra's ConfigStore.

Imported by Hydra's plugin scan: keep it to the standard library and Hydra.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class RegistryConf:
    # the MLflow model the best run holds (logged by the job or the publish hook); null: the
    # sweep registers nothing
    model: Any = None
    # registered model name; null: nothing is registered
    name: Any = None
    # the alias that moves to a new version only when `metric` improves on the current holder's
    alias: str = "champion"
    # a metric of the best run that ranks versions (null: the sweep's own metric)
    metric: Any = None
    # maximize or minimize `metric`; null: the study's direction
    direction: Any = None


@dataclass
class ChampionConf:
    # multi-objective sweeps only: which run of the Pareto front is "best" (tagged best_run,
    # published, registered). `by`: an objective's name (its best value on the front; null: the
    # first objective), or knee (the member closest to the ideal point, objectives scaled to
    # [0, 1] over the front)
    by: Any = None
    # constraints the champion must meet, e.g. ["n_params <= 200000"] (<=, <, >=, >); when no
    # run of the front meets them, the sweep says so and publishes nothing
    where: list[Any] = field(default_factory=list)


@dataclass
class ResourcesConf:
    # what each worker (a local process, a Ray actor, a Slurm worker) holds. cpu: cores, its
    # torch threads (null: the machine's cores shared evenly among the local workers; 1 on Ray
    # and Slurm). gpu: GPUs, below 1 to share one GPU among several workers (0.25: four; on
    # Slurm, four workers in one task with --gres=gpu:1); null: locally, the visible GPUs dealt
    # round robin (none if there are none), none on Ray and Slurm
    cpu: Any = None
    gpu: Any = None


@dataclass
class RetryConf:
    # attempts after the first for a trial that failed of something listed in `on`, each a new
    # trial with the same parameters (continuing from its checkpoint when it saved one); 0: none
    max: int = 0
    # what is transient: exception types (torch.OutOfMemoryError, ConnectionError; a subclass
    # matches) or message patterns (regular expressions: "CUDA out of memory"), matched against
    # the job's error and every error it was raised from
    on: list[Any] = field(default_factory=list)


@dataclass
class RayConf:
    # a running Ray cluster to join: auto, ray://head:10001, head:6379; null: RAY_ADDRESS if
    # set, else a Ray instance started on this machine for this sweep and stopped at its end
    address: Any = None
    # Ray's runtime_env for the workers, e.g. {working_dir: ., excludes: [data, multirun]}
    # to upload the app's folder to every node, or {pip: [...]}; null: none (the app and this
    # sweeper installed on every node, as in a cluster's image)
    runtime_env: Any = None


@dataclass
class SlurmConf:
    # backend=slurm: the sbatch options of the workers' array job (null: Slurm's defaults); time
    # as Slurm writes it (4:00:00, 2-00:00:00)
    partition: Any = None
    time: Any = None
    account: Any = None
    qos: Any = None
    # seconds before the time limit at which Slurm signals a task (--signal=B:USR1@lead, with
    # --requeue): its workers stop their trials at the next epoch, checkpointed, and leave for a
    # fresh task. Longer than an epoch and its checkpoint; Slurm may signal up to 60 s early
    signal_lead: int = 300
    # true: this command submits the tasks and exits (it prints how to watch the sweep); the
    # tasks' workers train as peers, and the last to finish does the end, once
    detach: bool = False
    # further sbatch options, without their dashes: {constraint: a100, mem: 16G, exclusive: ""}
    options: dict[str, Any] = field(default_factory=dict)
    # shell lines each task runs before its workers: [module load cuda, source venv/bin/activate]
    setup: list[str] = field(default_factory=list)


@dataclass
class MlflowStudySweeperConf:
    _target_: str = "hydra_plugins.mlflow_study_sweeper.mlflow_study_sweeper.MlflowStudySweeper"
    # the sweeper builds sampler, pruner and hooks itself, when the sweep starts
    _recursive_: bool = False
    # tpe, random, cmaes, gp, grid, qmc, nsga2, nsga3; or a mapping {name: tpe, n_startup_trials:
    # 5}, or one with _target_ naming any Optuna sampler class
    sampler: Any = "tpe"
    # median, percentile, successive_halving, hyperband, threshold, none (or null); or a mapping
    # as for the sampler
    pruner: Any = "median"
    # seeds the sampler (the process that creates the study keeps it; others reseed)
    seed: Any = None
    # maximize or minimize the value the task function returns; a list ([maximize, minimize])
    # for several objectives, each named in `metric`
    direction: Any = "maximize"
    # the name of that value: progress lines, the child run's metric, best_<metric> on the parent.
    # Several objectives: a list of names ([val_acc, n_params]); the task function then returns
    # a dict with those keys, and per-epoch reports are values of the first
    metric: Any = "value"
    # several objectives: which run of the Pareto front is the champion (see ChampionConf)
    champion: ChampionConf = field(default_factory=ChampionConf)
    # the study ends with this many finished (complete or pruned) trials, across all workers
    n_trials: int = 20
    # trials trained at once, each by its own worker: local processes (this one among them),
    # or Ray actors (backend: ray)
    n_jobs: int = 1
    # local: worker processes on this machine; ray: workers as Ray actors, placed by Ray on
    # the nodes of a cluster with the resources below (pip install '...[ray]'); slurm: workers
    # as the tasks of one sbatch --array job, with the resources below and `slurm`'s options
    backend: str = "local"
    resources: ResourcesConf = field(default_factory=ResourcesConf)
    ray: RayConf = field(default_factory=RayConf)
    slurm: SlurmConf = field(default_factory=SlurmConf)
    # sqlite:///file.db, postgresql://..., a .journal file path, or null (memory, one process);
    # SWEEP_STORAGE_URL in the environment keeps a password off the command line
    storage: Any = "${oc.env:SWEEP_STORAGE_URL,sqlite:///optuna.db}"
    # the same name and storage continue the same study
    study_name: str = "sweep"
    # the sweep stops once the trials that failed since this command started exceed this share
    # of max(n_trials, trials run); 0 stops at the first failure, 1 only after 2 x n_trials + 10
    max_failure_rate: float = 0.25
    # a trial that fails of something transient is tried again (see RetryConf); default: never
    retry: RetryConf = field(default_factory=RetryConf)
    # seconds a trial may run before it is failed with reason `timeout`; null: no limit
    trial_timeout: Any = None
    # a wall-clock budget for this command, e.g. 45m, 2h, 90s: no trial starts that cannot end
    # in time, running trials stop at their next report, and time is kept for the end
    timeout: Any = None
    # a finished trial's checkpoints (a job's resume/ artifacts, see job.checkpoint_saved):
    # false removes them, true keeps the last one; an interrupted trial keeps its own until the
    # trial that continues it finishes
    keep_checkpoints: bool = False
    # parameter sets tried first, e.g. [{model.dropout: 0.1, model.lr: 0.001}]
    enqueue: list[Any] = field(default_factory=list)
    # another study in the same storage, or runs:/<parent run id> of an earlier sweep in this
    # MLflow store: its complete trials that fit this search space are given to the sampler as
    # prior knowledge (imported once; not trained, not counted)
    warm_start_from: Any = None
    # search space: dotted config key -> Hydra override grammar, e.g. interval(0.0, 0.5)
    params: dict[str, Any] = field(default_factory=dict)
    # a search space in Python: pkg.module.fn, called for each trial as fn(cfg, trial) with the
    # composed config and the Optuna trial after the params above were asked (trial.params has
    # them); it suggests more with trial.suggest_*(dotted key, ...), conditional ones included
    # ('+key' adds a key the config lacks). Checked, and drawn on the corners, before anything
    # is created; not with the grid sampler
    search_space: Any = None
    # Hydra's optuna sweeper's name for search_space, so that its configs run unchanged (set one
    # of the two, or both to the same function)
    custom_search_space: Any = None
    # true: print where the sweep of this command stands (its trials by state, who trains what,
    # the best so far, the time left), read from its study, and exit; nothing is created
    status: bool = False
    # true: ask the running sweep of this command to stop early and exit: its workers stop their
    # trials at the next epoch, checkpointed, start no other, and the sweep ends once with the
    # trials it has; the same command without it resumes the sweep
    cancel: bool = False
    # MLflow: where runs go (null: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db) and the
    # experiment (null: the Hydra job's name)
    tracking_uri: Any = None
    experiment_name: Any = None
    # optional: a function (_target_) called with each corner of the search space's composed
    # config before anything is created; a ValueError it raises stops the sweep with one line
    check: Any = None
    # optional: a function (_target_) called once at the end with run_id= (the best run) and
    # config= (its composed config), e.g. to evaluate it on a test set and log an MLflow model
    publish: Any = None
    # register the best run's MLflow model and move an alias (see RegistryConf)
    registry: RegistryConf = field(default_factory=RegistryConf)
    # heartbeat of a trial in an RDB storage: a trial silent for `grace` seconds is failed by
    # any worker of the study (a worker on another machine died)
    heartbeat_interval: int = 10
    heartbeat_grace: int = 60
    # a PostgreSQL or MySQL storage that cannot be reached (a restart, a failover): calls wait
    # for it this long (10m, 1h, seconds), then the sweep stops with one Error line and a rerun
    # resumes. Heartbeats are not judged until `heartbeat_grace` after it is back
    storage_outage_limit: Any = "10m"


# `mlflow_study`: no other Hydra plugin on PyPI registers this sweeper name (checked on
# 2026-11-29; `mlflow_optuna` is hydra-optuna-mlflow-sweeper's)
ConfigStore.instance().store(
    group="hydra/sweeper",
    name="mlflow_study",
    node=MlflowStudySweeperConf,
    provider="hydra-mlflow-study-sweeper",
)
