"""Who trains a trial, whether it still lives, and the trials of workers that died.

A dead process on this machine is found at once (its pid is gone); a worker on another machine
by its heartbeat going silent (RDB storages). Machines are told apart by hostname, boot id and
process namespace, so containers that share a hostname and pid 1 are not confused.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import contract, keys
from mlflow_study_sweeper.storage import optuna_internals, outages
from mlflow_study_sweeper.storage.studies import fail_trial

# a trial shorter than this never writes a heartbeat: a toy trial costs no extra write
FIRST_BEAT_S = 1.0


def machine_key() -> str:
    """This machine and process namespace: hostnames alone repeat across containers."""
    if os.environ.get(contract.HOST_ID):
        return os.environ[contract.HOST_ID]
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))  # one per pid namespace
    return ":".join(parts)


def worker_label() -> dict[str, str]:
    """This process, as trials, the study's creator and the end's claim record it (inside a
    Slurm job, its id too, for a person: `status` shows it)."""
    label = {"host": machine_key(), "pid": str(os.getpid())}
    job = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if all(job):
        label["slurm"] = "_".join(job)
    elif os.environ.get("SLURM_JOB_ID"):
        label["slurm"] = os.environ["SLURM_JOB_ID"]
    return label


def label_of(value: dict[str, Any]) -> dict[str, str]:
    """The worker label in a record (a claim, the study's creator), older layouts included."""
    if "host" in value:
        return {"host": value["host"], "pid": str(value.get("pid"))}
    return {
        "host": value.get(keys.LEGACY_WORKER_HOST),
        "pid": str(value.get(keys.LEGACY_WORKER_PID)),
    }


def host_name(machine: str | None) -> str:
    return str(machine).split(":")[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (killed, not yet reaped by its parent) has stopped working all the same
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def is_alive_here(label: dict[str, str] | None) -> bool | None:
    """True or False for a process of this machine; None for one elsewhere (or no label)."""
    if not label or label.get("host") != machine_key():
        return None
    return pid_alive(int(label["pid"]))


def label_trial(study: optuna.Study, trial_id: int) -> None:
    optuna_internals.set_trial_system_attr(study, trial_id, keys.WORKER, worker_label())


def ask_labelled(study: optuna.Study, space: dict[str, Any], waiting: bool) -> optuna.Trial:
    """The next trial, labelled with this worker: a new one in the write that creates it, or,
    when the study may hold enqueued (WAITING) trials (`waiting`: a read just now found one, or
    this worker enqueued one since), what `ask` hands out, labelled right after. A trial that
    another worker enqueues after that read waits for the next ask."""
    if waiting:
        trial = study.ask(space)
        label_trial(study, optuna_internals.trial_id(trial))
        return trial
    return optuna_internals.ask_new(study, space, {keys.WORKER: worker_label()})


def watched(study: optuna.Study) -> bool:
    """Whether trials of other machines have heartbeats here (RDB storages)."""
    return optuna_internals.heartbeat_interval(study) is not None


def fail_orphaned_trials(
    study: optuna.Study,
    grace_s: float,
    own_trials_are_dead: bool = True,
    trials: list[FrozenTrial] | None = None,
) -> list[tuple[int, str]]:
    """Mark FAIL the RUNNING trials whose worker is gone; return (number, reason) for each.

    Between trials, a RUNNING trial of this very process is one it left when interrupted (or
    of an earlier process with the same pid); called while this process trains
    (`own_trials_are_dead=False`), it is the live one. A trial that no worker ever labelled (its
    `ask` failed half-way), or whose worker elsewhere never beat, is failed after `grace_s`.
    """
    running = [
        t
        for t in (trials if trials is not None else study.get_trials(deepcopy=False))
        if t.state == TrialState.RUNNING
    ]
    if not running:
        return []
    me, now = machine_key(), datetime.datetime.now()
    ages = optuna_internals.heartbeat_ages(study) if watched(study) else {}
    # after a storage outage, no worker could beat while it lasted: silence is judged again
    # once every worker has had the grace to beat since
    judge_silence = outages.calm(grace_s)
    found = []
    for trial in running:
        host, pid = keys.worker(trial)
        trial_id = optuna_internals.trial_id(trial)
        started = trial.datetime_start
        old = started is not None and (now - started).total_seconds() > grace_s + FIRST_BEAT_S
        old = old and judge_silence
        age = ages.get(trial_id)
        reason = None
        if host == me and pid is not None and not pid_alive(int(pid)):
            reason = f"its worker (pid {pid}) died while training"
        elif host == me and pid is not None and int(pid) == os.getpid() and own_trials_are_dead:
            reason = "its worker (this process) was interrupted before it recorded the end"
        elif host != me and age is not None and age > grace_s and judge_silence:
            reason = f"its worker ({host_name(host)}, pid {pid}) stopped sending heartbeats"
            reason += f" for {grace_s}s"
        elif host is not None and host != me and trial_id in ages and age is None and old:
            reason = f"its worker ({host_name(host)}, pid {pid}) never sent a heartbeat"
        elif host is None and old:
            reason = "it was created but never started (its worker failed while asking for it)"
        if reason and fail_trial(study, trial_id, "orphaned", reason):
            found.append((trial.number, reason))
    return found


def taken_by(trial: FrozenTrial, label: dict[str, str]) -> bool:
    """Whether `label` took the trial: a worker (host, pid), or every worker of a Slurm task
    (`{"slurm": JOB_TASK}`)."""
    if "slurm" in label:
        return (trial.system_attrs.get(keys.WORKER) or {}).get("slurm") == label["slurm"]
    return keys.worker(trial) == (label.get("host"), label.get("pid"))


def fail_trials_of(study: optuna.Study, label: dict[str, str], reason: str) -> list[int]:
    """Fail the RUNNING trials of a worker known to be gone (a lost Ray node, a Slurm task
    that left the queue)."""
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        mine = taken_by(trial, label)
        if mine and fail_trial(study, optuna_internals.trial_id(trial), "orphaned", reason):
            failed.append(trial.number)
    return failed


def ever_trained(study: optuna.Study, label: dict[str, str] | None) -> bool:
    """Whether the worker `label` (host, pid; or a Slurm task) took a trial of this study."""
    if label is None:
        return False
    return any(taken_by(t, label) for t in study.get_trials(deepcopy=False))


class Heartbeat:
    """Records a trial's heartbeat in the RDB storage while the trial trains.

    The first beat comes after FIRST_BEAT_S, then one per heartbeat interval; a missed beat is
    retried at the next one. One thread of the process beats for its trials (a trial costs no
    thread of its own: starting and joining one per trial cost more than a toy trial's task).
    """

    def __init__(self, study: optuna.Study, trial_id: int) -> None:
        self.study = study
        self.trial_id = trial_id

    def __enter__(self) -> Heartbeat:
        interval = optuna_internals.heartbeat_interval(self.study)
        if interval:
            BEATS.add(self, interval)
        return self

    def __exit__(self, *exc: object) -> None:
        BEATS.remove(self)  # after a beat in progress: none comes once the trial is over


class Beats:
    """The heartbeats of this process's trials, sent by one thread (started with the first)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.due: dict[Heartbeat, tuple[float, float]] = {}  # its next beat (monotonic), interval
        self.beating: Heartbeat | None = None
        self.thread: threading.Thread | None = None

    def add(self, heartbeat: Heartbeat, interval: float) -> None:
        with self.lock:
            self.due[heartbeat] = (time.monotonic() + min(FIRST_BEAT_S, interval), interval)
            if self.thread is None or not self.thread.is_alive():  # the first, or after a fork
                self.thread = threading.Thread(target=self.run, name="heartbeats", daemon=True)
                self.thread.start()
            self.lock.notify_all()

    def remove(self, heartbeat: Heartbeat) -> None:
        with self.lock:
            self.due.pop(heartbeat, None)
            while self.beating is heartbeat:
                self.lock.wait()

    def run(self) -> None:
        while True:
            with self.lock:
                heartbeat = self.next_due()
                self.beating = heartbeat
            try:
                with contextlib.suppress(Exception):
                    optuna_internals.record_heartbeat(heartbeat.study, heartbeat.trial_id)
            finally:
                with self.lock:
                    self.beating = None
                    self.lock.notify_all()

    def next_due(self) -> Heartbeat:
        """The next trial to beat for, once its beat is due (the lock held)."""
        while True:
            now = time.monotonic()
            for heartbeat, (at, interval) in self.due.items():
                if at <= now:
                    self.due[heartbeat] = (now + interval, interval)
                    return heartbeat
            soonest = min((at for at, _ in self.due.values()), default=None)
            self.lock.wait(None if soonest is None else soonest - now)


BEATS = Beats()
