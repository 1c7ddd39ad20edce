"""The MLflow tracking server goes away and comes back: training goes on, and what the sweep and
its jobs log waits on local disk, in order, until the server answers again.

While a sweep tracks into an `mlflow server` (http:// or https://), this process's MLflow store
for that URI is a RelayStore. A write goes to the server at once while it answers. When a write
finds it unreachable (after MLflow's own retries, shortened here to seconds), the relay is
offline: that write and every later one is appended to this process's journal (a JSON-lines
file in the journal folder) and answered at once. A run created offline has a provisional id
("offline" and 25 hex digits) that its later writes, its job and the study use until it exists
on the server. A thread probes the server; when it answers, the journal is delivered in order,
provisional ids are replaced by the real ones (recorded in runs.jsonl, and on the runs' trials),
and the relay is online again.

Artifacts logged while offline (a checkpoint, say) are copied into the journal folder and
uploaded in their place in the order. Reads answer from what this process knows of the runs it
touched (info, params, tags, the metrics it logged); a search needs the server and raises
TrackingOffline, which the sweep's own searches expect.

A process killed during an outage leaves its journal behind: the next sweep process that tracks
into the same server from this machine delivers it first (an flock tells a dead owner from a
live one).

MLflow's async logging (`mlflow.config.enable_async_logging`) was the first candidate: it queues
metrics, params and tags in memory, drops a batch whose retries fail, and creates and ends runs
synchronously; it survives neither an outage longer than its retries nor a kill.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking.rest_store import RestStore

from hydra_plugins.mlflow_study_sweeper import _contract, _keys, _mlflow_internals
from hydra_plugins.mlflow_study_sweeper._errors import duration, mask_url

log = logging.getLogger(__name__)

PROVISIONAL = "offline"  # the first letters of a run id given while the server was away
OFFLINE_ROOT = "mlflow-artifacts:/offline-runs"  # the artifact root of such a run, until then
MAX_PROBE_S = 10.0
REMIND_S = 600.0  # a long outage is mentioned again this often
# MLflow retries a refused request for about 4 minutes by default; the relay needs to know within
# seconds that the server is away (the job then trains on instead of waiting)
HTTP_RETRIES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


class TrackingOffline(MlflowException):
    """A read only the server can answer, while it is unreachable."""


def is_provisional(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(PROVISIONAL)


def new_key() -> str:
    """An id for a run the client asks for: its provisional id if the server is away."""
    return PROVISIONAL + uuid.uuid4().hex[:25]


def unreachable(err: BaseException) -> bool:
    """Whether `err` (or an error it came from) says the server could not be reached: no
    connection, a connection dropped, a timeout, a server that kept answering 5xx (busy,
    restarting, its database away)."""
    import requests
    import urllib3

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(
            seen,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.ChunkedEncodingError,
                requests.exceptions.RetryError,
                urllib3.exceptions.MaxRetryError,
                urllib3.exceptions.ProtocolError,
                ConnectionError,
                TimeoutError,
            ),
        ):
            return True
        if isinstance(seen, MlflowException) and seen.get_http_status_code() in (502, 503, 504):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def first_line(err: BaseException) -> str:
    """The innermost reason, in a few words ("Connection refused")."""
    text = str(err)
    for reason in ("Connection refused", "Read timed out", "Connection reset", "Name or service"):
        if reason in text:
            return reason
    if "error responses" in text:
        return "it answers with server errors"
    return mask_url(text.strip().splitlines()[0] if text.strip() else type(err).__name__)[:200]


# ---- this process's knowledge of runs --------------------------------------------------------
class Shadow:
    """What this process knows of the runs it created, read or wrote: enough for a job's
    `mlflow.start_run()` and the sweep's own reads while the server is away."""

    def __init__(self, size: int = 512) -> None:
        self.runs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.size = size
        self.lock = threading.Lock()

    def _keep(self, run_id: str, record: dict[str, Any]) -> None:
        self.runs[run_id] = record
        self.runs.move_to_end(run_id)
        while len(self.runs) > self.size:
            self.runs.popitem(last=False)

    def saw(self, run: Run) -> None:
        """A run as the server has it (its latest metric values, not their history)."""
        info = run.info
        with self.lock:
            old = self.runs.get(info.run_id, {})
            history = old.get("history", {})
            for key, value in run.data.metrics.items():
                if not history.get(key):
                    history[key] = [Metric(key, value, 0, 0)]
            self._keep(
                info.run_id,
                {
                    "info": {
                        "run_id": info.run_id,
                        "experiment_id": info.experiment_id,
                        "user_id": info.user_id,
                        "status": info.status,
                        "start_time": info.start_time,
                        "end_time": info.end_time,
                        "lifecycle_stage": info.lifecycle_stage,
                        "artifact_uri": info.artifact_uri,
                        "run_name": info.run_name,
                    },
                    "params": dict(run.data.params),
                    "tags": dict(run.data.tags),
                    "history": history,
                },
            )

    def created(self, entry: dict[str, Any]) -> None:
        """A run created offline, as its create_run entry describes it."""
        run_id = entry["run_id"]
        with self.lock:
            self._keep(
                run_id,
                {
                    "info": {
                        "run_id": run_id,
                        "experiment_id": str(entry["experiment_id"]),
                        "user_id": entry["user_id"] or "",
                        "status": "RUNNING",
                        "start_time": entry["start_time"],
                        "end_time": None,
                        "lifecycle_stage": "active",
                        "artifact_uri": f"{OFFLINE_ROOT}/{run_id}/artifacts",
                        "run_name": entry["run_name"] or entry["tags"].get("mlflow.runName"),
                    },
                    "params": {},
                    "tags": dict(entry["tags"]),
                    "history": {},
                },
            )

    def wrote(self, entry: dict[str, Any]) -> None:
        """A write (sent or kept) applied to what is known of its run."""
        with self.lock:
            record = self.runs.get(entry.get("run_id", ""))
            if record is None:
                return
            op = entry["op"]
            if op == "update":
                record["info"]["status"] = entry["status"]
                record["info"]["end_time"] = entry["end_time"]
                if entry["run_name"]:
                    record["info"]["run_name"] = entry["run_name"]
            elif op == "batch":
                record["params"].update(dict(entry["params"]))
                record["tags"].update(dict(entry["tags"]))
                for key, value, timestamp, step in entry["metrics"]:
                    record["history"].setdefault(key, []).append(
                        Metric(key, value, timestamp, step)
                    )
            elif op == "delete_tag":
                record["tags"].pop(entry["key"], None)

    def renamed(self, old: str, new: str) -> None:
        with self.lock:
            record = self.runs.get(old)
            if record is not None and new not in self.runs:
                record = json.loads(json.dumps(record, default=_metric_json))
                record["history"] = {
                    k: [Metric(*m) for m in v] for k, v in record["history"].items()
                }
                record["info"]["run_id"] = new
                self._keep(new, record)

    def run(self, run_id: str) -> Run | None:
        with self.lock:
            record = self.runs.get(run_id)
            if record is None:
                return None
            metrics = [h[-1] for h in record["history"].values() if h]
            return Run(
                RunInfo(**record["info"]),
                RunData(
                    metrics=metrics,
                    params=[Param(k, v) for k, v in record["params"].items()],
                    tags=[RunTag(k, v) for k, v in record["tags"].items()],
                ),
            )

    def history(self, run_id: str, key: str) -> list[Metric] | None:
        with self.lock:
            record = self.runs.get(run_id)
            return None if record is None else list(record["history"].get(key, []))


