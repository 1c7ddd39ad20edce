"""Everything that can be wrong with a sweep's settings, found before anything is created."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import optuna
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.backends import ray, slurm
from mlflow_study_sweeper.backends.local import WorkerSettings, gpu_assignment, visible_gpus
from mlflow_study_sweeper.end.finish import EndPlan, Registration
from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.keys import config_key
from mlflow_study_sweeper.search import grammar
from mlflow_study_sweeper.search.objectives import MULTI_OBJECTIVE_REFUSED, Objectives
from mlflow_study_sweeper.search.samplers import is_grid, make_pruner, make_sampler
from mlflow_study_sweeper.search.space_function import SearchFunction, SearchFunctionError
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.storage.outages import DEFAULT_LIMIT_S
from mlflow_study_sweeper.storage.studies import StudySettings, check_storage
from mlflow_study_sweeper.sweep.loop import LoopSettings
from mlflow_study_sweeper.sweep.status import StatusPlan
from mlflow_study_sweeper.sweep.warm import check_enqueue
from mlflow_study_sweeper.tracking import store
from mlflow_study_sweeper.tracking.store import TrackingSettings
from mlflow_study_sweeper.trial.launch import IN_PROCESS_LAUNCHERS, selects_group
from mlflow_study_sweeper.trial.retry import RetryPolicy

MAX_TRIALS = 1_000_000
MAX_RAY_WORKERS = 10_000
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class Plan:
    """The settings, checked: one small value per layer, each validated once, and what the
    checks built on the way (the space, the composed base config, the sampler and pruner, a
    Ray cluster joined). Nothing after the checks reads the settings themselves."""

    space: dict[str, Any]
    fixed: list[str]
    base: DictConfig
    sampler: optuna.samplers.BaseSampler
    pruner: optuna.pruners.BasePruner
    objectives: Objectives
    study: StudySettings
    tracking: TrackingSettings
    loop: LoopSettings
    workers: WorkerSettings
    end: EndPlan
    seeds: Seeds
    pruner_json: str  # the pruner's settings, for jobs in other processes (contract.PRUNER)
    cluster: Any = None  # the Ray cluster (backends.ray.Cluster) of backend=ray; None: local
    # hydra.sweeper.search_space (or custom_search_space): the function that adds params to
    # each trial after the grammar's; None: the grammar's params alone
    search: SearchFunction | None = None


@dataclass(frozen=True)
class Seeds:
    """What the study is given before its first trial: parameter sets to try first, and an
    earlier study or sweep whose finished trials the sampler learns from."""

    enqueue: list[dict[str, Any]]
    warm_start_from: str | None


class Checks:
    def __init__(self, settings, hydra_context, config: DictConfig, launcher, start_dir) -> None:
        self.s = settings
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = launcher
        self.start_dir = start_dir

    def compose(self, overrides: list[str]) -> DictConfig:
        try:
            return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except HydraException as err:
            raise SweepConfigError(str(err).splitlines()[0]) from None

    @property
    def wants_status(self) -> bool:
        return bool(self.s.status)

    @property
    def wants_cancel(self) -> bool:
        if self.s.cancel and self.s.status:
            raise SweepConfigError(
                "hydra.sweeper.cancel=true and hydra.sweeper.status=true: set one of the two "
                "(cancel, then status to watch the sweep end)"
            )
        return bool(self.s.cancel)

    def status_plan(self) -> StatusPlan:
        """What hydra.sweeper.status=true (and cancel=true) reads: the study's place and name,
        checked, and what it optimises; the search space, the app and the tracking store are not
        needed."""
        s = self.s
        self.check_numbers()
        storage = store.absolute_uri(str(s.storage), self.start_dir) if s.storage else None
        return StatusPlan(
            url=storage,
            name=str(s.study_name),
            objectives=Objectives.from_settings(s.direction, s.metric, s.champion),
            n_trials=s.n_trials,
            n_jobs=s.n_jobs,
        )

    def plan(self, arguments: list[str]) -> Plan:
        """Every setting checked, and both stores probed without creating anything."""
        s = self.s
        self.check_numbers()
        objectives = Objectives.from_settings(s.direction, s.metric, s.champion)
        space, fixed = grammar.parse(s.params, arguments)
        base = self.compose(fixed)
        search = self.search_function(space, base)
        self.check_space(space, base, search)
        self.check_corners(space, fixed, base, search)
        sampler, pruner = self.optimizers(space, objectives, search)
        on_slurm = s.backend == "slurm" and not contract.is_worker()
        if on_slurm:  # sbatch and Slurm's configuration before the stores are probed
            slurm.check_tools()
        storage = self.storage()
        uri = s.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        uri = store.absolute_uri(uri, self.start_dir)
        # before the study exists
        store.check_store(uri, probe_server=not contract.is_worker())
        workers = self.workers()
        if on_slurm:
            self.check_slurm(storage, uri, workers)
        cluster = self.cluster(storage, uri, workers)
        loop = LoopSettings(
            n_trials=s.n_trials,
            max_failure_rate=float(s.max_failure_rate),
            trial_timeout=float(s.trial_timeout) if s.trial_timeout is not None else None,
            grace_s=float(s.heartbeat_grace),
            keep_checkpoints=bool(s.keep_checkpoints),
            n_jobs=s.n_jobs,
            timeout_s=parse_duration(s.timeout),
            retry=RetryPolicy.from_settings({"max": s.retry.max, "on": list(s.retry.on or [])}),
        )
        reg = s.registry
        return Plan(
            space=space,
            fixed=fixed,
            base=base,
            sampler=sampler,
            pruner=pruner,
            objectives=objectives,
            study=StudySettings(
                url=storage,
                name=str(s.study_name),
                objectives=tuple(zip(objectives.names, objectives.directions, strict=True)),
                heartbeat_interval=s.heartbeat_interval,
                heartbeat_grace=s.heartbeat_grace,
                outage_limit_s=self.outage_limit(),
            ),
            tracking=TrackingSettings(
                uri=uri, experiment_name=str(s.experiment_name or self.config.hydra.job.name)
            ),
            loop=loop,
            workers=workers,
            end=EndPlan(
                objectives=objectives,
                n_trials=s.n_trials,
                fixed=fixed,
                compose=self.compose,
                sweep_dir=str(self.config.hydra.sweep.dir),
                grace_s=float(s.heartbeat_grace),
                publish=s.publish,
                registry=Registration(reg.model, reg.name, reg.alias, reg.metric, reg.direction),
            ),
            seeds=Seeds(check_enqueue(s.enqueue, space, search) or [], s.warm_start_from),
            pruner_json=json.dumps(s.pruner),
            cluster=cluster,
            search=search,
        )

    def outage_limit(self) -> float:
        limit = parse_duration(self.s.storage_outage_limit, "storage_outage_limit")
        return DEFAULT_LIMIT_S if limit is None else limit

    def check_numbers(self) -> None:
        s = self.s
        name = str(s.study_name)
        if not STUDY_NAME.fullmatch(name) or ".." in name:
            raise SweepConfigError(
                f"hydra.sweeper.study_name={name!r} is not a usable name: use 1-128 letters, "
                f"digits, '.', '_' or '-' (no '/', '..', spaces or control characters)"
            )
        if not isinstance(s.n_trials, int) or not 1 <= s.n_trials <= MAX_TRIALS:
            raise SweepConfigError(
                f"hydra.sweeper.n_trials={s.n_trials} must be a whole number from 1 to {MAX_TRIALS}"
            )
        if s.backend not in ("local", "ray", "slurm"):
            raise SweepConfigError(
                f"hydra.sweeper.backend={s.backend!r} is not a backend: use local (processes on "
                f"this machine), ray (actors on a Ray cluster) or slurm (an sbatch array job)"
            )
        cores = os.cpu_count() or 1
        most = 4 * cores if s.backend == "local" else MAX_RAY_WORKERS
        if not isinstance(s.n_jobs, int) or not 1 <= s.n_jobs <= most:
            where = f"this machine has {cores} cores" if s.backend == "local" else s.backend
            raise SweepConfigError(
                f"hydra.sweeper.n_jobs={s.n_jobs} must be from 1 to {most} ({where}; each worker "
                f"trains one trial)"
            )
        if not 0.0 <= float(s.max_failure_rate) <= 1.0:
            raise SweepConfigError(
                f"hydra.sweeper.max_failure_rate={s.max_failure_rate} must be in [0, 1]"
            )
        if s.trial_timeout is not None and not (
            isinstance(s.trial_timeout, (int, float)) and 0 < s.trial_timeout < math.inf
        ):
            raise SweepConfigError(
                f"hydra.sweeper.trial_timeout={s.trial_timeout} must be a number of seconds > 0, "
                f"or null for no limit"
            )
        interval, grace = s.heartbeat_interval, s.heartbeat_grace
        if not all(isinstance(v, int) and v >= 1 for v in (interval, grace)) or grace <= interval:
            raise SweepConfigError(
                f"hydra.sweeper.heartbeat_interval={interval} and heartbeat_grace={grace} must be "
                f"whole seconds with grace > interval (a trial silent for `grace` seconds is "
                f"failed; it beats every `interval`): e.g. 10 and 60"
            )

    def workers(self) -> WorkerSettings:
        cpu, gpu = self.s.resources.cpu, self.s.resources.gpu
        for name, value, least in (("cpu", cpu, 0), ("gpu", gpu, -1)):
            if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > least
            ):
                raise SweepConfigError(
                    f"hydra.sweeper.resources.{name}={value!r} must be a number "
                    f"{'> 0' if name == 'cpu' else '>= 0'} (per worker), or null"
                )
        if self.s.backend == "local":
            gpu_assignment(self.s.n_jobs, visible_gpus(), gpu)  # GPUs enough for the workers
        ray = self.s.ray
        return WorkerSettings(
            backend=self.s.backend,
            n_jobs=self.s.n_jobs,
            cpu=cpu,
            gpu=gpu,
            ray_address=ray.address,
            runtime_env=dict(ray.runtime_env) if ray.runtime_env else None,
            slurm=self.slurm() if self.s.backend == "slurm" else None,
        )

    def check_slurm(self, storage: str | None, uri: str, workers: WorkerSettings) -> None:
        """backend=slurm: stores every node reaches, a node of the partition that holds a task,
        and options sbatch accepts (asked with --test-only: nothing is submitted)."""
        slurm.check_stores(storage, uri)
        layout = slurm.Layout.of(workers.n_jobs, workers.cpu, workers.gpu)
        slurm.check_partition(workers.slurm, layout)
        folder = self.start_dir / str(self.config.hydra.sweep.dir) / "slurm"
        slurm.check_submission(workers.slurm, layout, str(self.s.study_name), folder)

    def slurm(self) -> slurm.SlurmSettings:
        """hydra.sweeper.slurm: text options, text setup lines."""
        conf = self.s.slurm
        named = {}
        for key in ("partition", "time", "account", "qos"):
            value = getattr(conf, key)
            if value is not None and (not str(value).strip() or "\n" in str(value)):
                raise SweepConfigError(f"hydra.sweeper.slurm.{key}={value!r} is not an option")
            named[key] = None if value is None else str(value)
        options = {}
        for key, value in dict(conf.options or {}).items():
            if not slurm.OPTION.fullmatch(str(key)) or "\n" in str(value):
                raise SweepConfigError(
                    f"hydra.sweeper.slurm.options.{key}={value!r}: an sbatch option is a name "
                    f"without its dashes (constraint, mem, exclusive) and a one-line value"
                )
            options[str(key)] = "" if value is None else str(value)
        lead = conf.signal_lead
        if isinstance(lead, bool) or not isinstance(lead, int) or not 0 < lead <= 65535:
            raise SweepConfigError(
                f"hydra.sweeper.slurm.signal_lead={lead!r}: the seconds before the time limit at "
                f"which the workers stop, a whole number from 1 to 65535 (Slurm's limit)"
            )
        if not isinstance(conf.detach, bool):
            raise SweepConfigError(f"hydra.sweeper.slurm.detach={conf.detach!r}: true or false")
        settings = slurm.SlurmSettings(
            **named,
            options=options,
            setup=tuple(str(line) for line in conf.setup or []),
            signal_lead=lead,
            detach=conf.detach,
        )
        slurm.check_time_limit(settings)
        return settings

    def cluster(self, storage: str | None, tracking_uri: str, workers: WorkerSettings) -> Any:
        """backend=ray: the cluster joined (or started) and checked; None for local workers."""
        if workers.backend != "ray" or contract.is_worker():
            return None
        cluster = ray.connect(workers.ray_address, workers.runtime_env, self.start_dir)
        try:
            ray.check_cluster(cluster, storage, tracking_uri, workers.cpu or 1, workers.gpu or 0)
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def search_function(self, space: dict[str, Any], base: DictConfig) -> SearchFunction | None:
        """hydra.sweeper.search_space, or Hydra's name for it, custom_search_space: loaded, and
        its signature checked (what it suggests is checked on the corners)."""
        ours = self.s.search_space or None
        hydras = self.s.custom_search_space or None
        if ours is not None and hydras is not None and ours != hydras:
            raise SweepConfigError(
                f"hydra.sweeper.search_space={ours!r} and hydra.sweeper.custom_search_space="
                f"{hydras!r} name two functions: they are one setting under two names "
                f"(custom_search_space is Hydra's optuna sweeper's), so set one of them"
            )
        if ours is None and hydras is None:
            return None
        setting = "search_space" if ours is not None else "custom_search_space"
        return SearchFunction.load(setting, ours or hydras, base, space)

    def check_space(
        self, space: dict[str, Any], base: DictConfig, search: SearchFunction | None = None
    ) -> None:
        if not space and search is None:
            raise SweepConfigError(
                "the search space is empty: set hydra.sweeper.params, e.g. "
                "hydra.sweeper.params.x='interval(0, 1)', or sweep a key: x='interval(0, 1)', "
                "or name a function that suggests params in hydra.sweeper.search_space"
            )
        named = [config_key(k) for k in space]
        twice = sorted({k for k in named if named.count(k) > 1})
        if twice:
            forms = ", ".join(k for k in space if config_key(k) in twice)
            raise SweepConfigError(
                f"the search space names {', '.join(twice)} more than once ({forms}): keep one"
            )
        for key in space:
            # `+key` adds a key the config lacks (Hydra refuses it where the key exists: the
            # corners, composed next, say so)
            if (
                not key.startswith("+")
                and OmegaConf.select(base, key, default="__missing__") == "__missing__"
            ):
                raise SweepConfigError(
                    f"hydra.sweeper.params.{key}: the config has no key {key!r} to search over"
                )

    def optimizers(
        self, space: dict[str, Any], objectives: Objectives, search: SearchFunction | None = None
    ) -> tuple[Any, Any]:
        """The sampler and the pruner, refused where they cannot serve several objectives; a
        grid, where a search-space function defines params as each trial runs."""
        refused = (
            f"a grid sampler cannot take hydra.sweeper.{search.setting}={search.path}: its grid "
            f"is fixed before the first trial, and the function defines params as each trial "
            f"runs; use another sampler (tpe, random, ...), or search a finite space with "
            f"choice(...) and range(...) in hydra.sweeper.params alone"
            if search is not None
            else ""
        )
        if search is not None and is_grid(self.s.sampler):
            raise SweepConfigError(refused)
        sampler = make_sampler(self.s.sampler, self.s.seed, space)
        if search is not None and isinstance(sampler, optuna.samplers.GridSampler):
            raise SweepConfigError(refused)
        pruner = make_pruner(self.s.pruner)
        instead = {
            sampler: "sampler tpe, nsga2 or random",
            pruner: "pruner median, percentile, successive_halving or threshold",
        }
        for part, other in instead.items() if objectives.multi else ():
            if type(part).__name__ in MULTI_OBJECTIVE_REFUSED:
                raise SweepConfigError(
                    f"{type(part).__name__} cannot work with several objectives "
                    f"(hydra.sweeper.direction={list(objectives.directions)}): use {other}"
                )
        return sampler, pruner

    def storage(self) -> str | None:
        """The Optuna storage's URL, probed (None: in memory, where that can work)."""
        s = self.s
        storage = store.absolute_uri(str(s.storage), self.start_dir) if s.storage else None
        launcher = type(self.launcher).__name__
        if storage is None and launcher not in IN_PROCESS_LAUNCHERS:
            raise SweepConfigError(
                f"hydra.sweeper.storage=null keeps the study in memory, which jobs started by "
                f"{launcher} in other processes cannot reach: use sqlite:///optuna.db or "
                f"postgresql://..."
            )
        if storage is None and s.n_jobs > 1:
            raise SweepConfigError(
                "hydra.sweeper.n_jobs > 1 runs workers in separate processes, which need a shared "
                "storage: set hydra.sweeper.storage=sqlite:///optuna.db or postgresql://..."
            )
        if storage is not None:
            check_storage(storage, probe_server=not contract.is_worker())
        return storage

    def check_corners(
        self, space: dict, fixed: list[str], base: DictConfig, search: SearchFunction | None = None
    ) -> None:
        """Every corner of the space composes, and passes the app's own check if it has one.

        A failure that every corner of a key shares (missing data, say) is reported as it is;
        one that only some corners meet names the corner. With a search-space function, each
        corner of the grammar's params is drawn through the function twice, its own params at
        their low ends, then at their high ends (a function alone: those two draws).
        """
        check = instantiate(self.s.check, _partial_=True) if self.s.check else None

        def fails(cfg: DictConfig) -> str | None:
            try:
                check(cfg)
            except (ValueError, LookupError, OSError) as err:
                return str(err)
            return None

        searched: list[tuple[str | None, Any]] = list(space.items())
        if not searched and search is not None:
            searched = [(None, None)]  # the function's params alone
        for key, dist in searched:
            if key is None:
                values: Any = [None]
            elif isinstance(dist, optuna.distributions.CategoricalDistribution):
                values = dist.choices
            else:
                values = (dist.low, dist.high)
            corners = [
                (value, params, self.corner(base, fixed, params, search))
                for value in values
                for params in self.corner_params(space, base, key, value, search)
            ]
            for value, params, cfg in corners if check is not None else []:
                error = fails(cfg)
                if error is None:
                    continue
                others = [fails(c) for v, _, c in corners if v != value] or [fails(base)]
                if all(other == error for other in others):
                    raise SweepConfigError(error)
                drawn = ", ".join(f"{k}={v!r}" for k, v in params.items() if k not in space)
                if key is None:
                    raise SweepConfigError(
                        f"hydra.sweeper.{search.setting}: {search.path} reaches {drawn}, which "
                        f"cannot run: {error}"
                    )
                also = f" (and {search.path} {drawn})" if drawn else ""
                raise SweepConfigError(
                    f"hydra.sweeper.params.{key} = {grammar.describe(dist)} reaches "
                    f"{key}={value}{also}, which cannot run: {error}"
                )
        if check is not None and (error := fails(base)) is not None:
            raise SweepConfigError(error)

    def corner_params(
        self,
        space: dict,
        base: DictConfig,
        key: str | None,
        value: Any,
        search: SearchFunction | None,
    ) -> list[dict[str, Any]]:
        """The values of a corner: `key` at `value`; with a search-space function, the other
        grammar params at the config's values (or an end, where the space lacks that value) and
        the function's params at their low ends, then at their high ends."""
        if search is None:
            return [{key: value}]
        fixed = {}
        for other, dist in space.items():
            current = OmegaConf.select(base, other, default=None)
            if other != key and optuna_internals.contains(dist, current):
                fixed[other] = current
        if key is not None:
            fixed[key] = value
        out: list[dict[str, Any]] = []
        for high in (False, True):
            try:
                params = search.draw(fixed, high=high).params
            except SearchFunctionError as err:
                at = f" (on the corner {key}={value!r})" if key is not None else ""
                raise SweepConfigError(f"hydra.sweeper.{search.setting}: {err}{at}") from None
            if params not in out:
                out.append(params)
        return out

    def corner(
        self,
        base: DictConfig,
        fixed: list[str],
        values: dict[str, Any],
        search: SearchFunction | None = None,
    ) -> DictConfig:
        """The config with `values` set: the base with values set (a type the schema refuses is
        an error, as in Hydra's composition), or composed by Hydra for a config group."""
        choices = base.hydra.runtime.choices
        if any(selects_group(self.hydra_context, choices, name) for name in values):
            return self.compose(fixed + [grammar.as_override(k, v) for k, v in values.items()])
        cfg = copy.deepcopy(base)
        for name, value in values.items():
            try:
                with read_write(cfg), open_dict(cfg):
                    OmegaConf.update(cfg, config_key(name), value, merge=False)
            except OmegaConfBaseException as err:
                where = (
                    f"hydra.sweeper.{search.setting}: {search.path} suggests"
                    if search is not None and name not in search.grammar
                    else f"hydra.sweeper.params.{name} reaches"
                )
                raise SweepConfigError(
                    f"{where} {name}={value!r}, which the config refuses: "
                    f"{str(err).splitlines()[0]}"
                ) from None
        return cfg


def parse_duration(value: Any, key: str = "timeout") -> float | None:
    """hydra.sweeper.timeout (or `key`): 90, 90s, 45m, 2h, 1d -> seconds; null -> None."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
    seconds = (
        float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        if match
        else 0
    )
    if not 0 < seconds < math.inf:
        raise SweepConfigError(
            f"hydra.sweeper.{key}={value!r} is not a duration: use seconds or a number with "
            f"s, m, h or d, e.g. 45m or 2h"
        )
    return seconds
