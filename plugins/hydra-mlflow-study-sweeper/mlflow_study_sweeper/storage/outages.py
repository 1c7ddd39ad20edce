"""A database server that goes away and comes back: calls to the Optuna storage wait for it.

PostgreSQL and MySQL restart, fail over and drop connections. A storage call that fails because
the server cannot be reached is retried, with pauses that grow to MAX_PAUSE_S, until the server
answers or the outage has lasted longer than hydra.sweeper.storage_outage_limit; then it, and
every later call of this process, raises StorageUnreachable (one `Error:` line; a rerun resumes).
The console says once that the storage is gone and once that it is back. An error of any other
kind (a constraint, bad data) is raised at once. SQLite files and journals have no server, and
no retries: a full disk is one error, not ten minutes of waiting.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from mlflow_study_sweeper import errors
from mlflow_study_sweeper.errors import SweepError, duration, first_line, mask_url

T = TypeVar("T")
DEFAULT_LIMIT_S = 600.0
MAX_PAUSE_S = 5.0
LIMIT_KEY = "hydra.sweeper.storage_outage_limit"


class StorageUnreachable(SweepError, ConnectionError):
    """The storage's server did not answer within the limit; the sweep stops (exit 1)."""

    exit_code = 1


def _dropped(err: BaseException) -> bool:
    """A driver's error on a connection that SQLAlchemy found dropped, or psycopg's own
    OperationalError/InterfaceError (raised outside SQLAlchemy's wrappers)."""
    import sqlalchemy.exc

    if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
        return True
    return type(err).__module__.startswith("psycopg") and type(err).__name__ in (
        "OperationalError",
        "InterfaceError",
    )


def unreachable(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) says the database server cannot be
    reached: no connection, a connection dropped, a server starting up or shutting down, a
    deadlock that a retry resolves. A constraint or bad data is not."""
    import sqlalchemy.exc

    return errors.unreachable(
        err,
        (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError),
        refused=(sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError),
        also=_dropped,
    )


class Outages:
    """The outages of one storage seen by this process: retries, the console's two lines, the
    limit. Shared by the process's threads and by every storage object for the same URL."""

    def __init__(self, url: str, limit_s: float = DEFAULT_LIMIT_S, stream=None) -> None:
        self.where = mask_url(url)
        self.limit_s = limit_s
        self.stream = stream
        self.lock = threading.Lock()
        self.down_since: float | None = None  # time.monotonic() of the first failed call
        self.back_at: float | None = None  # ... of the first answer after the last outage
        self.last_error = ""
        self.gave_up = False

    def call(self, fn: Callable[[bool], T]) -> T:
        """fn(retrying) until the server answers; `retrying` tells fn that an earlier attempt
        may have been applied before its connection dropped (a commit whose answer was lost)."""
        attempt = 0
        while True:
            if self.gave_up:
                raise self.error()
            try:
                result = fn(attempt > 0)
            except Exception as err:
                if not unreachable(err):
                    raise
                pause = self.failed(err, attempt)
                time.sleep(pause)
                attempt += 1
                continue
            if self.down_since is not None:
                self.answered()
            return result

    def failed(self, err: BaseException, attempt: int) -> float:
        """Note a failed call; the pause before the next attempt. Raises past the limit."""
        now = time.monotonic()
        with self.lock:
            self.last_error = first_line(err)
            if self.down_since is None:
                self.down_since = now
                self.say(
                    f"The Optuna storage {self.where} is unreachable ({self.last_error}); "
                    f"waiting for it, up to {duration(self.limit_s)} ({LIMIT_KEY})"
                )
            waited = now - self.down_since
            if waited >= self.limit_s:
                self.gave_up = True
                raise self.error() from None
            return min(0.5 * 2**attempt, MAX_PAUSE_S, self.limit_s - waited + 0.01)

    def answered(self) -> None:
        with self.lock:
            if self.down_since is None:
                return
            now = time.monotonic()
            self.say(
                f"The Optuna storage is back after {duration(now - self.down_since)}; the sweep "
                f"goes on"
            )
            self.down_since, self.back_at = None, now

    def calm(self, grace_s: float) -> bool:
        """No outage now, nor in the last `grace_s` seconds: the heartbeats that could not be
        written during one have had time to be written again."""
        if self.down_since is not None:
            return False
        return self.back_at is None or time.monotonic() - self.back_at > grace_s

    def error(self) -> StorageUnreachable:
        return StorageUnreachable(
            f"the Optuna storage {self.where} was unreachable for more than "
            f"{duration(self.limit_s)} ({LIMIT_KEY}); last error: {self.last_error}. The finished "
            f"trials are kept there: once it is back, rerun the same command to resume"
        )

    def say(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)


_BY_URL: dict[str, Outages] = {}
_BY_URL_LOCK = threading.Lock()


def outages(url: str, limit_s: float | None = None) -> Outages:
    """This process's Outages of the storage at `url` (its limit updated when given)."""
    with _BY_URL_LOCK:
        found = _BY_URL.get(url)
        if found is None:
            found = _BY_URL[url] = Outages(url, DEFAULT_LIMIT_S if limit_s is None else limit_s)
        elif limit_s is not None:
            found.limit_s = limit_s
        return found


def calm(grace_s: float) -> bool:
    """No storage of this process is, or was in the last `grace_s` seconds, unreachable."""
    with _BY_URL_LOCK:
        known = list(_BY_URL.values())
    return all(o.calm(grace_s) for o in known)


def has_server(url: str) -> bool:
    return url.startswith(("postgresql", "mysql"))
