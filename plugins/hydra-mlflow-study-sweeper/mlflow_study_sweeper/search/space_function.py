"""A search space written in Python: `hydra.sweeper.search_space: pkg.module.fn` (or Hydra's
name for it, `custom_search_space`).

The function is Hydra's optuna sweeper's `fn(cfg, trial)`: called once per trial with the
composed config (the command line's fixed values applied, read-only here) and the Optuna trial,
after the override grammar's params were asked (so it may read `trial.params`), it suggests more
params with Optuna's own `suggest_*` calls, conditional ones included, under dotted config keys;
`+key` adds a key the config lacks, as the override `+key=value`. The suggested values join the
trial's params, overrides and MLflow params (without the `+`).

What the sweep needs of it is checked on every call: no key defined both here and in the
grammar, no key the config lacks unless `+`, no key suggested twice under two names. The checks
before a sweep call it on throwaway trials of a study in memory (`draw`), which is also how an
enqueued set, an imported trial or a run is matched against the space (`fit`).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution

from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.keys import config_key
from mlflow_study_sweeper.search.grammar import describe
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.storage.studies import optuna_quietly

SIGNATURE = "fn(cfg: DictConfig, trial: optuna.Trial) -> None"
ABSENT = object()  # `fit`'s lookup: no value for that param
MAX_ROUNDS = 20  # `fit`: conditions nested this deep are matched


@dataclass(frozen=True)
class Fit:
    """How a set of values fits the space (SearchFunction.fit)."""

    params: dict[str, Any]  # the params as the space asks for them
    distributions: dict[str, BaseDistribution]
    why: str | None = None  # None: it fits; else other parameters, outside the search space...
    name: str | None = None  # the param that does not fit
    detail: str = ""  # what the function raised


class SearchFunctionError(Exception):
    """The function raised, or suggested what a sweep cannot use; the message says which."""


def locate(path: str) -> Any:
    """`pkg.module.fn` as Hydra's get_method finds it: its first part imported, each later part
    an attribute, or else a module imported (`module.Class.method` works too)."""
    parts = path.split(".")
    if not all(part.strip() for part in parts):
        raise ImportError(f"{path!r} is not a dotted path")
    found = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 2):
        if hasattr(found, part):
            found = getattr(found, part)
            continue
        module = ".".join(parts[:i])
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise  # the module exists and imports something that does not
            raise ImportError(f"{'.'.join(parts[: i - 1])} has no {part!r}") from None
    return found


def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether the config has `key` (a dotted path), a value still ??? included."""
    if OmegaConf.select(cfg, key, default=ABSENT, throw_on_resolution_failure=False) is not ABSENT:
        return True
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    return isinstance(node, DictConfig) and last in list(node)  # `in` skips a ??? value


class EndsSampler(optuna.samplers.BaseSampler):
    """Every param at its low end (the first choice), or at its high end (the last choice):
    the corners of a space that is known only as it is drawn."""

    def __init__(self, high: bool = False) -> None:
        self.high = high

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict[str, Any]:
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution) -> Any:
        if isinstance(param_distribution, CategoricalDistribution):
            return param_distribution.choices[-1 if self.high else 0]
        return param_distribution.high if self.high else param_distribution.low


