"""The end of a sweep, exactly once across workers, and redone when it was cut short.

A claim per finished-trial count lives in the study's own system attributes (invisible to
`optuna.get_all_study_names` and optuna-dashboard's study list). Taking it is atomic: an INSERT
under the table's unique key on RDB storages, a file lock beside a journal file, a lock in
memory. The claim records each step of the end as it is done, so a worker that takes over a
dead worker's claim skips what was done and redoes the rest; registering checks the registry
for the version it may already have made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from hydra_plugins.mlflow_optuna_sweeper._study import (
    WORKER_HOST,
    WORKER_PID,
    machine_key,
    pid_alive,
    worker_id,
)

CLAIM_PREFIX = "mlflow_optuna.end."
_MEMORY_LOCK = threading.Lock()


def _backend(study: optuna.Study):
    storage = study._storage
    return getattr(storage, "_backend", storage)  # _CachedStorage wraps the RDB storage


def insert_once(study: optuna.Study, key: str, value: Any) -> bool:
    """Set the study system attribute `key` if no worker has: True for exactly one of them."""
    backend = _backend(study)
    if isinstance(backend, optuna.storages.RDBStorage):
        import sqlalchemy
        from optuna.storages._rdb import models

        table = models.StudySystemAttributeModel.__table__
        try:
            with backend.engine.begin() as connection:
                connection.execute(
                    sqlalchemy.insert(table).values(
                        study_id=study._study_id, key=key, value_json=json.dumps(value)
                    )
                )
        except sqlalchemy.exc.IntegrityError:
            return False
        return True
    with study_lock(study):
        if key in study._storage.get_study_system_attrs(study._study_id):
            return False
        study._storage.set_study_system_attr(study._study_id, key, value)
        return True


@contextlib.contextmanager
def study_lock(study: optuna.Study):
    """Mutual exclusion among the study's workers where the storage has no transactions."""
    backend = _backend(study)
    if isinstance(backend, optuna.storages.JournalStorage):
        path = Path(backend._backend._file_path).with_suffix(".end-lock")
        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:  # in memory: one process
        with _MEMORY_LOCK:
            yield


class EndClaim:
    """Who does the end of the sweep at `finished` trials, and how far they got."""

    def __init__(self, study: optuna.Study, finished: int, grace_s: float) -> None:
        self.study = study
        self.key = f"{CLAIM_PREFIX}{finished}"
        self.grace_s = grace_s
        self.value: dict[str, Any] = {}
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    # -- reading --
    def current(self) -> dict[str, Any] | None:
        attrs = self.study._storage.get_study_system_attrs(self.study._study_id)
        return attrs.get(self.key)

    def holder_alive(self, value: dict[str, Any]) -> bool:
        if value.get(WORKER_HOST) == machine_key():
            return pid_alive(int(value[WORKER_PID]))
        return time.time() - float(value.get("at", 0)) < self.grace_s

    def describe_holder(self, value: dict[str, Any]) -> str:
        host = str(value.get(WORKER_HOST, "?")).split(":")[0]
        return f"the worker on {host} with pid {value.get(WORKER_PID)}"

    # -- taking it --
    def acquire(self) -> bool:
        """True for exactly one live worker; takes over the claim of a dead one."""
        mine = {**worker_id(), "state": "claimed", "at": time.time(), "steps": {}}
        current = self.current()
        if current is None:
            if not self._insert(mine):
                return False
        elif current.get("state") == "done" or self.holder_alive(current):
            return False
        else:
            mine["steps"] = current.get("steps", {})
            mine["taken_over"] = True
            if not self._replace(current, mine):
                return False
        self.value = mine
        self._beat = threading.Thread(target=self._keep_alive, daemon=True)
        self._beat.start()
        return True

    def _insert(self, value: dict[str, Any]) -> bool:
        return insert_once(self.study, self.key, value)

    def _replace(self, old: dict[str, Any], new: dict[str, Any]) -> bool:
        backend = _backend(self.study)
        if isinstance(backend, optuna.storages.RDBStorage):
            import sqlalchemy
            from optuna.storages._rdb import models

            table = models.StudySystemAttributeModel.__table__
            with backend.engine.begin() as connection:
                result = connection.execute(
                    sqlalchemy.update(table)
                    .where(table.c.study_id == self.study._study_id)
                    .where(table.c.key == self.key)
                    .where(table.c.value_json == json.dumps(old))
                    .values(value_json=json.dumps(new))
                )
            return result.rowcount == 1
        with self._lock():
            if self.current() != old:
                return False
            self._set(new)
            return True

    def _lock(self):
        return study_lock(self.study)

    def _set(self, value: dict[str, Any]) -> None:
        self.study._storage.set_study_system_attr(self.study._study_id, self.key, value)

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
        self._set(self.value)

    def finish(self) -> None:
        self._stop.set()
        self.value["state"] = "done"
        self.record()

    def release(self) -> None:
        """Stop keeping the claim alive (the process is leaving with the end not done)."""
        self._stop.set()


@dataclass
class Published:
    name: str
    model_uri: str
    version: str
    metric: str
    value: float | None
    alias: str
    moved: bool
    previous: str | None
    previous_value: float | None

    def line(self) -> str:
        shown = f"{self.metric}={self.value:.4f}" if self.value is not None else "no metric"
        head = f"model: {self.name} version {self.version} ({self.model_uri}), {shown}; "
        if self.previous is None:
            return head + f"it is the first @{self.alias}: models:/{self.name}@{self.alias}"
        before = f"{self.metric}={self.previous_value:.4f}" if self.previous_value else "?"
        if self.moved:
            return head + f"@{self.alias} moved from version {self.previous} ({before})"
        return head + f"@{self.alias} stays on version {self.previous} ({before} is not beaten)"