def _metric_json(value: Any) -> Any:
    if isinstance(value, Metric):
        return [value.key, value.value, value.timestamp, value.step]
    raise TypeError(type(value).__name__)


# ---- the journal on disk ---------------------------------------------------------------------
class Journal:
    """Writes that wait for the server: <folder>/<name>.jsonl, one JSON object per line, and
    <name>.done, one line per entry delivered. Its process holds an flock on it while it lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done_path = path.with_suffix(".done")
        self.handle: Any = None
        self.done: Any = None

    def own(self) -> bool:
        """Take the journal's lock: True if no live process holds it (its owner is gone)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held while it lives)
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            self.handle = None
            return False
        return True

    def append(self, entry: dict[str, Any]) -> None:
        if self.handle is None and not self.own():
            raise RuntimeError(f"the journal {self.path} is held by another process")
        self.handle.write(json.dumps(entry) + "\n")
        self.handle.flush()  # in the page cache: a killed process loses nothing

    def delivered(self) -> None:
        if self.done is None:
            self.done = open(self.done_path, "a", encoding="utf-8")  # noqa: SIM115
        self.done.write(".\n")
        self.done.flush()

    def waiting(self) -> list[dict[str, Any]]:
        """The entries not delivered yet (a torn last line, from a kill mid-write, is dropped)."""
        done = 0
        with contextlib.suppress(FileNotFoundError):
            done = len(self.done_path.read_text().splitlines())
        entries = []
        with contextlib.suppress(FileNotFoundError), open(self.path, encoding="utf-8") as file:
            for line in file:
                with contextlib.suppress(json.JSONDecodeError):
                    entries.append(json.loads(line))
        return entries[done:]

    def remove(self) -> None:
        """All delivered: the files go (the lock with them)."""
        for path in (self.path, self.done_path):
            path.unlink(missing_ok=True)
        self.close()

    def close(self) -> None:
        for handle in (self.handle, self.done):
            if handle is not None:
                handle.close()
        self.handle = self.done = None


