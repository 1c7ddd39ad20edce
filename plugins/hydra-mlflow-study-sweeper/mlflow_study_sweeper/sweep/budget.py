"""Time: a trial's own limit (trial_timeout), and whether the sweep's budget fits another trial."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import keys


class TrialTimeout(Exception):
    """The trial ran past hydra.sweeper.trial_timeout."""


@contextlib.contextmanager
def trial_deadline(seconds: float | None) -> Iterator[None]:
    """Raise TrialTimeout in this (main) thread after `seconds`, wherever the job is."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TrialTimeout(f"the trial ran past hydra.sweeper.trial_timeout={seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def expected_seconds(trials: list[FrozenTrial]) -> float:
    """How long a whole trial takes, judged by the study's trials so far.

    Per epoch when jobs report epochs (with the number planned): the time to a trial's first
    report, then its time per epoch for the epochs left, for every trial that reported, pruned
    or stopped ones included (their own durations would say "short"). Otherwise the median
    duration of the finished trials; 0 before any.
    """

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] if values else 0.0

    whole = []
    for t in trials:
        clock = t.system_attrs.get(keys.EPOCH_CLOCK)
        if keys.is_imported(t) or not clock or not clock.get("total") or not t.datetime_start:
            continue
        first = clock["first"] - t.datetime_start.timestamp()
        per_epoch = (clock["last"] - clock["first"]) / (clock["n"] - 1) if clock["n"] > 1 else first
        whole.append(first + per_epoch * (clock["total"] - 1))
    if whole:
        return median(whole)
    return median(
        [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and t.datetime_start
            and t.datetime_complete
            and not keys.is_imported(t)
        ]
    )
