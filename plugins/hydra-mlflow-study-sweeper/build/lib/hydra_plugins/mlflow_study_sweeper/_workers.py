"""n_jobs > 1: more copies of the sweep command on this machine, watched while they train.

Each worker is the same command with n_jobs=1, sharing the study through its storage; the
process that started them owns the end of the sweep. A worker that dies is noticed within a
second: its trial is failed, its run closed, and a replacement takes its place.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from hydra_plugins.mlflow_study_sweeper import _contract

HAS_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")
MAX_REPLACEMENTS_PER_WORKER = 3  # a worker that keeps dying points at a real problem


class WorkerPool:
    def __init__(
        self, n_jobs: int, on_death: Callable[[int, int], bool], poll_s: float = 0.5
    ) -> None:
        self.n_extra = n_jobs - 1
        self.on_death = on_death  # (pid, returncode) -> whether to start a replacement
        self.poll_s = poll_s
        self.procs: list[subprocess.Popen] = []
        self.replacements = 0
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.monitor: threading.Thread | None = None
        self.threads = max(1, (os.cpu_count() or 1) // n_jobs)

    def start(self) -> None:
        if self.n_extra < 1:
            return
        # this process trains too: share the cores evenly (torch reads OMP_NUM_THREADS when it
        # starts; an app that imported it already is told directly)
        os.environ["OMP_NUM_THREADS"] = str(self.threads)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(self.threads)
        for _ in range(self.n_extra):
            self.procs.append(self._spawn())
        self.monitor = threading.Thread(target=self._watch, daemon=True)
        self.monitor.start()

    def _spawn(self) -> subprocess.Popen:
        # the store URLs reach workers through the environment (SWEEP_STORAGE_URL,
        # MLFLOW_TRACKING_URI, set by the sweep): an argument with a password would show in `ps`
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), **{_contract.WORKER: "1"})
        args = []
        for i, arg in enumerate(sys.argv):
            if HAS_PASSWORD.search(arg) and "=" in arg:
                # key=url-with-password: the worker reads the same value from its environment
                key, value = arg.split("=", 1)
                name = _contract.WORKER_ARG.format(index=i)
                env[name] = value
                arg = f"{key}=${{oc.env:{name}}}"
            if not HAS_PASSWORD.search(arg):
                args.append(arg)
        return subprocess.Popen([sys.executable, *args, "hydra.sweeper.n_jobs=1"], env=env)

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
                    again = self.on_death(proc.pid, code)
                    limit = MAX_REPLACEMENTS_PER_WORKER * self.n_extra
                    if again and not self.stopping.is_set() and self.replacements < limit:
                        self.replacements += 1
                        self.procs[i] = self._spawn()

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
