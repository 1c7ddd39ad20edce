"""Retries: a trial that failed of something transient is tried again with the same parameters.

`hydra.sweeper.retry: {max: 2, on: [torch.OutOfMemoryError, "CUDA out of memory"]}` lists what
is transient: exception types (a dotted name that imports, or a built-in one such as
ConnectionError; a subclass matches) and message patterns (regular expressions, searched in
"Type: message" of the error and of every error it was raised from). A trial whose job raised
a listed error fails with reason `transient` while it has attempts left: a new trial with its
parameters is enqueued, once, whoever reads the study first (the loop of any worker, or a
rerun), and continues from its checkpoint when it saved one. Its run is tagged `retry_of` (the
run it repeats) and `attempt`. Retried failures do not count against max_failure_rate; the
last attempt's failure does, as any error.
"""

from __future__ import annotations

import builtins
import importlib
import re
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.errors import SweepConfigError
from mlflow_study_sweeper.storage.studies import enqueue_once

DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
TRANSIENT = keys.TRANSIENT  # the failure kind of a trial that is retried


@dataclass(frozen=True)
class RetryPolicy:
    """hydra.sweeper.retry, checked: how many more attempts, and what is transient."""

    max: int = 0
    types: tuple[type[BaseException], ...] = ()
    patterns: tuple[re.Pattern[str], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        """From the `retry` mapping (max, on); one SweepConfigError for what cannot work."""
        settings = settings or {}
        unknown = set(settings) - {"max", "on"}
        if unknown:
            raise SweepConfigError(
                f"hydra.sweeper.retry has no setting {sorted(unknown)[0]!r}: use max (attempts "
                f"after the first) and on (exception types or message patterns)"
            )
        most = settings.get("max", 0)
        if not isinstance(most, int) or isinstance(most, bool) or most < 0:
            raise SweepConfigError(
                f"hydra.sweeper.retry.max={most!r} must be a whole number >= 0 (0: no retries)"
            )
        listed = settings.get("on") or []
        if isinstance(listed, str):
            listed = [listed]
        types, patterns = [], []
        for i, item in enumerate(listed):
            where = f"hydra.sweeper.retry.on[{i}]={item!r}"
            if not isinstance(item, str) or not item.strip():
                raise SweepConfigError(
                    f"{where} is not a string: list exception types (torch.OutOfMemoryError, "
                    f"ConnectionError) or message patterns ('CUDA out of memory')"
                )
            found = exception_type(item)
            if found is not None:
                types.append(found)
            elif DOTTED.fullmatch(item):
                raise SweepConfigError(
                    f"{where} names no exception type that imports here: check the name (a "
                    f"message pattern with dots is written as a regular expression, e.g. "
                    f"'CUDA out of memory\\\\.')"
                )
            else:
                try:
                    patterns.append(re.compile(item))
                except re.error as err:
                    raise SweepConfigError(
                        f"{where} is neither an exception type nor a regular expression ({err})"
                    ) from None
        if most > 0 and not listed:
            raise SweepConfigError(
                f"hydra.sweeper.retry.max={most} retries nothing: list what is transient in "
                f"hydra.sweeper.retry.on (exception types or message patterns)"
            )
        return cls(most, tuple(types), tuple(patterns))

    def transient(self, err: BaseException | None) -> bool:
        """Whether `err`, or an error it was raised from, is one the policy lists."""
        if self.max < 1 or err is None:
            return False
        seen: BaseException | None = err
        while seen is not None:
            if isinstance(seen, self.types):
                return True
            text = f"{type(seen).__name__}: {seen}"
            if any(p.search(text) for p in self.patterns):
                return True
            seen = seen.__cause__ or seen.__context__
        return False

    def attempts_left(self, trial: Any) -> bool:
        """Whether `trial` (an attempt: 1 for a first try) may be tried again."""
        return attempt(trial) <= self.max


def exception_type(name: str) -> type[BaseException] | None:
    """The exception class `name` names (a built-in by its bare name, or module.Class)."""
    if "." not in name:
        found = getattr(builtins, name, None)
    else:
        module, _, attr = name.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            found = None
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


def attempt(trial: Any) -> int:
    """1 for a trial's first try, 2 for its first retry, ..."""
    return int(trial.user_attrs.get(keys.ATTEMPT, 1))


def retried(trial: FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and keys.failure(trial) == TRANSIENT


def enqueue_retries(study: optuna.Study, trials: list[FrozenTrial]) -> list[str]:
    """Enqueue, once each, the next attempt of every trial that failed of something listed."""
    waiting = [t for t in trials if retried(t) and not keys.is_imported(t)]
    if not waiting:
        return []
    notes = []
    for trial in waiting:
        attrs = {keys.RETRY_OF: trial.number, keys.ATTEMPT: attempt(trial) + 1}
        if keys.checkpoint_step(trial) is not None:
            attrs[keys.CONTINUES] = trial.number  # it goes on from the checkpoint it saved
        if not enqueue_once(study, keys.RETRIED.format(number=trial.number), trial.params, attrs):
            continue
        notes.append(
            f"trial {trial.number} failed of something transient "
            f"({keys.fail_reason(trial)[:120]}): attempt {attempt(trial) + 1} follows with its "
            f"parameters"
        )
    return notes
