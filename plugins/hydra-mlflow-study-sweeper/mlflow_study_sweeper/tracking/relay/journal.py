"""What the tracking relay keeps on this machine while the server is away: the journal of
writes on disk, this process's knowledge of the runs it touched, and provisional run ids."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

from mlflow_study_sweeper import contract

PROVISIONAL = "offline"  # the first letters of a run id given while the server was away
OFFLINE_ROOT = "mlflow-artifacts:/offline-runs"  # the artifact root of such a run, until then


def is_provisional(run_id: str | None) -> bool:
    return bool(run_id) and str(run_id).startswith(PROVISIONAL)


def new_key() -> str:
    """An id for a run the client asks for: its provisional id if the server is away."""
    return PROVISIONAL + uuid.uuid4().hex[:25]


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
                record = copy.deepcopy(record)
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
    base = os.environ.get(contract.JOURNAL_DIR)
    if not base:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        base = os.path.join(cache, "mlflow-study-sweeper", "journal")
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(base) / digest
