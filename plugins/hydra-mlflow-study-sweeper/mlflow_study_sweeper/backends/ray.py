"""backend=ray: the workers are Ray actors, placed by Ray on a cluster's nodes with their CPUs
and GPUs; each runs the sweep command as a local worker does (n_jobs=1), against the shared
storage. This process only watches them and does the end.

Ray gives the placement (a GPU share sets CUDA_VISIBLE_DEVICES), the resource accounting and
the news of a lost node (its actors die); the study, its pruners and the MLflow parenting stay
the sweeper's. Actors are not detached: they die with this process, and their worker process
with them (PR_SET_PDEATHSIG). Passwords reach the workers as method arguments, never in the
actors' options, which Ray shows on its dashboard.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.backends.local import Replacements, worker_command
from mlflow_study_sweeper.databases import sqlite_path
from mlflow_study_sweeper.errors import SweepConfigError, SweepError, mask_url
from mlflow_study_sweeper.storage.liveness import machine_key

EXTRA = "pip install 'hydra-mlflow-study-sweeper[ray]'"
# tracking stores every node reaches (not a sqlite file, not a folder)
REMOTE = ("http://", "https://", "postgresql", "mysql", "mssql", "databricks")
# what a worker on another node needs of this process's environment (not PATH, CUDA_*, ...)
PASSED_ON = ("SWEEP_", "MLFLOW_", "PYTHONUNBUFFERED", "HYDRA_FULL_ERROR")


class RayStopped(SweepError):
    """The Ray cluster went away under the sweep."""

    exit_code = 1


def import_ray() -> Any:
    # every worker's lines reach this console as they are written, not "[repeated 2x]" (Ray
    # reads RAY_DEDUP_LOGS when imported)
    contract.quiet_libraries()
    try:
        import ray
    except ImportError:
        raise SweepConfigError(
            f"hydra.sweeper.backend=ray needs Ray, which is not installed: {EXTRA}"
        ) from None
    return ray


@dataclass
class Cluster:
    """The Ray cluster a sweep runs on: joined, or started here for it."""

    ray: Any
    started_here: bool
    nodes: int
    address: str
    gcs_address: str  # host:port of its control service

    def reachable(self) -> bool:
        """Whether the cluster's control service answers: Ray's own calls hang once it is gone."""
        host, _, port = self.gcs_address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError):
            return False
        return True

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.ray.shutdown()


def connect(address: str | None, runtime_env: dict[str, Any] | None, start_dir: Path) -> Cluster:
    """Join the cluster at `address` (or RAY_ADDRESS), or start one on this machine; the
    workers' runtime_env is the job's (Ray uploads a local working_dir only from ray.init)."""
    ray = import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if runtime_env:
        options["runtime_env"] = job_runtime_env(runtime_env, start_dir)
    try:
        if address:  # token authentication (Ray's default) stays on
            context = ray.init(address=address, **options)
        else:  # a new instance here, with token authentication and no dashboard: nothing to
            # expose, and 1.8 s sooner (for a dashboard, start one with `ray start --head`)
            context = ray.init(address="local", include_dashboard=False, **options)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepConfigError(
            f"cannot reach the Ray cluster at {address}: {first[:300]}. Start it (ray start "
            f"--head), or leave hydra.sweeper.ray.address and RAY_ADDRESS unset to start one here"
        ) from None
    alive = [n for n in ray.nodes() if n.get("Alive")]
    gcs = context.address_info.get("gcs_address", "")
    return Cluster(ray, not address, len(alive), address or "local", gcs)


def job_runtime_env(runtime_env: dict[str, Any], start_dir: Path) -> dict[str, Any]:
    """hydra.sweeper.ray.runtime_env, with a relative working_dir made absolute (against the
    folder the command started in)."""
    env = dict(runtime_env)
    if "working_dir" in env and "://" not in str(env["working_dir"]):
        folder = Path(str(env["working_dir"]))
        env["working_dir"] = str(folder if folder.is_absolute() else (start_dir / folder).resolve())
    return env


def check_cluster(
    cluster: Cluster, storage: str | None, tracking_uri: str, cpu: float, gpu: float
) -> None:
    """Before anything is created: stores every node can reach, a node that fits a worker."""
    if cluster.nodes > 1:
        tracking_file = sqlite_path(tracking_uri) or not tracking_uri.startswith(REMOTE)
        storage_file = storage and not storage.startswith(("postgresql", "mysql"))
        for setting, is_file, instead in (
            (f"hydra.sweeper.storage={mask_url(storage)}", storage_file, "postgresql://..."),
            (f"hydra.sweeper.tracking_uri={mask_url(tracking_uri)}", tracking_file,
             "http://host:5000 (an mlflow server) or postgresql://..."),
        ):  # fmt: skip
            if is_file:
                raise SweepConfigError(
                    f"{setting} is a file on this machine, which the other {cluster.nodes - 1} "
                    f"node(s) of the Ray cluster cannot reach: use {instead}"
                )
    nodes = [n.get("Resources", {}) for n in cluster.ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= cpu and n.get("GPU", 0) >= gpu for n in nodes):
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        raise SweepConfigError(
            f"hydra.sweeper.resources={{cpu: {cpu:g}, gpu: {gpu:g}}} fits no node of the Ray "
            f"cluster (the largest has {biggest.get('CPU', 0):g} CPUs and "
            f"{biggest.get('GPU', 0):g} GPUs): lower them, or add a node that has them"
        )


def die_with_parent() -> None:
    """In the worker process: SIGKILL when its actor's process dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class SweepWorker:
    """The actor: runs one worker process of the sweep on its node, and reports on it."""

    def start(self, command: list[str], env: dict[str, str], cwd: str | None) -> dict[str, str]:
        import ray

        where = cwd if cwd and Path(cwd).is_dir() else os.getcwd()
        self.proc = subprocess.Popen(
            [sys.executable, *command],
            env={**os.environ, **env},
            cwd=where,
            preexec_fn=die_with_parent,
        )
        return {
            "host": machine_key(),
            "pid": str(self.proc.pid),
            "actor_pid": str(os.getpid()),  # what Ray writes before each line it passes on
            "node": ray.util.get_node_ip_address(),
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        }

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> int:
        """SIGTERM (the worker closes its own trial and run), then SIGKILL after a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@dataclass
class Actor:
    handle: Any
    slot: int
    label: dict[str, str] | None = None  # host, pid, node of its worker process, once started
    started: Any = None  # the start() call, pending until Ray places the actor
    finished: Any = None  # the wait() call


class RayWorkers:
    """n_jobs workers as Ray actors; a lost one is reported and, while work is left, replaced."""

    def __init__(
        self,
        cluster: Cluster,
        n_jobs: int,
        cpu: float,
        gpu: float,
        runtime_env: dict[str, Any] | None,
        start_dir: Path,
        on_death: Callable[[dict[str, str] | None, str], tuple[bool, bool]],
    ) -> None:
        self.cluster = cluster
        self.ray = cluster.ray
        self.n_jobs = n_jobs
        self.cpu, self.gpu = cpu, gpu
        self.runtime_env = runtime_env
        self.start_dir = start_dir
        self.on_death = on_death  # (its worker's label, why) -> (work left, it trained)
        self.actors: list[Actor] = []
        self.replacements = Replacements()
        self.stopping = threading.Event()
        self.remote = self.ray.remote(max_restarts=0, max_concurrency=2)(SweepWorker)

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The sweep command of a worker, as it runs on its node."""
        argv = list(sys.argv)
        script = Path(argv[0]).resolve()
        if self.runtime_env and "working_dir" in self.runtime_env:
            # the node runs it from its copy of the working directory
            with contextlib.suppress(ValueError):
                argv[0] = str(script.relative_to(self.working_dir()))
        else:
            argv[0] = str(script)
        # the stores as this process resolved them (a relative sqlite path means this folder)
        extra = [
            "hydra.sweeper.storage=${oc.env:SWEEP_STORAGE_URL}",
            "hydra.sweeper.tracking_uri=${oc.env:MLFLOW_TRACKING_URI}",
        ]
        command, env = worker_command(argv, extra)
        env |= {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
        if self.cpu:  # torch reads it when it starts
            env["OMP_NUM_THREADS"] = str(max(1, int(self.cpu)))
        return command, env

    def working_dir(self) -> Path:
        return Path(job_runtime_env(self.runtime_env, self.start_dir)["working_dir"])

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpu, "num_gpus": self.gpu}  # runtime_env: the job's (connect)

    def start(self) -> None:
        for slot in range(self.n_jobs):
            self.actors.append(self.launch(slot))

    def launch(self, slot: int) -> Actor:
        command, env = self.command()
        handle = self.remote.options(**self.options()).remote()
        cwd = (
            None if self.runtime_env and "working_dir" in self.runtime_env else str(self.start_dir)
        )
        actor = Actor(handle, slot)
        actor.started = handle.start.remote(command, env, cwd)
        return actor

    def poll(self) -> None:
        """What changed since the last look: workers placed, finished, lost."""
        if not self.cluster.reachable():
            raise RayStopped(
                f"the Ray cluster at {self.cluster.address} went away under the sweep; finished "
                f"trials are kept: start it again (or leave it to this command) and rerun the "
                f"command to resume"
            )
        for actor in list(self.actors):
            try:
                self.look_at(actor)
            except self.ray.exceptions.RayActorError as err:  # its node is gone, or the actor
                self.actors.remove(actor)
                if not self.stopping.is_set():
                    self.lost(actor, f"its Ray actor died ({type(err).__name__})", killed=True)

    def look_at(self, actor: Actor) -> None:
        if actor.label is None:  # not yet placed, or placed now
            ready, _ = self.ray.wait([actor.started], timeout=0)
            if ready:
                actor.label = self.ray.get(actor.started)
                actor.finished = actor.handle.wait.remote()
                label = actor.label
                gpus = f", CUDA_VISIBLE_DEVICES={label['gpus']}" if label["gpus"] else ""
                print(
                    f"worker {actor.slot} runs on node {label['node']}{gpus} (its lines come "
                    f"as SweepWorker pid={label['actor_pid']}; its process: pid {label['pid']})",
                    flush=True,
                )
            return
        ready, _ = self.ray.wait([actor.finished], timeout=0)
        if ready:
            code = self.ray.get(actor.finished)
            self.actors.remove(actor)
            self.ray.kill(actor.handle)
            if code != 0 and not self.stopping.is_set():
                self.lost(actor, f"its worker process exited with {code}", killed=code < 0)

    def lost(self, actor: Actor, why: str, killed: bool) -> None:
        """`killed`: from outside (its node lost, a signal), not an error of its own."""
        where = f" on node {actor.label['node']}" if actor.label else ""
        print(f"worker {actor.slot}{where} is lost: {why}", file=sys.stderr, flush=True)
        work_left, trained = self.on_death(actor.label, f"{why}{where}")
        if self.replacements.replace(actor.slot, work_left, trained, killed):
            self.actors.append(self.launch(actor.slot))  # placed when the cluster has room

    def alive(self) -> bool:
        return bool(self.actors)

    def placed(self) -> list[dict[str, str]]:
        return [a.label for a in self.actors if a.label is not None]

    def wait(self, poll_s: float = 0.25) -> None:
        while self.alive():
            self.poll()
            time.sleep(poll_s)
        time.sleep(1)  # Ray passes the workers' last lines on from their log files

    def stop(self) -> None:
        """Stop every worker: its trial is closed by its own process; then the actors go."""
        self.stopping.set()
        if not self.cluster.reachable():  # gone with the cluster (PR_SET_PDEATHSIG)
            self.actors = []
            return
        running = [a for a in self.actors if a.label is not None]
        with contextlib.suppress(Exception):
            self.ray.get([a.handle.stop.remote() for a in running], timeout=90)
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor.handle)
        self.actors = []