def journal_folder(uri: str) -> Path:
    """Where this machine keeps the writes for the server at `uri` (SWEEP_JOURNAL_DIR, else the
    user's cache folder), one subfolder per server."""
    base = os.environ.get(_contract.JOURNAL_DIR)
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        base = os.path.join(cache, "mlflow-study-sweeper", "journal")
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(base) / digest


# ---- the relay ---------------------------------------------------------------------------------
class Relay:
    """One tracking server's writes from this process: sent, or kept and delivered later."""

    def __init__(self, uri: str, folder: Path, quiet: bool = False, stream=None) -> None:
        self.uri = uri
        self.folder = folder
        self.quiet = quiet
        self.stream = stream
        self.lock = threading.RLock()
        # (the journal that holds it, the entry): a dead process's entries are acknowledged in
        # its own journal
        self.pending: deque[tuple[Journal, dict[str, Any]]] = deque()
        name = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        self.journal = Journal(folder / f"{name}.jsonl")
        self.offline_since: float | None = None
        self.last_said = 0.0
        self.reason = ""
        self.sent_late = 0
        self.rejected = 0
        self.thread: threading.Thread | None = None
        self.shadow = Shadow()
        self.on_mapped: list[Callable[[str, str], None]] = []
        self.store: RelayStore | None = None
        self.mapped: dict[str, str] = {}
        self.load_mapped()

    # -- ids --
    def load_mapped(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for line in (self.folder / "runs.jsonl").read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, ValueError):
                    old, new = json.loads(line)
                    self.mapped[old] = new
                    _keys.RUN_ID_ALIASES[old] = new

    def map(self, old: str, new: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "runs.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps([old, new]) + "\n")
        self.mapped[old] = new
        _keys.RUN_ID_ALIASES[old] = new
        self.shadow.renamed(old, new)
        for callback in self.on_mapped:
            try:
                callback(old, new)
            except Exception as err:  # the study may be away too: the alias still holds
                log.warning("run %s is now %s; the study could not be told: %s", old, new, err)

    def real(self, run_id: str | None) -> str | None:
        if not is_provisional(run_id):
            return run_id
        if run_id not in self.mapped:
            self.load_mapped()  # another process of this machine may have delivered it
        return self.mapped.get(run_id, run_id)

    def translate(self, text: str) -> str:
        """A tag or param value that names a provisional run names the real one."""
        if PROVISIONAL not in text:
            return text
        for old, new in self.mapped.items():
            text = text.replace(old, new)
        return text

    # -- writes --
    def queued(self) -> bool:
        return self.offline_since is not None or bool(self.pending)

    def write(self, entry: dict[str, Any], offline_answer: Callable[[], Any]) -> Any:
        """Send `entry` now, or keep it (offline, or behind kept ones); the server's answer, or
        `offline_answer()` when it was kept."""
        with self.lock:
            if self.queued():
                self.keep(entry)
                return offline_answer()
        try:
            answer = self.store.send(entry)
        except Exception as err:
            if not unreachable(err):
                raise
            with self.lock:
                self.went_offline(err)
                self.keep(entry)
            return offline_answer()
        self.shadow.wrote(entry)
        return answer

    def keep(self, entry: dict[str, Any]) -> None:
        self.journal.append(entry)
        self.pending.append((self.journal, entry))
        if entry["op"] == "create_run":
            self.shadow.created(entry)
        else:
            self.shadow.wrote(entry)

    def went_offline(self, err: BaseException) -> None:
        """The server did not answer: say so once, and start delivering when it is back."""
        with self.lock:
            if self.offline_since is None:
                self.offline_since = self.last_said = time.monotonic()
                self.reason = first_line(err)
                self.say(
                    f"The MLflow server {mask_url(self.uri)} is unreachable ({self.reason}): "
                    f"training goes on, and what the sweep logs is kept in {self.folder} and sent "
                    f"when it is back"
                )
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self.deliver, daemon=True)
                self.thread.start()

    # -- delivery --
    def deliver(self) -> None:
        """Probe the server; when it answers, send what was kept, in order."""
        pause = 1.0
        while True:
            time.sleep(pause)
            pause = min(pause * 2, MAX_PROBE_S)
            if not self.store.answers():
                self.remind()
                continue
            if self.send_kept():
                return

    def send_kept(self) -> bool:
        """Send the kept entries in order; True when none is left (the relay is online)."""
        failures = 0
        while True:
            with self.lock:
                if not self.pending:
                    self.back()
                    return True
                journal, entry = self.pending[0]
            try:
                self.store.send(entry, replay=True)
            except Exception as err:
                if unreachable(err) and failures < 5:
                    failures += 1
                    if not self.store.answers():
                        return False
                    continue
                # the server refuses this one (a run deleted meanwhile, a changed param): the
                # rest goes on, and the entry is kept aside with the reason
                self.reject(entry, err)
            failures = 0
            with self.lock:
                self.pending.popleft()
                journal.delivered()
                self.sent_late += 1
            if entry["op"] == "artifacts":
                shutil.rmtree(self.folder / "files" / entry["id"], ignore_errors=True)

    def reject(self, entry: dict[str, Any], err: BaseException) -> None:
        self.rejected += 1
        with open(self.folder / "rejected.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps({"entry": entry, "error": str(err)[:1000]}) + "\n")
        log.warning(
            "the MLflow server refused a kept %s of run %s: %s (kept in %s/rejected.jsonl)",
            entry["op"],
            entry.get("run_id"),
            str(err).splitlines()[0][:300] if str(err) else type(err).__name__,
            self.folder,
        )

    def back(self) -> None:
        if self.offline_since is not None:
            away = time.monotonic() - self.offline_since
            self.say(
                f"The MLflow server is back after {duration(away)}: {self.sent_late} writes kept "
                f"meanwhile were delivered"
            )
        self.offline_since = None
        self.sent_late = 0
        if self.journal.handle is not None:
            self.journal.remove()

    def remind(self) -> None:
        now = time.monotonic()
        if self.offline_since is not None and now - self.last_said > REMIND_S:
            self.last_said = now
            self.say(
                f"The MLflow server is still unreachable after "
                f"{duration(now - self.offline_since)}; {len(self.pending)} writes are kept"
            )

    def wait(self, deadline: float | None = None, poll_s: float = 0.5) -> bool:
        """Until every kept write is delivered (True), or time.time() passes `deadline`."""
        while self.queued():
            if deadline is not None and time.time() > deadline:
                return False
            with self.lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self.deliver, daemon=True)
                    self.thread.start()
            time.sleep(poll_s)
        return True

    # -- journals of processes that died --
    def orphans(self) -> Iterator[Journal]:
        for path in sorted(self.folder.glob("*.jsonl")):
            if path.name in ("runs.jsonl", "rejected.jsonl") or path == self.journal.path:
                continue
            journal = Journal(path)
            if journal.own():
                yield journal

    def deliver_orphans(self) -> int:
        """Send, before this process's own, what processes killed during an outage kept for
        this server on this machine; returns how many writes were sent."""
        total = 0
        for journal in self.orphans():
            entries = journal.waiting()
            if not entries:
                journal.remove()
                continue
            self.say(
                f"Sending {len(entries)} writes that an earlier process ({journal.path.stem}) "
                f"kept while the MLflow server was away"
            )
            with self.lock:
                self.pending.extendleft((journal, e) for e in reversed(entries))
            if not self.send_kept():
                with self.lock:  # still away: they stay in their journal, for the next try
                    self.pending = deque(p for p in self.pending if p[0] is not journal)
                journal.close()
                break
            total += len(entries)
            journal.remove()
        return total

    def farewell(self) -> None:
        """At exit: where the writes not yet delivered wait (the next sweep sends them)."""
        if self.pending:
            self.say(
                f"{len(self.pending)} writes for the MLflow server {mask_url(self.uri)} are kept "
                f"in {self.folder}: the next sweep to it from this machine sends them first"
            )
        self.journal.close()

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream or sys.stderr, flush=True)