@dataclass
class SearchFunction:
    """The function named by the settings, loaded and checked, with what it is called with."""

    setting: str  # the setting that names it: search_space or custom_search_space
    path: str
    fn: Callable[..., Any]
    cfg: DictConfig  # the composed config the function is given: a read-only copy
    grammar: dict[str, BaseDistribution]  # the override grammar's params, asked before it
    groups: frozenset[str]  # the config groups of the config (a key that selects a file)
    # every param the checks' draws suggested, with its distribution (a resumed study's are
    # compared with them)
    seen: dict[str, BaseDistribution] = field(default_factory=dict)
    _names: dict[str, str | None] = field(default_factory=dict)  # a name's problem, if any

    @classmethod
    def load(
        cls, setting: str, path: Any, cfg: DictConfig, grammar: dict[str, BaseDistribution]
    ) -> SearchFunction:
        where = f"hydra.sweeper.{setting}={path!r}"
        if not isinstance(path, str) or not path.strip():
            raise SweepConfigError(
                f"{where} is not the dotted path of a function: give pkg.module.fn, a {SIGNATURE}"
            )
        try:
            fn = locate(path)
        except Exception as err:  # an import error, or whatever the module raised importing
            why = str(err) if isinstance(err, ImportError) else f"{type(err).__name__}: {err}"
            raise SweepConfigError(
                f"{where} cannot be imported: {why} (the module must be importable from the "
                f"app's folder or an installed package)"
            ) from None
        if not callable(fn) or inspect.isclass(fn):
            raise SweepConfigError(
                f"{where} is not a function but an object of type {type(fn).__name__}: give "
                f"a {SIGNATURE}"
            )
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without one: it is called as it is
            signature = None
        wrong = inspect.iscoroutinefunction(fn) or inspect.isgeneratorfunction(fn)
        if signature is not None and not wrong:
            try:
                signature.bind(None, None)
            except TypeError:
                wrong = True
        if wrong:
            shown = f"{path.rsplit('.', 1)[-1]}{signature}" if signature else path
            raise SweepConfigError(
                f"{where}: {shown} cannot be called as Hydra calls a search-space function, "
                f"{SIGNATURE} (a plain function of two arguments, the config and the trial)"
            )
        own = copy.deepcopy(cfg)
        OmegaConf.set_readonly(own, True)  # the function reads it; the sweep's stays its own
        groups = frozenset(cfg.hydra.runtime.choices) if "hydra" in cfg else frozenset()
        return cls(setting, path, fn, own, dict(grammar), groups)

    # -- a trial's params --
    def extend(self, trial: optuna.Trial) -> None:
        """Call the function on `trial` (its grammar params already asked): its params join the
        trial's. Raises SearchFunctionError if it raised, or suggested what cannot be used."""
        with optuna_internals.suggestions(trial) as made:
            try:
                self.fn(self.cfg, trial)
            except Exception as err:
                self.check(made)  # a conflict says more than Optuna's error about it
                first = (str(err).strip().splitlines() or [""])[0]  # OmegaConf's go on
                raise SearchFunctionError(
                    f"{self.path} raised {type(err).__name__}: {first}"
                ) from err
        self.check(made)

    def check(self, made: list[tuple[str, BaseDistribution]]) -> None:
        keys: dict[str, str] = {}
        for name, dist in made:
            problem = self.problem(name, dist)
            if problem is not None:
                raise SearchFunctionError(f"{self.path} {problem}")
            key = config_key(name)
            if keys.setdefault(key, name) != name:
                raise SearchFunctionError(
                    f"{self.path} suggests both {keys[key]!r} and {name!r}, one config key "
                    f"{key}: suggest it under one name"
                )

    def problem(self, name: str, dist: BaseDistribution) -> str | None:
        """What is wrong with the function suggesting `name` as `dist`, or None."""
        if name in self.grammar:
            if dist == self.grammar[name]:
                return None  # Optuna hands it the grammar's value: the same definition twice
            return (
                f"suggests {name} as {describe(dist)}, which hydra.sweeper.params (or the command "
                f"line) defines as {describe(self.grammar[name])}: define each key in one place"
            )
        if name not in self._names:
            self._names[name] = self.name_problem(name)
        return self._names[name]

    def name_problem(self, name: str) -> str | None:
        key = config_key(name)
        prefix = name[: len(name) - len(key)]
        clash = [g for g in self.grammar if config_key(g) == key]
        if clash:
            return (
                f"suggests {name!r}, the config key {key} that hydra.sweeper.params (or the "
                f"command line) searches as {clash[0]} = {describe(self.grammar[clash[0]])}: "
                f"define each key in one place"
            )
        try:
            (override,) = OverridesParser.create().parse_overrides([f"{name}=0"])
            usable = override.key_or_group == key and override.package is None
        except HydraException:
            usable = False
        if not usable or prefix not in ("", "+", "++"):
            return (
                f"suggests {name!r}, which is not a config key: use a dotted key (model.lr), "
                f"+key for a key the config lacks"
            )
        present = key in self.groups or has_key(self.cfg, key)
        if prefix == "" and not present:
            return (
                f"suggests {name!r}, a key the config does not have: add {key} to the config, or "
                f"suggest '+{key}' to add it as the override +{key}=... does"
            )
        if prefix == "+" and present:
            return (
                f"suggests {name!r}, but the config has {key} already (Hydra refuses to add it "
                f"again): suggest {key!r}"
            )
        return None

    # -- throwaway trials, for the checks --
    def draw(self, fixed: dict[str, Any], high: bool = False) -> optuna.Trial:
        """The grammar's params and the function's on a throwaway trial of a study in memory
        (nothing reaches the sweep's study): `fixed`'s values where it names a param (even
        outside its distribution: the caller judges), the others at their low (`high`: high)
        ends. Raises SearchFunctionError as `extend` does."""
        with optuna_quietly(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fixed value out of range, the study in memory
            study = optuna.create_study(sampler=EndsSampler(high))
            if fixed:
                study.enqueue_trial(dict(fixed))
            trial = study.ask(self.grammar)
            self.extend(trial)
        for name, dist in trial.distributions.items():
            if name not in self.grammar:
                self.seen.setdefault(name, dist)
        return trial

    def fit(self, lookup: Callable[[str, BaseDistribution], Any], partial: bool = False) -> Fit:
        """A set of values (an enqueued set, an earlier trial's, a run's) matched against the
        space as it is now: `lookup(name, distribution)` gives the value of each param the
        grammar and the function ask for (ABSENT: none), round by round as the conditions
        unfold. A param without a value does not fit, unless `partial` (it is drawn then)."""
        fixed: dict[str, Any] = {}
        drawn: set[str] = set()
        try:
            for _ in range(MAX_ROUNDS):
                trial = self.draw(fixed)
                done = fixed.keys() | drawn
                asked = {n: d for n, d in trial.distributions.items() if n not in done}
                if not asked:
                    break
                for name, dist in asked.items():
                    value = lookup(name, dist)
                    if value is ABSENT and partial:
                        drawn.add(name)
                    elif value is ABSENT:
                        return Fit(fixed, {}, "other parameters", name)
                    elif not optuna_internals.contains(dist, value):
                        return Fit(fixed, {name: dist}, "outside the search space", name)
                    else:
                        fixed[name] = value
            else:
                return Fit(fixed, {}, "other parameters")
        except SearchFunctionError as err:
            return Fit(fixed, {}, "refused by the search-space function", detail=str(err))
        params, dists = trial.params, trial.distributions
        unasked = sorted(set(fixed) - set(params))
        if unasked:  # a value that the others' conditions no longer ask for
            return Fit(params, dists, "other parameters", unasked[0])
        return Fit(params, dists)

    def describe(self) -> str:
        return f"the function {self.path}"
