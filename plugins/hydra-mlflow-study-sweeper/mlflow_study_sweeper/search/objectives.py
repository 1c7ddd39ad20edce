"""What the study optimises: one metric, or several (a Pareto front), and which trial is "best".

A single-objective sweep: the task function returns a number, `metric` names it, the best
trial is the one with the best value. A multi-objective sweep (`direction` and `metric` are
lists of the same length): the task function returns a dict keyed by those names (or a
list in their order); the trials
no other trial beats on every objective form the Pareto front, and `champion` picks one of
them as "best" (tagged, published, registered like the best trial of a single objective).
"""

from __future__ import annotations

import copy
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.errors import SweepConfigError

KNEE = "knee"
COMPARISONS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
CONSTRAINT = re.compile(r"\s*([A-Za-z_][\w.\-/]*)\s*(<=|>=|<|>)\s*(\S+)\s*")


class ReturnFormError(ValueError):
    """The task function returned another form than the objectives need (every trial would)."""


@dataclass(frozen=True)
class Constraint:
    name: str
    op: str
    bound: float

    def holds(self, values: Mapping[str, float]) -> bool:
        return COMPARISONS[self.op](values[self.name], self.bound)

    def __str__(self) -> str:
        return f"{self.name} {self.op} {self.bound:g}"


