"""Errors a user can fix: the sweep prints them as one `Error:` line, without a traceback."""

import re


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
