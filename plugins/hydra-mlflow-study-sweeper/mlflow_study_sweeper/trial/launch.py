"""How one trial's job runs: through the app's Hydra launcher, or in this process as Hydra's
basic launcher runs it, without its per-job copies of the whole config.

Hydra's basic launcher composes the whole config from its files for each job, then `run_job`
deep-copies it four times: 84 ms per trial of the README's app on this project's 2-core machine
(benchmarks/bench_overhead.py), nearly three times an ask, a tell and an MLflow run together,
although a trial changes only the searched values. `InProcessJobs` keeps one config, composed
once with the fixed overrides: per trial it sets the searched values, the job's number,
overrides and environment on it, and runs the job as `hydra.core.utils.run_job` does: the same
job folder, `.hydra/config.yaml`, `hydra.yaml` and `overrides.yaml`, job log, working directory
and environment, the task function given its own copy of the config (tests/test_launch.py
compares the two byte for byte); 9 ms. Where that cannot hold, every trial goes through Hydra:
a searched key that is a config group (`db=choice(mysql, pg)` changes the files the config is
made of), or Hydra callbacks (they may keep the config they are given). Any other launcher
(joblib, submitit, ...) gets the trial's overrides as usual.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from hydra import version
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import (
    JobReturn,
    JobRuntime,
    JobStatus,
    configure_log,
    env_override,
    run_job,
    setup_globals,
)
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.keys import config_key
from mlflow_study_sweeper.search.grammar import as_override
from mlflow_study_sweeper.trial import job_side, ranks
from mlflow_study_sweeper.trial.job_side import TrialReporter
from mlflow_study_sweeper.trial.yaml_files import HydraYaml, YamlTree

IN_PROCESS_LAUNCHERS = ("BasicLauncher",)


class Jobs(Protocol):
    # the job runs in this process: what it reports goes through the reporter it is given
    in_process: bool

    def run(
        self, number: int, values: dict[str, Any], env: dict[str, str], reporter: TrialReporter
    ) -> JobReturn: ...

    def close(self) -> None:
        """After the last trial of this command (a job's logging handed back)."""


def job_error(ret: JobReturn) -> BaseException | None:
    """The exception a job raised (JobReturn.return_value would print and re-raise it)."""
    return ret._return_value if ret.status == JobStatus.FAILED else None


def selects_group(hydra_context: Any, choices: Any, name: str) -> bool:
    """Whether the override `name=value` selects a config group's option (it changes the files
    the config is composed of) rather than setting a value: a group of the defaults list, or,
    with `+`, a group added to it."""
    key = config_key(name)
    if key in choices:
        return True
    return name.startswith("+") and bool(hydra_context.config_loader.get_group_options(key))


def task_overrides(fixed: list[str], values: dict[str, Any]) -> list[str]:
    return [*fixed, *(as_override(k, v) for k, v in values.items())]


def env_overrides(env: dict[str, str]) -> list[str]:
    return [as_override(f"++hydra.job.env_set.{k}", v) for k, v in env.items()]


class LauncherJobs:
    """Each trial through the app's launcher, which composes its config; its job reports from
    its own process, through the storage (trial.job_side.reporter_from_environment)."""

    in_process = False

    def __init__(self, launcher: Any, fixed: list[str]) -> None:
        self.launcher = launcher
        self.fixed = fixed

    def run(
        self, number: int, values: dict[str, Any], env: dict[str, str], reporter: TrialReporter
    ) -> JobReturn:
        task = task_overrides(self.fixed, values)
        env = env | contract.overrides_variable(task)
        (ret,) = self.launcher.launch([task + env_overrides(env)], initial_job_idx=number)
        return ret

    def close(self) -> None:
        pass


class InProcessJobs:
    """Each trial in this process, as Hydra's basic launcher runs it, on one config; what the
    job reports goes through the reporter of its trial, which this launcher serves to it."""

    in_process = True

    def __init__(
        self,
        hydra_context: Any,
        task_function: Any,
        config: DictConfig,
        fixed: list[str],
        base: DictConfig,
    ) -> None:
        """`base`: the job config composed with the fixed overrides alone (see _checks)."""
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config
        self.fixed = fixed
        self.cfg = copy.deepcopy(base)  # the trial's config: changed in place, trial by trial
        self.task = copy.deepcopy(base)  # what the task function gets: copied for each trial
        with read_write(self.task), open_dict(self.task):
            del self.task["hydra"]
        self.base_env = OmegaConf.to_container(base.hydra.job.env_set)
        # config keys the last trial set: one a search-space function suggests only for some
        # trials (a conditional param) gets its composed value back on the others
        self.set_keys: set[str] = set()
        self.raw: dict[str, dict[str, Any]] = {}  # a node of the task's config, uninterpolated
        self.groups: dict[str, bool] = {}  # whether a searched name selects a config group
        # the command line's hydra.* overrides, as text (they may hold ${...})
        self.hydra_overrides = OmegaConf.to_container(config.hydra.overrides.hydra)
        self.hydra_yaml = HydraYaml()
        self.config_yaml = YamlTree()  # .hydra/config.yaml: the searched keys' values change
        # the fixed overrides, parsed once: override_dirname lists them with the trial's values
        self.fixed_keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(fixed)]
        # hydra.sweep.dir and .subdir as written: resolved once when they interpolate nothing a
        # trial sets (see prepare)
        sweep = OmegaConf.to_container(base.hydra.sweep, resolve=False)
        self.raw_sweep_dir, self.raw_subdir = sweep.get("dir"), sweep.get("subdir")
        self.sweep_dir: str | None = None
        self.last_set: dict[str, Any] = {}  # the lists and mappings prepare set last
        # Hydra callbacks may keep the config they get; a job's working directory changes by
        # default below version_base 1.2, with Hydra's warning: both are left to Hydra
        old_chdir = base.hydra.job.chdir is None and not version.base_at_least("1.2")
        self.through_hydra = bool(hydra_context.callbacks.callbacks) or old_chdir
        self.sweep_logging = SweepLogging(
            config.hydra.hydra_logging, config.hydra.verbose, base.hydra.job_logging
        )
        self.job_logging = JobLogging()
        setup_globals()

    def run(
        self, number: int, values: dict[str, Any], env: dict[str, str], reporter: TrialReporter
    ) -> JobReturn:
        env = env | contract.overrides_variable(task_overrides(self.fixed, values))
        # a job of several processes (DDP): its ranks end with it (trial.ranks)
        with job_side.serving(reporter), ranks.TrialProcesses(reporter.trial_id) as processes:
            ret = self.run_here(number, values, env)
            processes.completed = ret.status == JobStatus.COMPLETED
            return ret

    def run_here(self, number: int, values: dict[str, Any], env: dict[str, str]) -> JobReturn:
        self.sweep_logging.before_job()
        if self.through_hydra or any(self.selects_group(name) for name in values):
            cfg = self.compose_with_hydra(number, values, env)
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=cfg,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            self.sweep_logging.after_job(at_once=True)  # its logging is another config's
        else:
            ret = self.run_job(self.prepare(number, values, env), values)
            # the job configured its own logging; the sweep's lines go on as before
            self.sweep_logging.after_job()
        return ret

    def selects_group(self, name: str) -> bool:
        if name not in self.groups:
            choices = self.cfg.hydra.runtime.choices
            self.groups[name] = selects_group(self.hydra_context, choices, name)
        return self.groups[name]

    def close(self) -> None:
        self.sweep_logging.before_job()  # set up now if a record has not done it yet
        self.sweep_logging.set_up()

    def compose_with_hydra(
        self, number: int, values: dict[str, Any], env: dict[str, str]
    ) -> DictConfig:
        """The job's config as the basic launcher makes it: composed by Hydra."""
        overrides = task_overrides(self.fixed, values) + env_overrides(env)
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = number
            cfg.hydra.job.num = number
        return cfg

    def prepare(self, number: int, values: dict[str, Any], env: dict[str, str]) -> DictConfig:
        """The one config set to this trial, as load_sweep_config would compose it."""
        cfg = self.cfg
        task = task_overrides(self.fixed, values)
        keys = {config_key(name) for name in values}
        with read_write(cfg), read_write(cfg.hydra), open_dict(cfg):
            for key in self.set_keys - keys:
                self.restore(cfg, key)
            for name, value in values.items():
                OmegaConf.update(cfg, config_key(name), value, merge=False)
            self.set_keys = keys
            job = cfg.hydra.job
            job.id = number
            job.num = number
            overrides = cfg.hydra.overrides
            # what was set for the last trial is what these nodes hold (only this sets them)
            last = self.last_set
            last["task"] = set_changed(overrides, "task", task, last.get("task"))
            hydra_overrides = [*self.hydra_overrides, *env_overrides(env)]
            last["hydra"] = set_changed(overrides, "hydra", hydra_overrides, last.get("hydra"))
            env_set = {**self.base_env, **env}
            last["env_set"] = set_changed(job, "env_set", env_set, last.get("env_set"))
            dirname = job.config.override_dirname
            job.override_dirname = override_dirname(
                zip([*self.fixed_keys, *map(config_key, values)], task, strict=True),
                list(dirname.exclude_keys),
                dirname.item_sep,
                dirname.kv_sep,
            )
            # resolved as load_sweep_config's config is: with the sweep config's cache (${now:})
            OmegaConf.copy_cache(from_config=self.config, to_config=cfg)
            output_dir = self.sweep_dir or str(OmegaConf.select(cfg, "hydra.sweep.dir"))
            if self.sweep_dir is None and only_the_time(self.raw_sweep_dir):
                self.sweep_dir = output_dir  # the same for every trial
            if self.raw_subdir == "${hydra.job.num}":  # Hydra's default
                subdir = number
            else:
                subdir = OmegaConf.select(cfg, "hydra.sweep.subdir")
            if subdir is not None:
                output_dir = os.path.join(output_dir, str(subdir))
            cfg.hydra.runtime.output_dir = os.path.abspath(output_dir)
        return cfg

    def restore(self, cfg: DictConfig, key: str) -> None:
        """`key` as the composed config has it (its value, ??? or interpolation), or gone if
        the composed config lacks it (a +key of an earlier trial)."""
        parent, _, last = key.rpartition(".")
        if parent not in self.raw:
            node = OmegaConf.select(self.task, parent, default=None) if parent else self.task
            self.raw[parent] = (
                OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}
            )
        target = OmegaConf.select(cfg, parent, default=None) if parent else cfg
        if not isinstance(target, DictConfig):
            return
        if last in self.raw[parent]:
            target[last] = self.raw[parent][last]
        elif last in target:
            del target[last]

    def run_job(self, config: DictConfig, values: dict[str, Any]) -> JobReturn:
        """hydra.core.utils.run_job, on a config that only this object uses: the hydra node is
        not copied (HydraConfig holds the config itself), nor kept for later (ret.hydra_cfg is
        this config until the next trial); the task gets a copy of the app's part alone."""
        holder = HydraConfig.instance()
        old_cwd, orig_hydra_cfg = os.getcwd(), holder.cfg
        if not OmegaConf.is_readonly(config.hydra):  # it stays so after the first trial
            OmegaConf.set_readonly(config.hydra, True)
        holder.cfg = config
        hydra = config.hydra
        output_dir = hydra.runtime.output_dir
        chdir = bool(hydra.job.chdir)  # None is False from version_base 1.2 (see __init__)
        try:
            ret = JobReturn()
            task_cfg = copy.deepcopy(self.task)
            with read_write(task_cfg), open_dict(task_cfg):
                for name, value in values.items():
                    OmegaConf.update(task_cfg, config_key(name), value, merge=False)
            ret.cfg = task_cfg
            ret.hydra_cfg = config
            ret.overrides = OmegaConf.to_container(hydra.overrides.task)
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            if chdir:
                os.chdir(output_dir)
            ret.working_dir = output_dir if chdir else os.getcwd()
            self.job_logging.set_up(config)
            if hydra.output_subdir is not None:
                folder = Path(output_dir) / str(hydra.output_subdir)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "config.yaml").write_text(self.config_yaml(task_cfg), encoding="utf-8")
                (folder / "hydra.yaml").write_text(self.hydra_yaml(config), encoding="utf-8")
                (folder / "overrides.yaml").write_text(
                    OmegaConf.to_yaml(hydra.overrides.task), encoding="utf-8"
                )
            with env_override(dict(hydra.job.env_set)):
                try:
                    ret.return_value = self.task_function(task_cfg)
                    ret.status = JobStatus.COMPLETED
                except Exception as err:
                    ret.return_value = err
                    ret.status = JobStatus.FAILED
            ret.task_name = JobRuntime.instance().get("name")
            for handler in logging.getLogger().handlers:  # Hydra flushes every handler here
                handler.flush()
            return ret
        finally:
            holder.cfg = orig_hydra_cfg
            if chdir:
                os.chdir(old_cwd)


