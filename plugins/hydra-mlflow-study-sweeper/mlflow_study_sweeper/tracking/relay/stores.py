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
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.entities.paged_list import PagedList
from mlflow.store.tracking.rest_store import RestStore

from mlflow_study_sweeper import contract, keys
from mlflow_study_sweeper.errors import first_line
from mlflow_study_sweeper.tracking import mlflow_internals
from mlflow_study_sweeper.tracking.offline import TrackingOffline, refused, unreachable
from mlflow_study_sweeper.tracking.relay.delivery import (
    Relay,
    kept_file,
    kept_listing,
)
from mlflow_study_sweeper.tracking.relay.journal import (
    OFFLINE_ROOT,
    is_provisional,
    journal_folder,
    new_key,
)


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
            "tags": {t.key: t.value for t in tags} | {keys.CLIENT_KEY: key},
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
            f"tags.`{keys.CLIENT_KEY}` = '{key}'",
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
            # an answer that refuses is an answer; an error of this process's own (requests
            # reading os.environ while it changes) is asked again at the next probe
            return refused(err)
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
        relay = _HOOK.relay
        if relay is None:
            return send(*args, path)
        provisional = self.root.startswith(OFFLINE_ROOT)
        if self.on_server(relay) and not relay.queued():
            try:
                if provisional:
                    return getattr(self.mapped_repository(), send.__name__)(*args, path)
                return send(*args, path)
            except Exception as err:
                if not unreachable(err):
                    raise
                relay.went_offline(err)
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

    def on_server(self, relay: Relay) -> bool:
        """Whether the run exists on the server: a run created while it was away exists once
        delivered (its job still holds the provisional root, sent to the real repository)."""
        return (
            not self.root.startswith(OFFLINE_ROOT) or relay.real(self.run_key()) != self.run_key()
        )

    def run_key(self) -> str:
        return self.root[len(OFFLINE_ROOT) + 1 :].split("/", 1)[0]

    def mapped_repository(self):
        return real_repository(_HOOK.relay, self.root)

    def list_artifacts(self, path=None):
        relay = _HOOK.relay
        if relay is None:
            return super().list_artifacts(path)
        provisional = self.root.startswith(OFFLINE_ROOT)
        if not self.on_server(relay) or relay.queued():  # what is kept; the server is away
            return kept_listing(relay, self.root, path)
        try:
            if provisional:
                return self.mapped_repository().list_artifacts(path)
            return super().list_artifacts(path)
        except Exception as err:
            if not unreachable(err):
                raise
            relay.went_offline(err)
            return kept_listing(relay, self.root, path)

    def _download_file(self, remote_file_path, local_path):
        relay = _HOOK.relay
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
        repo = RelayArtifacts(uri, tracking_uri=tracking_uri or (_HOOK.relay and _HOOK.relay.uri))
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


# ---- installing the relay in this process ----------------------------------------------------
# MLflow builds stores and artifact repositories through its registry, by URI, from anywhere in
# the process: the relay installed there is the one process-wide hook, owned by this module alone
class _Hook:
    relay: Relay | None = None


_HOOK = _Hook()
_INSTALL_LOCK = threading.Lock()
_PLAIN: dict[str, Callable[..., Any]] = {}  # MLflow's own builders, before the relay's


def install(uri: str, quiet: bool = False) -> Relay:
    """This process's MLflow store for `uri` relays its writes (see the module's docstring)."""
    with _INSTALL_LOCK:
        if _HOOK.relay is not None and _HOOK.relay.uri == uri:
            return _HOOK.relay
        contract.shorten_mlflow_retries()
        # urllib3 says "Retrying (Retry(total=...))" for each retry: the relay says it once
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        relay = Relay(uri, journal_folder(uri), quiet=quiet)
        scheme = uri.split(":", 1)[0]
        plain = _PLAIN.setdefault(scheme, mlflow_internals.tracking_store_builder(scheme))
        _PLAIN.setdefault(
            "mlflow-artifacts", mlflow_internals.artifact_repository_builder("mlflow-artifacts")
        )

        def build(store_uri=None, **kwargs):
            if store_uri is not None and store_uri.rstrip("/") == uri.rstrip("/"):
                if relay.store is None:
                    RelayStore(plain(store_uri=store_uri).get_host_creds, relay)
                return relay.store
            return plain(store_uri=store_uri, **kwargs)

        mlflow_internals.set_tracking_store_builder(scheme, build)
        mlflow_internals.set_artifact_repository_builder("mlflow-artifacts", make_relay_artifacts)
        build(store_uri=uri)
        atexit.register(relay.farewell)
        _HOOK.relay = relay
        return relay


def uninstall() -> None:
    """MLflow's own stores again (a test, or a process that tracks elsewhere next)."""
    with _INSTALL_LOCK:
        for scheme, builder in _PLAIN.items():
            if scheme == "mlflow-artifacts":
                mlflow_internals.set_artifact_repository_builder(scheme, builder)
            else:
                mlflow_internals.set_tracking_store_builder(scheme, builder)
        if _HOOK.relay is not None:
            _HOOK.relay.journal.close()
        _HOOK.relay = None
