"""Hydra's override grammar (interval, range, choice, tag(log, ...)) as Optuna distributions."""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException, OverrideParseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mlflow_study_sweeper.errors import SweepConfigError

GRAMMAR = (
    "interval(low, high), int(interval(low, high)), tag(log, interval(low, high)), "
    "range(start, stop, step) or choice(a, b, ...)"
)
# a shuffled range becomes a list of choices: more than this is a mistake, not a search space
MAX_CHOICES = 10_000


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'lr': '...'}} -> {'model.lr': '...'}: a CLI override nests dotted keys."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out |= flatten_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def _finite(*numbers: Any) -> None:
    for number in numbers:
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"{number} is not a finite number")


def _decimal(number: float) -> decimal.Decimal:
    # from the shortest repr, so that 0.3 is 0.3 and not 0.299999999999999988897769753748...
    return decimal.Decimal(repr(float(number)))


def _float_value(start: float, step: float, i: int) -> float:
    """range's i-th value in exact decimals: range(0, 1, 0.3) ends at 0.9 (not 0.89999...)."""
    return float(_decimal(start) + i * _decimal(step))


def _float_count(start: float, stop: float, step: float) -> int:
    quotient = (_decimal(stop) - _decimal(start)) / _decimal(step)
    return max(int(quotient.to_integral_value(decimal.ROUND_CEILING)), 0)


def distribution(override: Override) -> BaseDistribution:
    value = override.value()
    try:
        if override.is_choice_sweep():
            assert isinstance(value, ChoiceSweep)
            for choice in override.sweep_iterator():
                if isinstance(choice, (list, dict)):
                    # Optuna stores only plain values; a list would reach the job as a string
                    raise ValueError(
                        f"{choice} is a list or mapping; a choice takes numbers, strings or "
                        f"booleans (for whole configs, choose between config group options)"
                    )
                _finite(choice)
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            return CategoricalDistribution(choices)
        if override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            start, stop, step = value.start, value.stop, value.step
            _finite(start, stop, step)
            if not step > 0:
                raise ValueError(f"the step must be > 0, not {step}")
            floats = any(isinstance(v, float) for v in (start, stop, step))
            # range's stop is exclusive, as in Python
            count = _float_count(start, stop, step) if floats else len(range(start, stop, step))
            if count == 0:
                raise ValueError("the range is empty")
            if value.shuffle:
                if count > MAX_CHOICES:
                    raise ValueError(
                        f"shuffle() makes a choice of {count} values, more than {MAX_CHOICES}: "
                        f"use the range without shuffle()"
                    )
                if floats:
                    return CategoricalDistribution(
                        [_float_value(start, step, i) for i in range(count)]
                    )
                return CategoricalDistribution(list(range(start, stop, step)))
            if floats:
                last = _float_value(start, step, count - 1)
                return FloatDistribution(float(start), last, step=float(step))
            return IntDistribution(start, start + (count - 1) * step, step=step)
        if override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            _finite(value.start, value.end)
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=log)
            return FloatDistribution(float(value.start), float(value.end), log=log)
    except (ValueError, ArithmeticError, HydraException) as err:
        raise SweepConfigError(f"search space {override.input_line}: {err}") from None
    raise SweepConfigError(f"search space {override.input_line} is not a sweep: use {GRAMMAR}")


def _whole_int(cast_int: Any) -> Any:
    """Hydra's int(), except that int(interval(1.5, 3.5)) is an error, not [1, 3] by truncation."""

    def cast(*args: Any, value: Any = None) -> Any:
        inner = value if value is not None else args[0] if len(args) == 1 else None
        if isinstance(inner, IntervalSweep):
            low, high = inner.start, inner.end
            if not all(math.isfinite(b) for b in (low, high)):
                raise ValueError(f"int(interval({low}, {high})) needs finite bounds")
            if not all(float(b).is_integer() for b in (low, high)):
                if math.ceil(low) > math.floor(high):
                    raise ValueError(f"int(interval({low}, {high})) holds no whole number")
                raise ValueError(
                    f"int(interval({low}, {high})) needs whole-number bounds, which Hydra would "
                    f"truncate: write int(interval({math.ceil(low)}, {math.floor(high)}))"
                )
        return cast_int(*args, value=value)

    return cast


