"""Errors a user can fix: the sweep prints them as one `Error:` line, without a traceback."""

import re
from collections.abc import Callable


def mask_url(url: str | None) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (for any message)."""
    if not url:
        return str(url)
    return re.sub(r"(://[^/:@]*):[^@/]*@", r"\1:***@", url)


def duration(seconds: float) -> str:
    """42s, 5.1m, 2.0h: a duration in a message."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


class SweepError(Exception):
    """Base of the errors whose message is meant for the person who ran the sweep (exit 2)."""

    exit_code = 2


class SweepConfigError(SweepError, ValueError):
    """A setting or input that cannot work; the message says which and what is allowed."""


class TrackingUnavailableError(SweepError, ConnectionError):
    """The MLflow tracking server did not answer."""


class SweepStopped(SweepError, RuntimeError):
    """The sweep stopped on purpose (too many failures); every run is closed."""

    exit_code = 1


def unreachable(
    err: BaseException,
    kinds: tuple[type[BaseException], ...],
    refused: tuple[type[BaseException], ...] = (),
    also: Callable[[BaseException], bool] | None = None,
) -> bool:
    """Whether `err`, or an error it was raised from, says that a server could not be reached.

    The one classification of outages: each outage path passes its own exception set (the
    Optuna storage's database drivers, the MLflow server's HTTP client). `kinds` are the errors
    of a server that cannot be reached; `refused` are the errors of a server that answered and
    refused (a constraint, bad data), which end the search at once; `also` recognises what the
    types alone cannot tell (an HTTP 503, a dropped connection flagged on a driver's error).
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, refused):
            return False
        if isinstance(seen, kinds) or (also is not None and also(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# a server's reason in the words people search for, wherever it stands in a longer message
KNOWN_REASONS = ("Connection refused", "Read timed out", "Connection reset", "Name or service")


def first_line(err: BaseException) -> str:
    """Why a call to a server failed, in a few words ("Connection refused"), passwords masked.

    A wrapper that says nothing of the cause (Optuna's StorageInternalError: "An exception is
    raised during the commit") gives way to the error it was raised from; SQLAlchemy's
    "(psycopg.OperationalError) connection failed: " prefix is dropped.
    """
    while err.__cause__ is not None and type(err).__module__.startswith("optuna"):
        err = err.__cause__
    text = str(err).strip()
    for reason in KNOWN_REASONS:
        if reason in text:
            return reason
    if "error responses" in text:  # urllib3's "too many 5xx error responses"
        return "it answers with server errors"
    line = text.splitlines()[0] if text else type(err).__name__
    line = re.sub(r"^\([\w.]+\) ", "", line).removeprefix("connection failed: ")
    return mask_url(line)[:200]