class JobLogging:
    """Hydra's configure_log(hydra.job_logging) for each trial's job, made cheap where that is
    exact: when a trial's log config is the last trial's but for its log files' names, and the
    root logger still has the handlers the last job's setup gave it, those files' handlers move
    to the new files, instead of logging.config making every handler anew (a tenth of a toy
    trial). Everything else is Hydra's configure_log, as in run_job."""

    def __init__(self) -> None:
        self.raw: Any = None  # the job's log config, as written (its interpolations kept)
        self.last: tuple[Any, ...] | None = None  # what the last setup made

    def set_up(self, config: DictConfig) -> None:
        hydra = config.hydra
        if self.raw is None:
            self.raw = OmegaConf.to_container(hydra.job_logging, resolve=False)
        try:
            conf = resolve_simply(self.raw, config)
        except LookupError:  # an interpolation that is not a plain key: OmegaConf resolves it
            conf = OmegaConf.to_container(hydra.job_logging, resolve=True)
        verbose = (
            OmegaConf.to_container(hydra.verbose)
            if OmegaConf.is_list(hydra.verbose)
            else hydra.verbose
        )
        if not self.move(conf, verbose):
            configure_log(hydra.job_logging, hydra.verbose)
            self.remember(conf, verbose)

    def remember(self, conf: Any, verbose: Any) -> None:
        root = logging.getLogger()
        files = file_handlers(conf)
        handlers = list(root.handlers)
        movable = (
            isinstance(conf, dict)
            and isinstance(conf.get("root"), dict)
            and not conf.get("incremental")
            and conf.get("disable_existing_loggers", True) is False
            and not conf.get("loggers")
            and all(type(h) is logging.FileHandler for h in handlers if h.name in files)
            and {h.name for h in handlers} >= set(files)
        )
        self.last = (
            (
                without_files(conf),
                repr(verbose),
                handlers,
                handler_states(handlers),
                root.level,
                sys.stdout,
                sys.stderr,
            )
            if movable
            else None
        )

    def move(self, conf: Any, verbose: Any) -> bool:
        """The last job's logging, its files moved to this trial's; False where not exact."""
        if self.last is None:
            return False
        masked, seen_verbose, handlers, states, level, stdout, stderr = self.last
        root = logging.getLogger()
        if (
            without_files(conf) != masked
            or repr(verbose) != seen_verbose
            or len(root.handlers) != len(handlers)
            or any(a is not b for a, b in zip(root.handlers, handlers, strict=True))
            or handler_states(handlers) != states  # a job that changed Hydra's handlers
            or sys.stdout is not stdout
            or sys.stderr is not stderr
        ):
            return False
        files = file_handlers(conf)
        for handler in handlers:
            if handler.name in files:
                move_file(handler, files[handler.name])
        root.setLevel(level)  # the sweep's logging stood in between the jobs (SweepLogging)
        for logger in list(root.manager.loggerDict.values()):  # as logging.config does
            if isinstance(logger, logging.Logger) and logger.disabled:
                logger.disabled = False
        if verbose is True:
            root.setLevel(logging.DEBUG)
        elif verbose:
            for name in [verbose] if isinstance(verbose, str) else verbose:
                logging.getLogger(name).setLevel(logging.DEBUG)
        return True