# ---- MLflow's store and artifact repository for the server, through the relay ---------------
class RelayStore(RestStore):
    """MLflow's REST store, whose run writes and reads go through the relay."""

    def __init__(self, get_host_creds: Callable[[], Any], relay: Relay) -> None:
        super().__init__(get_host_creds)
        self.relay = relay
        relay.store = self

    # -- writes --
    def create_run(self, experiment_id, user_id, start_time, tags, run_name):
        key = new_key()
        entry = {
            "op": "create_run",
            "run_id": key,
            "experiment_id": str(experiment_id),
            "user_id": user_id,
            "start_time": start_time,
            "tags": {t.key: t.value for t in tags} | {_keys.CLIENT_KEY: key},
            "run_name": run_name,
        }
        run = self.relay.write(entry, lambda: self.relay.shadow.run(key))
        if not is_provisional(run.info.run_id):
            self.relay.shadow.saw(run)
        return run

    def update_run_info(self, run_id, run_status, end_time, run_name):
        entry = {
            "op": "update",
            "run_id": run_id,
            "status": RunStatus.to_string(run_status)
            if isinstance(run_status, int)
            else str(run_status),
            "end_time": end_time,
            "run_name": run_name,
        }
        known = self.relay.shadow.run(self.relay.real(run_id) or run_id)
        return self.relay.write(entry, lambda: known.info if known else None)

    def log_batch(self, run_id, metrics, params, tags):
        entry = {
            "op": "batch",
            "run_id": run_id,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics],
            "params": [[p.key, p.value] for p in params],
            "tags": [[t.key, t.value] for t in tags],
        }
        self.relay.write(entry, lambda: None)

    def log_metric(self, run_id, metric):
        self.log_batch(run_id, [metric], [], [])

    def log_param(self, run_id, param):
        self.log_batch(run_id, [], [param], [])

    def set_tag(self, run_id, tag):
        self.log_batch(run_id, [], [], [tag])

    def delete_tag(self, run_id, key):
        self.relay.write({"op": "delete_tag", "run_id": run_id, "key": key}, lambda: None)

    def send(self, entry: dict[str, Any], replay: bool = False) -> Any:
        """One entry to the server, provisional ids replaced by real ones."""
        op = entry["op"]
        run_id = self.relay.real(entry.get("run_id"))
        if op == "create_run":
            return self.send_create(entry, replay)
        if is_provisional(run_id):
            raise MlflowException(f"run {run_id} was never created on the server")
        if op == "update":
            status = RunStatus.from_string(entry["status"])
            return RestStore.update_run_info(
                self, run_id, status, entry["end_time"], entry["run_name"]
            )
        if op == "batch":
            t = self.relay.translate
            return RestStore.log_batch(
                self,
                run_id,
                [Metric(*m) for m in entry["metrics"]],
                [Param(k, t(v)) for k, v in entry["params"]],
                [RunTag(k, t(v)) for k, v in entry["tags"]],
            )
        if op == "delete_tag":
            return RestStore.delete_tag(self, run_id, entry["key"])
        if op == "artifacts":
            return send_artifacts(self.relay, entry)
        raise ValueError(f"unknown journal entry {op!r}")

    def send_create(self, entry: dict[str, Any], replay: bool) -> Run:
        """The run, created once: a run the server made before its answer was lost is found by
        its client key, and its provisional id is mapped to the real one."""
        key = entry["run_id"]
        if not replay:
            return self.create_from(entry)
        if key in self.relay.mapped:
            return RestStore.get_run(self, self.relay.mapped[key])
        found, _ = RestStore._search_runs(
            self,
            [entry["experiment_id"]],
            f"tags.`{_keys.CLIENT_KEY}` = '{key}'",
            ViewType.ALL,
            1,
            None,
            None,
        )
        run = found[0] if found else self.create_from(entry)
        self.relay.map(key, run.info.run_id)
        return run

    def create_from(self, entry: dict[str, Any]) -> Run:
        t = self.relay.translate
        return RestStore.create_run(
            self,
            entry["experiment_id"],
            entry["user_id"],
            entry["start_time"],
            [RunTag(k, t(v)) for k, v in entry["tags"].items()],
            entry["run_name"],
        )

    # -- reads --
    def get_run(self, run_id):
        real = self.relay.real(run_id)
        known = self.relay.shadow.run(real)
        if is_provisional(real) or (self.relay.queued() and known is not None):
            if known is None:
                raise TrackingOffline(f"run {run_id} is not known while the server is away")
            return known
        try:
            run = RestStore.get_run(self, real)
        except Exception as err:
            if not unreachable(err):
                raise
            self.relay.went_offline(err)
            if known is None:
                raise TrackingOffline(
                    f"the MLflow server is unreachable and run {run_id} is not known here"
                ) from None
            return known
        self.relay.shadow.saw(run)
        return run

    def get_metric_history(self, run_id, metric_key, max_results=None, page_token=None):
        real = self.relay.real(run_id)
        known = self.relay.shadow.history(real, metric_key)
        if is_provisional(real) or self.relay.queued():
            if known is None:
                raise TrackingOffline(f"run {run_id} is not known while the server is away")
            return PagedList(known, None)
        try:
            return RestStore.get_metric_history(self, real, metric_key, max_results, page_token)
        except Exception as err:
            if not unreachable(err) or known is None:
                raise
            self.relay.went_offline(err)
            return PagedList(known, None)

    def _search_runs(
        self, experiment_ids, filter_string, run_view_type, max_results, order_by, page_token
    ):
        if self.relay.queued():
            raise TrackingOffline("searching runs needs the MLflow server, which is away")
        text = self.relay.translate(filter_string or "") or filter_string
        try:
            return RestStore._search_runs(
                self, experiment_ids, text, run_view_type, max_results, order_by, page_token
            )
        except Exception as err:
            if not unreachable(err):
                raise
            self.relay.went_offline(err)
            raise TrackingOffline(f"the MLflow server is unreachable ({first_line(err)})") from None

    def search_logged_models(self, *args: Any, **kwargs: Any) -> Any:
        """MLflow lists a run's artifacts with its logged models: none are logged by training,
        so while the server is away the answer is none."""
        if self.relay.queued():
            return PagedList([], None)
        try:
            return RestStore.search_logged_models(self, *args, **kwargs)
        except Exception as err:
            if not unreachable(err):
                raise
            self.relay.went_offline(err)
            return PagedList([], None)

    def answers(self) -> bool:
        """Whether the server answers a request that needs its database."""
        try:
            RestStore.search_experiments(self, max_results=1)
        except Exception as err:
            if unreachable(err):
                return False
            raise
        return True


