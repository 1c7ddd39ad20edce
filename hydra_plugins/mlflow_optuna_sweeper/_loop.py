"""Ask, launch, tell: one trial after another until the study has n_trials finished trials."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from optuna.trial import TrialState

from hydra_plugins.mlflow_optuna_sweeper import _console, _resume, _runs, _space, job
from hydra_plugins.mlflow_optuna_sweeper._errors import SweepStopped
from hydra_plugins.mlflow_optuna_sweeper._faults import crash_point
from hydra_plugins.mlflow_optuna_sweeper._objectives import Objectives, ReturnFormError
from hydra_plugins.mlflow_optuna_sweeper._study import (
    EPOCH_CLOCK,
    FAILURE,
    PRUNED_AT,
    STOPPED_AT,
    WORKER_HOST,
    WORKER_PID,
    ExhaustibleGridSampler,
    Heartbeat,
    TrialReporter,
    fail_orphaned_trials,
    fail_trial,
    heartbeat_enabled,
    label_trial,
    machine_key,
)
from hydra_plugins.mlflow_optuna_sweeper._warm import is_imported

log = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TrialTimeout(Exception):
    """The trial ran past hydra.sweeper.trial_timeout."""


@contextlib.contextmanager
def deadline(seconds: float | None):
    """Raise TrialTimeout in this (main) thread after `seconds`, wherever the job is."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TrialTimeout(f"the trial ran past hydra.sweeper.trial_timeout={seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Outcome:
    state: TrialState
    values: list[float] | None = None
    kind: str = ""  # why it failed: error, timeout, interrupted
    reason: str = ""
    stop: bool = False  # every trial would fail the same way: the sweep stops after this one


@dataclass
class TrialLoop:
    study: optuna.Study
    space: dict[str, Any]
    fixed: list[str]
    parent_run_id: str
    client: Any
    experiment_id: str
    launcher: Any
    n_trials: int
    n_jobs: int
    objectives: Objectives
    max_failure_rate: float
    trial_timeout: float | None
    grace_s: float
    progress: _console.EpochProgress | None = None
    durations: list[float] = field(default_factory=list)
    first_number: int = 0
    grid_used_up: bool = False
    deadline: float | None = None  # time.time() after which no trial runs (the time budget)
    out_of_budget: bool = False
    waiting_on: list[str] = field(default_factory=list)
    keep_checkpoints: bool = False  # a finished trial keeps its last checkpoint

    def __post_init__(self) -> None:
        # the failure budget counts the failures of trials asked since this command started,
        # so that "fix the cause and rerun" continues
        self.first_number = len(self.study.get_trials(deepcopy=False))

    # -- the loop --
    def run(self) -> None:
        while True:
            self.recover()
            counts = _console.counts(self.study)
            finished = counts["complete"] + counts["pruned"]
            self.check_failure_budget()
            if finished >= self.n_trials:
                return
            if self.grid_exhausted():
                self.grid_used_up = True
                return
            if self.out_of_time():
                self.out_of_budget = True
                return
            for note in _resume.enqueue_continuations(self.study):
                print(note, flush=True)
            # trials in training; an enqueued (WAITING) one is for `ask` below to hand out
            training = len(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            if finished + training >= self.n_trials:
                unwatched = self.running_unwatched()
                if unwatched:  # trials whose death this command could not see
                    self.waiting_on = unwatched
                    return
                # wait for the last trials: recover() fails them if their worker dies
                time.sleep(1)
                continue
            trial = self.study.ask(self.space)
            label_trial(self.study, trial._trial_id)
            crash_point("after-ask")
            if self.surplus(trial):
                continue
            started = time.perf_counter()
            self.run_trial(trial)
            self.durations.append(time.perf_counter() - started)
            self.print_result(trial.number)

    def recover(self, between_trials: bool = True) -> None:
        """Fail the trials whose worker died, and close their runs."""
        failed = fail_orphaned_trials(self.study, self.grace_s, own_trials_are_dead=between_trials)
        for number, reason in failed:
            log.warning("trial %d is marked FAIL: %s", number, reason)
        if failed:
            settle_runs(self.client, self.study, {number for number, _ in failed})

    def running_unwatched(self) -> list[str]:
        """Running trials on other machines without heartbeats (a journal file storage)."""
        if heartbeat_enabled(self.study):
            return []
        me = machine_key()
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host, pid = t.system_attrs.get(WORKER_HOST), t.system_attrs.get(WORKER_PID)
            if host != me:
                out.append(f"trial {t.number} (pid {pid} on {str(host).split(':')[0]})")
        return out

    def out_of_time(self) -> bool:
        """No trial starts that could not finish before the deadline, judged by those so far."""
        if self.deadline is None:
            return False
        return time.time() + expected_seconds(self.study) > self.deadline

    def grid_exhausted(self) -> bool:
        sampler = self.study.sampler
        return isinstance(sampler, ExhaustibleGridSampler) and sampler.exhausted(self.study)

    def check_failure_budget(self) -> None:
        trials = [t for t in self.study.get_trials(deepcopy=False) if t.number >= self.first_number]
        errors = sum(
            1
            for t in trials
            if t.state == TrialState.FAIL and t.system_attrs.get(FAILURE) in ("error", "timeout")
        )
        if errors >= 2 * self.n_trials + 10:
            # max_failure_rate=1.0 never stops on the rate: a command whose every trial fails
            # would otherwise ask for trials forever
            raise SweepStopped(
                f"{errors} of {len(trials)} trials started by this command failed (twice "
                f"n_trials plus 10): the sweep stopped. See each failed run's failure_reason tag "
                f"in MLflow, fix the cause and rerun the command to resume."
            )
        # judged against the planned trials until more than that have run, so that one early
        # failure does not look like a 100% rate
        if errors > self.max_failure_rate * max(self.n_trials, len(trials)):
            raise SweepStopped(
                f"{errors} of {len(trials)} trials started by this command failed, more than "
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} allows: the sweep "
                f"stopped. See each failed run's failure_reason tag in MLflow; fix the cause, or "
                f"raise max_failure_rate (1.0 never stops), and rerun the command to resume."
            )

    def surplus(self, trial: optuna.Trial) -> bool:
        """Another worker asked for the last trial at the same moment: give this one back."""
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        ahead = [
            t
            for t in self.study.get_trials(deepcopy=False, states=live)
            if t.number < trial.number and not is_imported(t)
        ]
        if len(ahead) < self.n_trials:
            return False
        fail_trial(self.study, trial._trial_id, "surplus", "not run: n_trials were already taken")
        return True

    # -- one trial --
    def run_trial(self, trial: optuna.Trial) -> Outcome:
        run_id = _runs.start_run(
            self.client,
            self.experiment_id,
            f"trial-{trial.number}",
            trial.params,
            {
                "sweep.role": _runs.TRIAL_ROLE,
                "optuna.study_name": self.study.study_name,
                "optuna.trial_number": str(trial.number),
                "optuna.state": "RUNNING",
            },
            parent_run_id=self.parent_run_id,
        )
        trial.set_user_attr("mlflow_run_id", run_id)
        crash_point("after-run-start")
        env = {
            "MLFLOW_RUN_ID": run_id,
            "MLFLOW_EXPERIMENT_ID": self.experiment_id,
            job.ENV_STUDY: self.study.study_name,
            job.ENV_TRIAL_ID: str(trial._trial_id),
            job.ENV_TRIAL_NUMBER: str(trial.number),
        }
        env |= _resume.prepare(self.study, self.client, trial, run_id)
        overrides = list(self.fixed)
        overrides += [_space.as_override(k, v) for k, v in trial.params.items()]
        overrides += [_space.as_override(f"++hydra.job.env_set.{k}", v) for k, v in env.items()]
        job._IN_PROCESS[trial._trial_id] = TrialReporter(self.study, trial._trial_id, self.progress)
        # MLflow deletes MLFLOW_RUN_ID once read, and Hydra's env_set then fails to delete it
        # again; set here too, the variable is restored instead of deleted
        os.environ["MLFLOW_RUN_ID"] = run_id
        try:
            with Heartbeat(self.study, trial._trial_id), deadline(self.trial_timeout):
                (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
            outcome = self.judge(trial, ret)
        except TrialTimeout as err:  # raised between the job's end and launch returning
            outcome = Outcome(TrialState.FAIL, kind="timeout", reason=str(err))
        except (KeyboardInterrupt, SystemExit) as err:
            why = "stopped by SIGTERM" if terminated.is_set() else "interrupted by Ctrl-C"
            fail_trial(self.study, trial._trial_id, "interrupted", f"{why} while training")
            _runs.end_run(
                self.client,
                run_id,
                "KILLED",
                {"optuna.state": "FAIL", "failure_reason": f"{why} ({type(err).__name__})"},
            )
            raise
        except Exception as err:  # the launcher itself failed; the failure budget decides
            outcome = Outcome(TrialState.FAIL, kind="error", reason=f"{type(err).__name__}: {err}")
        finally:
            os.environ.pop("MLFLOW_RUN_ID", None)
            job._IN_PROCESS.pop(trial._trial_id, None)
            if self.progress is not None:
                self.progress.clear()
        crash_point("after-job")
        self.tell(trial, run_id, outcome)
        if outcome.stop:
            raise SweepStopped(
                f"trial {trial.number}: {outcome.reason}. Every trial would fail the same way: "
                f"the sweep stopped. Fix the task function and rerun the command to resume."
            )
        return outcome

    def judge(self, trial: optuna.Trial, ret) -> Outcome:
        attrs = self.study._storage.get_trial_system_attrs(trial._trial_id)
        pruned_at = attrs.get(PRUNED_AT)
        if STOPPED_AT in attrs:
            return Outcome(
                TrialState.FAIL,
                kind="time_budget",
                reason=f"stopped by the time budget (hydra.sweeper.timeout) at epoch "
                f"{attrs[STOPPED_AT]}",
            )
        if ret.status == JobStatus.COMPLETED:
            if pruned_at is not None:
                return Outcome(TrialState.PRUNED)
            try:
                values = self.objectives.values(ret.return_value)
            except ValueError as err:  # not a number, NaN, a tuple where a dict is wanted
                stop = isinstance(err, ReturnFormError)
                return Outcome(TrialState.FAIL, kind="error", reason=str(err), stop=stop)
            return Outcome(TrialState.COMPLETE, values=values)
        err = ret._return_value  # the job's exception (JobReturn.return_value would re-raise it)
        if isinstance(err, optuna.TrialPruned) or (pruned_at is not None):
            return Outcome(TrialState.PRUNED)
        if isinstance(err, TrialTimeout):
            return Outcome(TrialState.FAIL, kind="timeout", reason=str(err))
        log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
        return Outcome(TrialState.FAIL, kind="error", reason=f"{type(err).__name__}: {err}")

    def tell(self, trial: optuna.Trial, run_id: str, outcome: Outcome) -> None:
        if outcome.state == TrialState.COMPLETE:
            logged = self.client.get_run(run_id).data.metrics
            values = dict(zip(self.objectives.names, outcome.values, strict=True))
            # every objective on the run, also those the job did not log itself
            unlogged = {k: v for k, v in values.items() if k not in logged}
            if unlogged:
                _runs.log_metrics(self.client, run_id, unlogged, step=0)
            self.study.tell(trial, outcome.values)
        elif outcome.state == TrialState.PRUNED:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            fail_trial(self.study, trial._trial_id, outcome.kind, outcome.reason)
        crash_point("after-tell")
        frozen = self.study._storage.get_trial(trial._trial_id)
        tags: dict[str, Any] = {}
        if PRUNED_AT in frozen.system_attrs:
            tags["pruned_at_epoch"] = frozen.system_attrs[PRUNED_AT]
        if STOPPED_AT in frozen.system_attrs:
            tags["stopped_by"] = "time_budget"
        settle_run(self.client, frozen, tags)
        if outcome.kind not in _resume.CONTINUABLE:  # an interrupted trial keeps its checkpoint
            keep = self.keep_checkpoints
            _resume.tidy_checkpoints(self.client, self.study, trial._trial_id, keep)

    def print_result(self, number: int) -> None:
        frozen = self.study.get_trials(deepcopy=False)[number]
        counts = _console.counts(self.study)
        finished = counts["complete"] + counts["pruned"]
        left = max(self.n_trials - finished, 0)
        mean = sum(self.durations) / len(self.durations)
        seconds_left = mean * left / self.n_jobs if left else None
        if self.progress is not None:
            self.progress.sweep_left = seconds_left
        print(
            _console.progress_line(
                frozen, finished, self.n_trials, self.objectives, self.durations[-1], seconds_left
            ),
            flush=True,
        )


def expected_seconds(study: optuna.Study) -> float:
    """How long a whole trial takes, judged by this study's trials so far.

    Per epoch when jobs report epochs (with the number planned): the time to a trial's first
    report, then its time per epoch for the epochs left, for every trial that reported, pruned
    or stopped ones included (their own durations would say "short"). Otherwise the median
    duration of the finished trials; 0 before any.
    """

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] if values else 0.0

    whole = []
    for t in study.get_trials(deepcopy=False):
        clock = t.system_attrs.get(EPOCH_CLOCK)
        if is_imported(t) or not clock or not clock.get("total") or not t.datetime_start:
            continue
        first = clock["first"] - t.datetime_start.timestamp()
        per_epoch = (clock["last"] - clock["first"]) / (clock["n"] - 1) if clock["n"] > 1 else first
        whole.append(first + per_epoch * (clock["total"] - 1))
    if whole:
        return median(whole)
    return median(
        [
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in study.get_trials(deepcopy=False, states=FINISHED)
            if t.datetime_start and t.datetime_complete and not is_imported(t)
        ]
    )


# set by the SIGTERM handler: an interruption that came from a scheduler, not from Ctrl-C
terminated = threading.Event()


def settle_run(client, trial: optuna.trial.FrozenTrial, extra_tags: dict | None = None) -> None:
    if extra_tags and trial.user_attrs.get("mlflow_run_id"):
        run = _runs.run_or_none(client, trial.user_attrs["mlflow_run_id"])
        if run is not None:
            client.log_batch(
                run.info.run_id,
                tags=[_runs.RunTag(k, str(v)) for k, v in extra_tags.items()],
            )
    _runs.settle_trial_run(client, trial)


def settle_runs(client, study: optuna.Study, numbers: set[int] | None = None) -> None:
    """Every finished trial's run agrees with the trial (after kills anywhere in the lifecycle)."""
    for trial in study.get_trials(deepcopy=False):
        if trial.state.is_finished() and (numbers is None or trial.number in numbers):
            _runs.settle_trial_run(client, trial)