def handler_states(handlers: list[logging.Handler]) -> list[tuple[Any, ...]]:
    return [(h.name, h.level, h.formatter, list(h.filters)) for h in handlers]


def file_handlers(conf: Any) -> dict[str, str]:
    """The log config's file handlers (logging.FileHandler), by name: their files."""
    handlers = conf.get("handlers") if isinstance(conf, dict) else None
    return {
        name: h["filename"]
        for name, h in (handlers or {}).items()
        if isinstance(h, dict)
        and h.get("class") == "logging.FileHandler"
        and isinstance(h.get("filename"), str)
    }


def without_files(conf: Any) -> Any:
    """The log config, its file handlers' file names left out."""
    files = file_handlers(conf)
    if not files:
        return conf
    handlers = {
        name: {k: v for k, v in h.items() if k != "filename"} if name in files else h
        for name, h in conf["handlers"].items()
    }
    return {**conf, "handlers": handlers}


def move_file(handler: logging.FileHandler, filename: str) -> None:
    """A file handler writes to `filename` from now on, as one made for it would."""
    handler.acquire()
    try:
        handler.flush()
        stream, handler.stream = handler.stream, None
        if stream is not None:
            stream.close()
        handler.baseFilename = os.path.abspath(filename)
        if not handler.delay:
            handler.stream = handler._open()
    finally:
        handler.release()