class RelayArtifacts(MlflowArtifactsRepository):
    """The artifacts of a run on the server (mlflow-artifacts:/...): uploads and deletes while
    the server is away are kept in the relay's journal, in their place in the order."""

    def log_artifact(self, local_file, artifact_path=None):
        self.relay_or_send("log", artifact_path, [local_file], super().log_artifact, local_file)

    def log_artifacts(self, local_dir, artifact_path=None):
        files = [str(p) for p in Path(local_dir).rglob("*") if p.is_file()]
        self.relay_or_send(
            "log_dir", artifact_path, files, super().log_artifacts, local_dir, base=local_dir
        )

    def delete_artifacts(self, artifact_path=None):
        self.relay_or_send("delete", artifact_path, [], super().delete_artifacts)

    def relay_or_send(self, action, path, files, send, *args, base=None) -> None:
        relay = ACTIVE
        provisional = self.root.startswith(OFFLINE_ROOT)
        if relay is None or (not provisional and not relay.queued()):
            try:
                return send(*args, path)
            except Exception as err:
                if relay is None or not unreachable(err):
                    raise
                relay.went_offline(err)
        if provisional and relay is not None and relay.real(self.run_key()) != self.run_key():
            return getattr(self.mapped_repository(), send.__name__)(*args, path)
        entry_id = uuid.uuid4().hex
        stored = relay.folder / "files" / entry_id
        for file in files:
            target = stored / (os.path.relpath(file, base) if base else os.path.basename(file))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
        entry = {
            "op": "artifacts",
            "id": entry_id,
            "action": "delete" if action == "delete" else "log",
            "root": self.root,
            "path": path,
            "run_id": self.run_key() if provisional else None,
        }
        with relay.lock:
            relay.keep(entry)

    @property
    def root(self) -> str:
        return self._relay_root

    def run_key(self) -> str:
        return self.root[len(OFFLINE_ROOT) + 1 :].split("/", 1)[0]

    def mapped_repository(self):
        return real_repository(ACTIVE, self.root)

    def list_artifacts(self, path=None):
        relay = ACTIVE
        if relay is not None and self.root.startswith(OFFLINE_ROOT):
            if relay.real(self.run_key()) != self.run_key():
                return self.mapped_repository().list_artifacts(path)
            return kept_listing(relay, self.root, path)
        if relay is not None and relay.queued():  # what is kept; the server's files are away
            return kept_listing(relay, self.root, path)
        try:
            return super().list_artifacts(path)
        except Exception as err:
            if relay is None or not unreachable(err):
                raise
            relay.went_offline(err)
            return kept_listing(relay, self.root, path)

    def _download_file(self, remote_file_path, local_path):
        relay = ACTIVE
        if relay is not None:
            kept = kept_file(relay, self.root, remote_file_path)
            if kept is not None:
                shutil.copy2(kept, local_path)
                return None
            if self.root.startswith(OFFLINE_ROOT):
                return self.mapped_repository()._download_file(remote_file_path, local_path)
        return super()._download_file(remote_file_path, local_path)


