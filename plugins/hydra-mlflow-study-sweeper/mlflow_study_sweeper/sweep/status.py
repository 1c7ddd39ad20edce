"""`hydra.sweeper.status=true`: where a sweep stands, read from its study while it runs (or
after it stopped), by the same command with one setting added. Nothing is created or changed:
no study, no run, no storage file; the trials' own records say everything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import console, keys
from mlflow_study_sweeper.databases import sqlite_path
from mlflow_study_sweeper.errors import SweepConfigError, duration, mask_url
from mlflow_study_sweeper.search.objectives import Objectives
from mlflow_study_sweeper.storage import liveness, optuna_internals
from mlflow_study_sweeper.storage.studies import make_storage, optuna_quietly


@dataclass(frozen=True)
class StatusPlan:
    """What the status needs of the settings: where the study is, what it optimises, and the
    sweep's size and parallelism (for the time left)."""

    url: str | None
    name: str
    objectives: Objectives
    n_trials: int
    n_jobs: int


def load(plan: StatusPlan) -> optuna.Study:
    """The sweep's study, opened without creating it (or the storage file)."""
    again = "start the sweep with the same command without hydra.sweeper.status"
    if plan.url is None:
        raise SweepConfigError(
            "hydra.sweeper.status=true reads a sweep's study from its storage, and "
            "hydra.sweeper.storage=null keeps it in the sweep's memory"
        )
    path = sqlite_path(plan.url)
    if plan.url.endswith((".log", ".journal")):
        path = Path(plan.url.removeprefix("journal:///").removeprefix("file://"))
    if path is not None and not path.exists():
        raise SweepConfigError(f"no sweep yet: {path} does not exist; {again}")
    storage = make_storage(plan.url)
    try:
        with optuna_quietly():
            return optuna.load_study(study_name=plan.name, storage=storage)
    except KeyError:
        optuna_internals.close_storage(storage)  # a server's connection is not left open
        raise SweepConfigError(
            f"no study {plan.name!r} in {mask_url(plan.url)} (hydra.sweeper.study_name); {again}"
        ) from None


def report(plan: StatusPlan, now: float | None = None) -> str:
    """The lines a person reads: the counts, who trains what, the best so far, the time left."""
    study = load(plan)
    try:
        trials = study.get_trials(deepcopy=False)
        best = plan.objectives.best(study)
        cancelled = optuna_internals.study_system_attrs(study).get(keys.CANCEL)
    finally:
        optuna_internals.close(study)  # a server's connection is not left open
    now = time.time() if now is None else now
    done = console.counts(trials)
    finished = done["complete"] + done["pruned"]
    failed = f"{done['failed']} failed" + (
        f" ({done['retried']} tried again)" if done["retried"] else ""
    )
    imported = f", {done['imported']} imported" if done["imported"] else ""
    lines = [
        f"Sweep {plan.name} in {mask_url(plan.url)}: {finished}/{plan.n_trials} finished "
        f"({done['complete']} complete, {done['pruned']} pruned), {failed}, "
        f"{done['running']} running{imported}"
    ]
    if cancelled:
        when = time.strftime("%H:%M:%S", time.localtime(float(cancelled["at"])))
        lines.append(
            f"Cancelled at {when} (hydra.sweeper.cancel=true): the running trials stop at their "
            f"next epoch and the end follows; the sweep's command resumes it"
        )
    running = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    if running:
        lines.append("Running:")
        lines += [f"  {running_line(t, plan.objectives, now)}" for t in running]
    if best is not None:
        params = " ".join(f"{k}={console.short(v)}" for k, v in best.params.items())
        lines.append(
            f"Best so far: trial {best.number}, {console.show(plan.objectives, best)} ({params})"
        )
    else:
        lines.append("Best so far: none (no trial has completed)")
    lines.append(time_left(trials, finished, len(running), plan))
    return "\n".join(lines)


def running_line(trial: FrozenTrial, objectives: Objectives, now: float) -> str:
    """'trial 12 (dropout=0.2 lr=0.001): epoch 3 val_acc=0.9712, 1m 05s, on host pid 4242'."""
    if trial.state == TrialState.WAITING:
        return f"trial {trial.number}: waiting for a worker (enqueued)"
    params = console.params_text(trial.params)
    host, pid = keys.worker(trial)
    where = f"on {liveness.host_name(host)} pid {pid}" if host else "no worker has taken it yet"
    label = trial.system_attrs.get(keys.WORKER) or {}
    if label.get("slurm"):
        where += f" (Slurm job {label['slurm']})"
    epochs = keys.curve(trial)
    epoch = ""
    if epochs:
        step = max(epochs)
        epoch = f"epoch {step + 1} {objectives.metric}={epochs[step]:.4f}, "
    age = now - trial.datetime_start.timestamp() if trial.datetime_start else None
    since = f"{duration(age)}, " if age is not None else ""
    return f"trial {trial.number} ({params}): {epoch}{since}{where}"


def time_left(trials: list[FrozenTrial], finished: int, running: int, plan: StatusPlan) -> str:
    """From this study's own finished trials: their mean length, the trials to go, n_jobs."""
    lengths = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and t.datetime_start
        and t.datetime_complete
        and not keys.is_imported(t)
    ]
    left = max(plan.n_trials - finished, 0)
    if left == 0:
        return "Time left: none, every trial has finished (the end runs once the last one does)"
    if not lengths:
        return f"Time left: unknown until a trial finishes ({left} to go)"
    mean = sum(lengths) / len(lengths)
    seconds = mean * left / max(plan.n_jobs, 1)
    return (
        f"Time left: about {duration(seconds)} ({left} to go, {running} running, a trial takes "
        f"{duration(mean)} on average, n_jobs={plan.n_jobs})"
    )