def _parser() -> OverridesParser:
    parser = OverridesParser.create()
    functions = parser.functions.functions
    functions["int"] = _whole_int(functions["int"])  # same signature, so Hydra's checks hold
    return parser


def _why(err: HydraException) -> str:
    """The line of Hydra's parse error that says what is wrong (not where to read the docs)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if " while evaluating '" in line:  # ValueError while evaluating 'choice()': empty ...
            return line.split("': ", 1)[-1]
    return lines[0] if lines else type(err).__name__


def parse(
    params: Mapping[str, Any], arguments: list[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The search space from hydra.sweeper.params plus sweep-style command-line arguments.

    Returns the distributions by config key, and the remaining (fixed) overrides for every job.
    A command-line sweep (model.lr=interval(...)) replaces the same key from the config.
    """
    parser = _parser()
    space: dict[str, BaseDistribution] = {}
    for key, text in flatten_params(params).items():
        try:
            (override,) = parser.parse_overrides([f"{key}={text}"])
        except HydraException as err:
            raise SweepConfigError(
                f"hydra.sweeper.params.{key}={text!r} cannot be parsed: {_why(err)}; use {GRAMMAR}"
            ) from None
        space[key] = distribution(override)
    fixed: list[str] = []
    try:
        overrides = parser.parse_overrides(arguments)
    except HydraException as err:
        bad = err.override if isinstance(err, OverrideParseException) else None
        where = f"{bad} cannot be parsed: " if bad else ""
        raise SweepConfigError(f"{where}{_why(err)}; a search space uses {GRAMMAR}") from None
    for override in overrides:
        element = override.get_key_element()
        key = element.lstrip("+~")
        if override.is_sweep_override():
            # `+z=choice(1, 2)` searches a key the config lacks: the `+` stays in the param's
            # name, so that each trial's override adds it (as a search-space function's `+w`)
            space[element if element.startswith("+") else key] = distribution(override)
        else:
            # a value fixed on the command line takes the key out of the search space
            for name in (key, f"+{key}", f"++{key}"):
                space.pop(name, None)
            fixed.append(override.input_line)
    return space, fixed


def as_override(key: str, value: Any) -> str:
    if isinstance(value, str):
        return f"{key}={value!r}" if any(c in value for c in " ,()[]{}'\"") else f"{key}={value}"
    if value is None:
        return f"{key}=null"
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"choice{tuple(dist.choices)}"
    kind = "int " if isinstance(dist, IntDistribution) else ""
    log = "log " if dist.log else ""
    step = (
        f" step {dist.step}"
        if dist.step not in (None, 1) or isinstance(dist, FloatDistribution) and dist.step
        else ""
    )
    return f"{log}{kind}[{dist.low}, {dist.high}]{step}"


def check_space_unchanged(
    study: optuna.Study, space: dict[str, Any], drawn: dict[str, Any] | None = None
) -> None:
    """A resumed study refuses a parameter whose kind changed (log <-> linear, float <-> int);
    `drawn`: the params a search-space function suggested on the checks' corners."""
    seen: dict[str, Any] = {}
    for trial in study.get_trials(deepcopy=False):
        for key, dist in trial.distributions.items():
            seen.setdefault(key, dist)
    for key, dist in {**(drawn or {}), **space}.items():
        before = seen.get(key)
        if before is None:
            continue
        try:
            optuna.distributions.check_distribution_compatibility(before, dist)
        except ValueError:
            where = f"the search-space param {key}"
            if key in space:
                where = f"hydra.sweeper.params.{key}"
            raise SweepConfigError(
                f"{where} changed from {describe(before)} to {describe(dist)} "
                f"since study {study.study_name!r} started, and Optuna cannot mix the two in one "
                f"study: keep the old kind, or start a new study with hydra.sweeper.study_name=..."
            ) from None