SIMPLE_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def resolve_simply(value: Any, config: DictConfig) -> Any:
    """`value` (a plain container, as written) with its interpolations resolved against
    `config` as OmegaConf resolves them, where each is a plain absolute key (`${a.b}`): a
    string that is one interpolation takes the value, one that holds some its text. Raises
    LookupError for anything else (resolvers, relative keys, escapes, missing values)."""
    if isinstance(value, dict):
        return {k: resolve_simply(v, config) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_simply(v, config) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value
    if "\\" in value or "${" in SIMPLE_INTERPOLATION.sub("", value):
        raise LookupError(value)

    def select(key: str) -> Any:
        try:
            found = OmegaConf.select(config, key, default=MISSING_KEY, throw_on_missing=True)
        except Exception as err:  # a missing value, an interpolation that fails
            raise LookupError(key) from err
        if found is MISSING_KEY or found is None or not isinstance(found, (str, int, float)):
            raise LookupError(key)
        return found

    whole = SIMPLE_INTERPOLATION.fullmatch(value)
    if whole:
        return select(whole.group(1))
    return SIMPLE_INTERPOLATION.sub(lambda m: str(select(m.group(1))), value)


MISSING_KEY = object()


class SweepLogging:
    """The sweep's own logging (hydra.hydra_logging) back after each trial's job.

    Hydra's configure_log sets it up (a logging.config setup: a tenth of a toy trial) when the
    first log record after the job is made: a record factory stands in for it until then, with
    the root logger at the level the sweep's logging gives it. A next job that starts first
    takes the stand-in down unused; between two trials the sweeper logs only by exception, so
    most trials save a setup, and a record made between two trials goes where it went before.
    Where the sweep's logging does more than set the root logger's handlers and level (named
    loggers' handlers, disabled loggers, incremental), or the job's logging configures named
    loggers, the sweep's logging is set up at once after each job, as Hydra's launcher does.
    """

    def __init__(self, log_config: Any, verbose: Any, job_config: Any) -> None:
        self.log_config, self.verbose = log_config, verbose
        self.lock = threading.Lock()
        self.pending: tuple[Any, Any] | None = None  # the stand-in factory, and the one before
        self.lazy, self.level = self.stand_in(log_config, verbose, job_config)

    @staticmethod
    def stand_in(log_config: Any, verbose: Any, job_config: Any) -> tuple[bool, int | None]:
        """Whether a stand-in is exact for this logging, and the root level it sets (None: the
        root logger's level is left as it is)."""
        if log_config is None or job_config is None:
            return False, None
        conf = OmegaConf.to_container(log_config, resolve=True)
        job = OmegaConf.to_container(job_config, resolve=False)
        root, loggers = conf.get("root"), conf.get("loggers") or {}
        if (
            not isinstance(root, dict)
            or set(root) - {"level", "handlers"}
            or conf.get("incremental")
            or conf.get("disable_existing_loggers", True)
            or any(set(v or {}) - {"level"} for v in loggers.values())
            or job.get("loggers")
            or job.get("incremental")
        ):
            return False, None
        level = root.get("level")
        if isinstance(level, str):
            level = logging.getLevelName(level)
        if level is not None and not isinstance(level, int):
            return False, None
        if verbose is True:
            level = logging.DEBUG
        return True, level

    def after_job(self, at_once: bool = False) -> None:
        if at_once or not self.lazy:
            self.set_up()
            return
        with self.lock:
            if self.level is not None:
                logging.getLogger().setLevel(self.level)
            before = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                self.switch(factory)
                return before(*args, **kwargs)

            self.pending = (factory, before)
            logging.setLogRecordFactory(factory)

    def switch(self, factory: Any) -> None:
        """A record is being made after a job: the sweep's logging, set up for it."""
        with self.lock:
            if self.pending is None or self.pending[0] is not factory:
                return  # taken down by a job that started, or set up by another record
            self.take_down()
            self.set_up()

    def before_job(self) -> None:
        with self.lock:  # after a setup that a record started, if one is under way
            self.take_down()

    def take_down(self) -> None:
        if self.pending is not None:
            factory, before = self.pending
            self.pending = None
            if logging.getLogRecordFactory() is factory:
                logging.setLogRecordFactory(before)

    def set_up(self) -> None:
        configure_log(self.log_config, self.verbose)


def set_changed(
    node: DictConfig, key: str, value: list[Any] | dict[str, Any], held: Any = None
) -> list[Any] | dict[str, Any]:
    """node[key] = value (a list or a mapping of plain values), as an assignment would leave it,
    with only the items that changed set again when its length or keys are the same: a trial
    changes a few of them, and a whole new list or mapping node costs a tenth of a millisecond.
    `held`: what the node holds, when the caller knows it (else it is read). Returns `value`."""
    if held is None:
        held = OmegaConf.to_container(node[key], resolve=False) if key in node else None
    same_shape = (
        isinstance(value, list) and isinstance(held, list) and len(held) == len(value)
    ) or (isinstance(value, dict) and isinstance(held, dict) and list(held) == list(value))
    if not same_shape:
        node[key] = value
        return value
    target = node[key]
    for item in range(len(value)) if isinstance(value, list) else value:
        old, new = held[item], value[item]
        if type(old) is not type(new) or old != new:
            target[item] = new
    return value


def only_the_time(value: Any) -> bool:
    """Whether a config value interpolates nothing but the time (`${now:%H-%M-%S}`, which Hydra
    caches for the whole sweep): the sweep folder Hydra's default names."""
    return isinstance(value, str) and "${" not in re.sub(r"\$\{now:[^${}]*\}", "", value)


def override_dirname(
    overrides: Iterable[tuple[str, str]], exclude_keys: list[str], item_sep: str, kv_sep: str
) -> str:
    """hydra.job.override_dirname, as Hydra's config loader computes it from (key, override)."""
    lines = sorted(line for key, line in overrides if key not in exclude_keys)
    return item_sep.join(lines).replace("=", kv_sep)


def jobs_for(
    launcher: Any,
    hydra_context: Any,
    task_function: Any,
    config: DictConfig,
    fixed: list[str],
    base: DictConfig,
) -> Jobs:
    if type(launcher).__name__ in IN_PROCESS_LAUNCHERS:
        return InProcessJobs(hydra_context, task_function, config, fixed, base)
    return LauncherJobs(launcher, fixed)
