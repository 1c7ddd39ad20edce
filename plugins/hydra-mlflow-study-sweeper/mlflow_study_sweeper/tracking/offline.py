"""What an outage of the MLflow tracking server looks like to the rest of the sweeper: which
errors say it cannot be reached, and the read that only it can answer while it is away.

The relay (tracking/relay) raises TrackingOffline; the runs' lifecycle, the store's waits and
the trial's resume catch it, without knowing the relay.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException

from mlflow_study_sweeper import errors

# a server that answers with these is busy, restarting, or its database is away: an outage
OUTAGE_STATUSES = (502, 503, 504)


class TrackingOffline(MlflowException):
    """A read only the server can answer, while it is unreachable."""


def _answered_as_outage(err: BaseException) -> bool:
    return isinstance(err, MlflowException) and err.get_http_status_code() in OUTAGE_STATUSES


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the tracking server could not be reached: no connection, a
    connection dropped, a timeout, a server that kept answering 5xx."""
    import requests
    import urllib3

    kinds = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.RetryError,
        urllib3.exceptions.MaxRetryError,
        urllib3.exceptions.ProtocolError,
        ConnectionError,
        TimeoutError,
    )
    return errors.unreachable(err, kinds, also=_answered_as_outage)


def refused(err: BaseException) -> bool:
    """Whether `err` is the server's answer (a run deleted, a param changed): an MlflowException
    raised from its response, with no error of this process's own under it. MLflow's client
    wraps those as well ("API request to ... failed with exception ..."), such as the KeyError
    that requests' read of os.environ raises while another thread sets a variable, which a
    second try does not meet."""
    if unreachable(err):
        return False
    seen: BaseException | None = err
    while seen is not None:
        if not isinstance(seen, MlflowException):
            return False
        seen = seen.__cause__ or seen.__context__
    return True
