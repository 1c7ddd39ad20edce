"""Hydra's override grammar (interval, range, choice, tag(log, ...)) as Optuna distributions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from hydra.errors import HydraException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from mnist.study import SweepConfigError

GRAMMAR = (
    "interval(low, high), int(interval(low, high)), tag(log, interval(low, high)), "
    "range(start, stop, step) or choice(a, b, ...)"
)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'lr': '...'}} -> {'model.lr': '...'}: a CLI override nests dotted keys."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out |= flatten_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def distribution(override: Override) -> BaseDistribution:
    value = override.value()
    try:
        if override.is_choice_sweep():
            assert isinstance(value, ChoiceSweep)
            choices = list(override.sweep_iterator(transformer=Transformer.encode))
            return CategoricalDistribution(choices)
        if override.is_range_sweep():
            assert isinstance(value, RangeSweep)
            if value.shuffle:
                return CategoricalDistribution(
                    list(override.sweep_iterator(transformer=Transformer.encode))
                )
            if any(isinstance(v, float) for v in (value.start, value.stop, value.step)):
                # range's stop is exclusive, as in Python
                values = [float(v) for v in override.sweep_iterator()]
                if not values:
                    raise ValueError("the range is empty")
                return FloatDistribution(values[0], values[-1], step=value.step)
            if value.stop <= value.start:
                raise ValueError("the range is empty")
            return IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
        if override.is_interval_sweep():
            assert isinstance(value, IntervalSweep)
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                return IntDistribution(value.start, value.end, log=log)
            return FloatDistribution(float(value.start), float(value.end), log=log)
    except ValueError as err:
        raise SweepConfigError(f"search space {override.input_line}: {err}") from None
    raise SweepConfigError(f"search space {override.input_line} is not a sweep: use {GRAMMAR}")


def parse(
    params: Mapping[str, Any], arguments: list[str]
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """The search space from hydra.sweeper.params plus sweep-style command-line arguments.

    Returns the distributions by config key, and the remaining (fixed) overrides for every job.
    A command-line sweep (model.lr=interval(...)) replaces the same key from the config.
    """
    parser = OverridesParser.create()
    space: dict[str, BaseDistribution] = {}
    for key, text in flatten_params(params).items():
        try:
            (override,) = parser.parse_overrides([f"{key}={text}"])
        except HydraException as err:
            raise SweepConfigError(
                f"hydra.sweeper.params.{key}={text!r} cannot be parsed: use {GRAMMAR} "
                f"({str(err).splitlines()[0]})"
            ) from None
        space[key] = distribution(override)
    fixed: list[str] = []
    try:
        overrides = parser.parse_overrides(arguments)
    except HydraException as err:
        raise SweepConfigError(
            f"{str(err).splitlines()[0]}; a search space uses {GRAMMAR}"
        ) from None
    for override in overrides:
        key = override.get_key_element().lstrip("+~")
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            # a value fixed on the command line takes the key out of the search space
            space.pop(key, None)
            fixed.append(override.input_line)
    return space, fixed


def quote_cli_params(argv: list[str]) -> list[str]:
    """Quote `hydra.sweeper.params.KEY=interval(...)` so Hydra stores it as text for us to parse.

    Hydra refuses sweep syntax inside its own config ("Sweeping over Hydra's configuration is
    not supported"); quoted, the expression reaches the sweeper as the string it expects. `++`
    because the dotted key nests (params.model.lr) beside the config's flat 'model.lr' key;
    flatten_params lets the later, command-line entry win.
    """
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+").startswith("hydra.sweeper.params.") and value[:1] not in "'\"":
            quote = '"' if "'" in value else "'"
            arg = f"++{key.lstrip('+')}={quote}{value}{quote}"
        out.append(arg)
    return out


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
