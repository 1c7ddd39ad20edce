"""The tracking relay's state for one server: writes sent while it answers, kept in order while
it does not, delivered when it is back (a thread probes it); journals of killed processes
delivered first. The MLflow side (the store and artifact repository that call it) is _relay."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from mlflow_study_sweeper.errors import duration, first_line, mask_url
from mlflow_study_sweeper.tracking.offline import refused, unreachable
from mlflow_study_sweeper.tracking.relay.journal import PROVISIONAL, Journal, Shadow, is_provisional

log = logging.getLogger(__name__)

MAX_PROBE_S = 10.0
REMIND_S = 600.0  # a long outage is mentioned again this often


class Sender(Protocol):
    """What the relay needs of the server's store (_relay.RelayStore)."""

    def send(self, entry: dict[str, Any], replay: bool = False) -> Any: ...

    def answers(self) -> bool: ...


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
        self.explained = False  # the command said where its kept writes wait (see farewell)
        self.store: Sender | None = None
        self.mapped: dict[str, str] = {}
        self.load_mapped()

    # -- ids --
    def load_mapped(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            for line in (self.folder / "runs.jsonl").read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, ValueError):
                    old, new = json.loads(line)
                    self.mapped[old] = new

    def map(self, old: str, new: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "runs.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps([old, new]) + "\n")
        self.mapped[old] = new
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
                if not refused(err) and failures < 5:
                    # an error of this process's own, before the server said anything (requests
                    # reading os.environ while the sweep sets a trial's variables): again
                    failures += 1
                    time.sleep(0.1 * failures)
                    continue
                # the server refuses this one (a run deleted meanwhile, a changed param), or
                # the same error five times: the rest goes on, and the entry is kept aside with
                # the reason
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
        """At exit: where the writes not yet delivered wait (the next sweep sends them), unless
        the sweep's own Error line said so (`explained`)."""
        if self.pending and not self.explained:
            self.say(
                f"{len(self.pending)} writes for the MLflow server {mask_url(self.uri)} are kept "
                f"in {self.folder}: the next sweep to it from this machine sends them first"
            )
        self.journal.close()

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=self.stream or sys.stderr, flush=True)


# ---- artifacts kept for the server ------------------------------------------------------------
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
