"""The end of a sweep, exactly once across workers, and redone when it was cut short.

A claim per finished-trial count lives in the study's own system attributes (invisible to
`optuna.get_all_study_names` and optuna-dashboard's study list). Taking it is atomic (see
optuna_internals.insert_once). The claim records each step of the end as it is done, so a
worker that takes over a dead worker's claim skips what was done and redoes the rest;
registering checks the registry for the version it may already have made.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import optuna

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.storage.liveness import (
    host_name,
    is_alive_here,
    label_of,
    worker_label,
)


class EndClaim:
    """Who does the end of the sweep at `finished` trials, and how far they got."""

    def __init__(self, study: optuna.Study, finished: int, grace_s: float) -> None:
        self.study = study
        self.key = keys.END_CLAIM.format(finished=finished)
        self.grace_s = grace_s
        self.value: dict[str, Any] = {}
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # -- reading --
    def current(self) -> dict[str, Any] | None:
        return optuna_internals.study_system_attrs(self.study).get(self.key)

    def holder_alive(self, value: dict[str, Any]) -> bool:
        here = is_alive_here(label_of(value))
        if here is not None:
            return here
        return time.time() - float(value.get("at", 0)) < self.grace_s

    def describe_holder(self, value: dict[str, Any]) -> str:
        label = label_of(value)
        return f"the worker on {host_name(label['host'])} with pid {label['pid']}"

    # -- taking it --
    def acquire(self) -> bool:
        """True for exactly one live worker; takes over the claim of a dead one."""
        mine = {**worker_label(), "state": "claimed", "at": time.time(), "steps": {}}
        current = self.current()
        if current is None:
            if not optuna_internals.insert_once(self.study, self.key, mine):
                return False
        elif current.get("state") == "done" or self.holder_alive(current):
            return False
        else:
            mine["steps"] = current.get("steps", {})
            mine["taken_over"] = True
            if not optuna_internals.replace_if(self.study, self.key, current, mine):
                return False
        self.value = mine
        self._beat = threading.Thread(target=self._keep_alive, daemon=True)
        self._beat.start()
        return True

    def _keep_alive(self) -> None:
        while not self._stop.wait(max(1.0, self.grace_s / 6)):
            with contextlib.suppress(Exception):
                self.record()

    # -- progress --
    def done_step(self, step: str) -> Any:
        return self.value.get("steps", {}).get(step)

    def record(self, step: str | None = None, result: Any = True) -> None:
        if step is not None:
            self.value.setdefault("steps", {})[step] = result
        self.value["at"] = time.time()
        optuna_internals.set_study_system_attr(self.study, self.key, self.value)

    def finish(self) -> None:
        self.release()
        self.value["state"] = "done"
        self.record()

    def release(self) -> None:
        """Stop keeping the claim alive (the process is leaving, or the end is done)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