@dataclass(frozen=True)
class Objectives:
    names: tuple[str, ...]
    directions: tuple[str, ...]  # maximize / minimize, one per name
    by: str  # the champion's rule: an objective's name, or "knee"
    where: tuple[Constraint, ...] = ()

    # -- from the settings --
    @classmethod
    def from_settings(cls, direction: Any, metric: Any, champion: Any) -> Objectives:
        directions = _as_list(direction, "direction")
        names = _as_list(metric, "metric")
        for d in directions:
            if d not in ("maximize", "minimize"):
                raise SweepConfigError(
                    f"hydra.sweeper.direction={direction} must be maximize or minimize (a list "
                    f"of them for several objectives)"
                )
        if len(directions) != len(names):
            raise SweepConfigError(
                f"hydra.sweeper.direction={directions} and hydra.sweeper.metric={names} must "
                f"have one entry per objective: name each objective the task function returns"
            )
        if len(set(names)) != len(names) or not all(names):
            raise SweepConfigError(f"hydra.sweeper.metric={names} must be distinct names")
        by = champion.get("by") if champion else None
        where = list(champion.get("where") or []) if champion else []
        if len(names) == 1:
            if by is not None or where:
                raise SweepConfigError(
                    "hydra.sweeper.champion chooses among the Pareto front of a multi-objective "
                    "sweep; with one objective the best trial is the best value: remove it"
                )
            return cls(tuple(names), tuple(directions), names[0])
        by = str(by) if by is not None else names[0]
        if by != KNEE and by not in names:
            raise SweepConfigError(
                f"hydra.sweeper.champion.by={by!r} must be one of the objectives "
                f"({', '.join(names)}) or {KNEE!r}"
            )
        return cls(tuple(names), tuple(directions), by, tuple(_constraint(c, names) for c in where))

    @property
    def multi(self) -> bool:
        return len(self.names) > 1

    @property
    def metric(self) -> str:
        """The objective a single value stands for: the one per-epoch reports are judged on."""
        return self.names[0]

    def direction_of(self, name: str) -> str | None:
        return dict(zip(self.names, self.directions, strict=True)).get(name)

    def describe(self) -> str:
        """'maximize val_acc' or 'maximize val_acc and minimize n_params'."""
        return " and ".join(f"{d} {n}" for d, n in zip(self.directions, self.names, strict=True))

    def rule(self) -> str:
        """The champion's rule in words, e.g. 'max val_acc where n_params <= 200000'."""
        if self.by == KNEE:
            text = "the knee of the front"
        else:
            text = f"{self.direction_of(self.by)[:3]} {self.by}"
        return text + (f" where {' and '.join(map(str, self.where))}" if self.where else "")

    # -- what a trial returned --
    def values(self, returned: Any) -> list[float]:
        """The objective values of a job's return value; ValueError says what is wrong."""
        if not self.multi:
            if isinstance(returned, bool) or not isinstance(returned, (int, float)):
                raise ValueError(f"the task function returned {returned!r}, not a number")
            values = [float(returned)]
        else:
            returned = self.as_mapping(returned)
            values = []
            for name in self.names:
                v = returned[name]
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"the task function returned {name}={v!r}, not a number")
                values.append(float(v))
        for name, v in zip(self.names, values, strict=True):
            if not math.isfinite(v):
                raise ValueError(f"the job returned {name}={v}")
        return values

    def as_mapping(self, returned: Any) -> Mapping[str, Any]:
        """Several objectives: a dict keyed by their names, or a list or tuple in their order
        (what users of Hydra's Optuna sweeper return). Any other form: ReturnFormError."""
        if isinstance(returned, (list, tuple)):
            if len(returned) != len(self.names):
                raise ReturnFormError(
                    f"the task function returned {len(returned)} values {returned!r} for "
                    f"{len(self.names)} objectives ({', '.join(self.names)}): return one value "
                    f"per name in hydra.sweeper.metric, in its order, or a dict keyed by them"
                )
            return dict(zip(self.names, returned, strict=True))
        if not isinstance(returned, Mapping):
            raise ReturnFormError(
                f"the task function returned {type(returned).__name__} {returned!r}; a "
                f"multi-objective sweep needs a dict keyed by the objectives' names, e.g. "
                f"{{{', '.join(f'{n!r}: ...' for n in self.names)}}}, or a list in the "
                f"order of hydra.sweeper.metric"
            )
        missing = [n for n in self.names if n not in returned]
        if missing:
            raise ReturnFormError(
                f"the task function's dict has no {', '.join(missing)} (it has "
                f"{', '.join(map(str, returned))}): return every name in hydra.sweeper.metric"
            )
        return returned

    def of(self, trial: optuna.trial.FrozenTrial) -> dict[str, float]:
        return dict(zip(self.names, trial.values or (), strict=False))

    # -- which trials win --
    def candidates(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """This study's own complete trials with finite values (imported ones never win)."""
        return [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.values is not None
            and len(t.values) == len(self.names)
            and all(math.isfinite(v) for v in t.values)
            and not keys.is_imported(t)
        ]

    def _better_or_equal(self, a: Sequence[float], b: Sequence[float]) -> list[tuple[bool, bool]]:
        out = []
        for x, y, d in zip(a, b, self.directions, strict=True):
            if d == "minimize":
                x, y = -x, -y
            out.append((x >= y, x > y))
        return out

    def dominates(self, a: Sequence[float], b: Sequence[float]) -> bool:
        pairs = self._better_or_equal(a, b)
        return all(ge for ge, _ in pairs) and any(gt for _, gt in pairs)

    def front(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """The trials no other candidate dominates (equal values: all of them stay)."""
        trials = self.candidates(study)
        return [t for t in trials if not any(self.dominates(o.values, t.values) for o in trials)]

    def best(self, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
        """The best trial (one objective), or the champion of the front; None if there is none."""
        if not self.multi:
            complete = self.candidates(study)
            if not complete:
                return None
            pick = max if self.directions[0] == "maximize" else min
            return pick(complete, key=lambda t: t.values[0])
        return self.champion(self.front(study))

    def champion(self, front: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
        allowed = [t for t in front if all(c.holds(self.of(t)) for c in self.where)]
        if not allowed:
            return None
        if self.by == KNEE:
            return self.knee(allowed)
        i = self.names.index(self.by)
        pick = max if self.directions[i] == "maximize" else min
        # ties on the chosen objective: the better of the others, then the earlier trial
        return pick(allowed, key=lambda t: (t.values[i], *self._oriented(t)[:i], -t.number))

    def _oriented(self, trial: optuna.trial.FrozenTrial) -> list[float]:
        sign = {"maximize": 1.0, "minimize": -1.0}
        return [sign[d] * v for v, d in zip(trial.values, self.directions, strict=True)]

    def knee(self, front: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial:
        """The member closest to the ideal point, each objective scaled to [0, 1] on the front.

        The ideal point has every objective at its best value on the front; scaling makes an
        objective counted in parameters weigh as much as one counted in accuracy.
        """
        points = [self._oriented(t) for t in front]
        lows = [min(p[i] for p in points) for i in range(len(self.names))]
        highs = [max(p[i] for p in points) for i in range(len(self.names))]

        def distance(p: list[float]) -> float:
            gaps = [
                (hi - v) / (hi - lo) if hi > lo else 0.0
                for v, lo, hi in zip(p, lows, highs, strict=True)
            ]
            return math.sqrt(sum(g * g for g in gaps))

        nearest = min(range(len(front)), key=lambda i: (distance(points[i]), front[i].number))
        return front[nearest]


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value.strip().lower() if what == "direction" else value]
    if isinstance(value, Sequence) and value:
        return [str(v).strip().lower() if what == "direction" else str(v) for v in value]
    raise SweepConfigError(f"hydra.sweeper.{what}={value!r} must be a name or a list of names")


def _constraint(text: Any, names: Sequence[str]) -> Constraint:
    match = CONSTRAINT.fullmatch(str(text))
    bound = None
    if match:
        try:
            bound = float(match.group(3))
        except ValueError:
            bound = None
    if not match or bound is None or not math.isfinite(bound):
        raise SweepConfigError(
            f"hydra.sweeper.champion.where entry {text!r} is not a constraint: write "
            f"'<objective> <= <number>' (or <, >=, >), e.g. '{names[-1]} <= 200000'"
        )
    if match.group(1) not in names:
        raise SweepConfigError(
            f"hydra.sweeper.champion.where entry {text!r} names {match.group(1)!r}, which is "
            f"not an objective ({', '.join(names)})"
        )
    return Constraint(match.group(1), match.group(2), bound)


def with_curve(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    shown = copy.copy(trial)
    shown.intermediate_values = keys.curve(trial)
    return shown


class FirstObjective:
    """A multi-objective study as Optuna's pruners see a single-objective one: its first
    objective's direction and its trials' per-epoch values of that objective.

    Optuna refuses trial.report() when a study has several objectives, and its samplers do not
    expect per-epoch values there (TPE's ranking of pruned trials asks for the one direction).
    The sweeper keeps the curve in a trial attribute instead (keys.CURVE) and asks the pruner
    through this view, whose trials show that curve as their intermediate values.
    """

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    @property
    def direction(self) -> optuna.study.StudyDirection:
        return self._study.directions[0]

    @property
    def directions(self) -> list[optuna.study.StudyDirection]:
        return [self._study.directions[0]]

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        return [with_curve(t) for t in self._study.get_trials(deepcopy=False, states=states)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


# refused in multi-objective sweeps: CMA-ES optimises one objective; these pruners read more of
# the study than the FirstObjective view gives (a bracket study of its own, study.best_trial)
MULTI_OBJECTIVE_REFUSED = ("CmaEsSampler", "HyperbandPruner", "WilcoxonPruner")
