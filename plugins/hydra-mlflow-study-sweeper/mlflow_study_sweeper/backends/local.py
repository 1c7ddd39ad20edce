"""n_jobs > 1 on this machine: more copies of the sweep command, each with its cores and GPU,
watched while they train.

Each worker is the same command with n_jobs=1, sharing the study through its storage; the
process that started them trains too, and owns the end of the sweep. A worker that dies is
noticed within a second: its trial is failed, its run closed, and a replacement takes its place.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow_study_sweeper import contract
from mlflow_study_sweeper.errors import SweepConfigError

HAS_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")
MAX_IDLE_DEATHS = 3  # a slot whose workers fail this often in a row, untrained: not refilled


@dataclass(frozen=True)
class WorkerSettings:
    """Where the workers run and what each holds (hydra.sweeper.backend, n_jobs, resources,
    ray, slurm), checked."""

    backend: str  # local, ray or slurm
    n_jobs: int
    cpu: float | None = None  # per worker; None: the local default (the cores shared evenly)
    gpu: float | None = None  # per worker; None: the local default (visible GPUs round robin)
    ray_address: str | None = None
    runtime_env: dict | None = None
    slurm: Any = None  # backends.slurm.SlurmSettings of backend=slurm


class Replacements:
    """Which dead workers are replaced. One killed from outside (a signal: a person, the OOM
    killer, a preemption; a lost node) is, as is one that trained a trial before it died (its
    trial took it down, and that trial is failed). A slot whose last MAX_IDLE_DEATHS workers each
    exited with an error before they trained anything points at a real problem (a worker that
    cannot start) and is left empty; the others go on."""

    def __init__(self) -> None:
        self.idle_deaths: Counter[int] = Counter()

    def replace(self, slot: int, work_left: bool, trained: bool, killed: bool) -> bool:
        self.idle_deaths[slot] = 0 if trained or killed else self.idle_deaths[slot] + 1
        if self.idle_deaths[slot] == MAX_IDLE_DEATHS:
            print(
                f"worker {slot} exited with an error {MAX_IDLE_DEATHS} times in a row before it "
                f"trained a trial: it is not started again (its output above says why); the "
                f"other workers go on",
                file=sys.stderr,
                flush=True,
            )
        return work_left and self.idle_deaths[slot] < MAX_IDLE_DEATHS


def worker_command(argv: list[str], extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """The sweep command of a worker, and the variables it needs besides the sweep's own.

    An argument holding a password (key=scheme://user:secret@...) is passed through the
    environment instead: an argument shows in `ps`.
    """
    env: dict[str, str] = {contract.WORKER: "1"}
    args = []
    for i, arg in enumerate(argv):
        if HAS_PASSWORD.search(arg) and "=" in arg:
            key, value = arg.split("=", 1)  # the worker reads the same value from its env
            name = contract.WORKER_ARG.format(index=i)
            env[name] = value
            arg = f"{key}=${{oc.env:{name}}}"
        if not HAS_PASSWORD.search(arg):
            args.append(arg)
    return [*args, "hydra.sweeper.n_jobs=1", "hydra.sweeper.backend=local", *extra], env


def visible_gpus() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists
    (the sweeper imports no torch to ask)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def gpu_assignment(n_workers: int, gpus: list[str], per_worker: float | None) -> list[str | None]:
    """Each worker's CUDA_VISIBLE_DEVICES (None: leave it as it is).

    `per_worker` null: the visible GPUs dealt round robin (none visible: None each). Below 1:
    floor(1 / share) workers on each GPU, filled one GPU after another. 1 or more: that many
    whole GPUs each. 0: no GPU ("" hides them). More workers than the GPUs hold is an error.
    """
    if per_worker is None:
        return [gpus[i % len(gpus)] if gpus else None for i in range(n_workers)]
    if per_worker == 0:
        return [""] * n_workers
    if not gpus:
        raise SweepConfigError(
            f"hydra.sweeper.resources.gpu={per_worker} asks for GPUs, and this machine shows "
            f"none (CUDA_VISIBLE_DEVICES, nvidia-smi): set it to 0 or null"
        )
    if per_worker < 1:
        slots = math.floor(1 / per_worker + 1e-9)
        if n_workers > slots * len(gpus):
            raise SweepConfigError(
                f"hydra.sweeper.n_jobs={n_workers} workers with resources.gpu={per_worker} need "
                f"{math.ceil(n_workers / slots)} GPUs; this machine shows {len(gpus)}: lower "
                f"n_jobs or the share"
            )
        return [gpus[i // slots] for i in range(n_workers)]
    whole = int(per_worker)
    if whole != per_worker or n_workers * whole > len(gpus):
        raise SweepConfigError(
            f"hydra.sweeper.resources.gpu={per_worker}: a worker takes a share below 1 or whole "
            f"GPUs, and {n_workers} workers x {per_worker} must fit the {len(gpus)} GPUs shown"
        )
    return [",".join(gpus[i * whole : (i + 1) * whole]) for i in range(n_workers)]


class WorkerPool:
    """This process and n_jobs - 1 more on this machine, each with its threads and GPU."""

    def __init__(
        self,
        n_jobs: int,
        on_death: Callable[[int, int], tuple[bool, bool]],
        cpu: float | None = None,
        gpu: float | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.n_extra = n_jobs - 1
        self.on_death = on_death  # (pid, returncode) -> (work is left, it trained a trial)
        self.poll_s = poll_s
        self.procs: list[subprocess.Popen] = []
        self.replacements = Replacements()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.monitor: threading.Thread | None = None
        self.threads = int(cpu) if cpu else max(1, (os.cpu_count() or 1) // n_jobs)
        self.devices = gpu_assignment(n_jobs, visible_gpus(), gpu)

    def start(self) -> None:
        self.place_this_process()
        if self.n_extra < 1:
            return
        for i in range(self.n_extra):
            self.procs.append(self._spawn(i + 1))
        self.monitor = threading.Thread(target=self._watch, daemon=True)
        self.monitor.start()

    def place_this_process(self) -> None:
        """This process is worker 0: its GPU (before the job first uses CUDA) and threads."""
        alone = self.n_extra < 1  # alone, it keeps the machine's threads
        contract.place_this_worker(self.devices[0], None if alone else self.threads)
        torch = sys.modules.get("torch")
        if torch is not None and not alone:  # an app that imported torch is told directly
            torch.set_num_threads(self.threads)

    def _spawn(self, slot: int) -> subprocess.Popen:
        # the store URLs reach workers through the environment (SWEEP_STORAGE_URL,
        # MLFLOW_TRACKING_URI, set by the sweep), never their arguments
        command, extra = worker_command(sys.argv, [])
        # not the job's variables: this may run while a job of this process trains
        env = dict(contract.without_job(dict(os.environ)), OMP_NUM_THREADS=str(self.threads))
        env |= extra
        if self.devices[slot] is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[slot]
        proc = subprocess.Popen([sys.executable, *command], env=env)
        proc.slot = slot  # type: ignore[attr-defined]
        return proc

    def _watch(self) -> None:
        while not self.stopping.wait(self.poll_s):
            with self.lock:
                for i, proc in enumerate(self.procs):
                    code = proc.poll()
                    if code is None or code == 0 or getattr(proc, "_reported", False):
                        continue
                    proc._reported = True  # type: ignore[attr-defined]
                    print(
                        f"worker pid {proc.pid} died (exit {code}): its trial is failed and "
                        f"its run closed",
                        file=sys.stderr,
                        flush=True,
                    )
                    slot = proc.slot  # type: ignore[attr-defined]
                    work_left, trained = self.on_death(proc.pid, code)
                    again = self.replacements.replace(slot, work_left, trained, killed=code < 0)
                    if again and not self.stopping.is_set():
                        self.procs[i] = self._spawn(slot)

    def wait(self) -> None:
        while True:
            with self.lock:
                running = [p for p in self.procs if p.poll() is None]
            if not running:
                break
            for proc in running:
                proc.wait()
        self.stopping.set()
        if self.monitor is not None:
            self.monitor.join()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Ask each worker to stop (it closes its own trial and run), then make sure."""
        self.stopping.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