def make_relay_artifacts(artifact_uri, tracking_uri=None, registry_uri=None):
    uri = artifact_uri
    if uri.startswith(OFFLINE_ROOT):  # resolved to a URL like any, never requested before mapped
        repo = RelayArtifacts(uri, tracking_uri=tracking_uri or (ACTIVE and ACTIVE.uri))
    else:
        repo = RelayArtifacts(uri, tracking_uri=tracking_uri, registry_uri=registry_uri)
    repo._relay_root = uri
    return repo


def real_repository(relay: Relay, root: str):
    """The plain repository of `root`, a provisional run's root replaced by its real one."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if root.startswith(OFFLINE_ROOT):
        key, _, rest = root[len(OFFLINE_ROOT) + 1 :].partition("/")
        real = relay.real(key)
        if is_provisional(real):
            raise MlflowException(f"run {key} was never created on the server")
        base = RestStore.get_run(relay.store, real).info.artifact_uri
        root = base + "/" + rest.removeprefix("artifacts").lstrip("/") if rest else base
        root = root.rstrip("/")
    if root.startswith("mlflow-artifacts:"):
        return MlflowArtifactsRepository(root, tracking_uri=relay.uri)
    return get_artifact_repository(root)


def send_artifacts(relay: Relay, entry: dict[str, Any]) -> None:
    repository = real_repository(relay, entry["root"])
    if entry["action"] == "delete":
        repository.delete_artifacts(entry["path"])
        return
    stored = relay.folder / "files" / entry["id"]
    if stored.exists():
        repository.log_artifacts(str(stored), entry["path"])


def _kept_logs(relay: Relay, root: str) -> list[tuple[str, Path]]:
    """(artifact path, kept file) for the uploads of `root` waiting in the relay, in order;
    a later delete removes the paths under it."""
    found: dict[str, Path] = {}
    with relay.lock:
        entries = [e for _, e in relay.pending if e["op"] == "artifacts" and e["root"] == root]
    for entry in entries:
        prefix = (entry["path"] or "").strip("/")
        if entry["action"] == "delete":
            for path in [
                p for p in found if not prefix or p == prefix or p.startswith(prefix + "/")
            ]:
                del found[path]
            continue
        stored = relay.folder / "files" / entry["id"]
        for file in stored.rglob("*"):
            if file.is_file():
                relative = file.relative_to(stored).as_posix()
                found[f"{prefix}/{relative}" if prefix else relative] = file
    return list(found.items())


def kept_listing(relay: Relay, root: str, path: str | None):
    from mlflow.entities import FileInfo

    prefix = (path or "").strip("/")
    listed: dict[str, FileInfo] = {}
    for name, file in _kept_logs(relay, root):
        if prefix and not name.startswith(prefix + "/"):
            continue
        rest = name[len(prefix) + 1 :] if prefix else name
        head = rest.split("/", 1)[0]
        full = f"{prefix}/{head}" if prefix else head
        is_dir = "/" in rest
        listed[full] = FileInfo(full, is_dir, None if is_dir else file.stat().st_size)
    return sorted(listed.values(), key=lambda f: f.path)


def kept_file(relay: Relay, root: str, path: str) -> Path | None:
    for name, file in reversed(_kept_logs(relay, root)):
        if name == path.strip("/"):
            return file
    return None


# ---- installing the relay in this process ----------------------------------------------------
ACTIVE: Relay | None = None
_INSTALL_LOCK = threading.Lock()
_PLAIN: dict[str, Callable[..., Any]] = {}  # MLflow's own builders, before the relay's


def install(uri: str, quiet: bool = False) -> Relay:
    """This process's MLflow store for `uri` relays its writes (see the module's docstring)."""
    global ACTIVE
    with _INSTALL_LOCK:
        if ACTIVE is not None and ACTIVE.uri == uri:
            return ACTIVE
        for name, value in HTTP_RETRIES.items():
            os.environ.setdefault(name, value)
        # urllib3 says "Retrying (Retry(total=...))" for each retry: the relay says it once
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        relay = Relay(uri, journal_folder(uri), quiet=quiet)
        scheme = uri.split(":", 1)[0]
        plain = _PLAIN.setdefault(scheme, _mlflow_internals.tracking_store_builder(scheme))
        _PLAIN.setdefault(
            "mlflow-artifacts", _mlflow_internals.artifact_repository_builder("mlflow-artifacts")
        )

        def build(store_uri=None, **kwargs):
            if store_uri is not None and store_uri.rstrip("/") == uri.rstrip("/"):
                if relay.store is None:
                    RelayStore(plain(store_uri=store_uri).get_host_creds, relay)
                return relay.store
            return plain(store_uri=store_uri, **kwargs)

        _mlflow_internals.set_tracking_store_builder(scheme, build)
        _mlflow_internals.set_artifact_repository_builder("mlflow-artifacts", make_relay_artifacts)
        build(store_uri=uri)
        atexit.register(relay.farewell)
        ACTIVE = relay
        return relay


def uninstall() -> None:
    """MLflow's own stores again (a test, or a process that tracks elsewhere next)."""
    global ACTIVE
    with _INSTALL_LOCK:
        for scheme, builder in _PLAIN.items():
            if scheme == "mlflow-artifacts":
                _mlflow_internals.set_artifact_repository_builder(scheme, builder)
            else:
                _mlflow_internals.set_tracking_store_builder(scheme, builder)
        if ACTIVE is not None:
            ACTIVE.journal.close()
        ACTIVE = None
