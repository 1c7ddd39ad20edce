"""Ask, run, tell: one trial after another until the study has n_trials finished trials.

One read of the study's trials per trial decides everything the loop needs (counts, the
failure budget, the time budget, trials to continue, dead workers' trials); the trial's run
is opened and closed through SweepRuns; the loop returns how it ended.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import optuna
from hydra.core.utils import JobStatus
from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import console, contract, keys
from mlflow_study_sweeper.backends import slurm
from mlflow_study_sweeper.errors import SweepStopped
from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.search.objectives import Objectives, ReturnFormError
from mlflow_study_sweeper.search.samplers import ExhaustibleGridSampler
from mlflow_study_sweeper.search.space_function import SearchFunction, SearchFunctionError
from mlflow_study_sweeper.storage import liveness, optuna_internals
from mlflow_study_sweeper.storage.outages import StorageUnreachable
from mlflow_study_sweeper.storage.studies import fail_trial, optuna_quietly
from mlflow_study_sweeper.sweep import cancel as cancelling
from mlflow_study_sweeper.sweep.budget import (
    TrialTimeout,
    expected_seconds,
    trial_deadline,
)
from mlflow_study_sweeper.tracking.lifecycle import SweepRuns
from mlflow_study_sweeper.trial import job_side, resume, retry
from mlflow_study_sweeper.trial.launch import Jobs, job_error
from mlflow_study_sweeper.trial.retry import RetryPolicy

log = logging.getLogger(__name__)
LIVE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
TASKS_READ_S = 10.0  # a detached Slurm sweep's worker asks Slurm's queue at most this often


class Ending(enum.Enum):
    FINISHED = "the study has n_trials finished trials"
    GRID_USED_UP = "every point of the grid was tried"
    OUT_OF_BUDGET = "the next trial would not finish within the time budget"
    WAITING_ON_OTHERS = "the last trials train on other machines, without heartbeats"
    JOB_TIME_LIMIT = "this worker's Slurm job is near its time limit"
    CANCELLED = "the sweep was cancelled (hydra.sweeper.cancel=true)"


@dataclass(frozen=True)
class LoopEnd:
    how: Ending
    waiting_on: tuple[str, ...] = ()  # WAITING_ON_OTHERS: those trials, in words


@dataclass
class Outcome:
    state: TrialState
    values: list[float] | None = None
    kind: str = ""  # why it failed: error, timeout, time_budget, interrupted
    reason: str = ""
    stop: bool = False  # every trial would fail the same way: the sweep stops after this one
    tags: dict[str, Any] = field(default_factory=dict)
    checkpoint_at: int | None = None  # the last checkpoint its job saved (complete or pruned)


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs of the sweep's settings, checked (see sweep.checks)."""

    n_trials: int  # finished (complete or pruned) trials the study ends with
    max_failure_rate: float = 0.25
    trial_timeout: float | None = None  # seconds a trial may run
    grace_s: float = 60.0  # a trial silent this long (no heartbeat) has a dead worker
    keep_checkpoints: bool = False  # a finished trial keeps its last checkpoint
    n_jobs: int = 1  # workers on this machine, for the time left
    timeout_s: float | None = None  # the time budget of the command (hydra.sweeper.timeout)
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # what is tried again, how often


@dataclass
class Census:
    """What the loop needs from one read of the study's trials, counted in one pass (a study of
    a thousand trials is read once per trial)."""

    finished: int = 0  # complete and pruned, imported ones apart (console.finished)
    running: list[FrozenTrial] = field(default_factory=list)
    waiting: bool = False  # an enqueued trial, for `ask` to hand out
    mine: int = 0  # trials asked since this command started
    errors: int = 0  # ... that failed by raising or by their timeout
    dead: int = 0  # failed or imported: they never count as finished
    failed: list[FrozenTrial] = field(default_factory=list)  # for continuations, retries

    @classmethod
    def of(cls, trials: list[FrozenTrial], first_number: int) -> Census:
        census = cls()
        for t in trials:
            state, imported = t.state, keys.is_imported(t)
            if state == TrialState.RUNNING:
                census.running.append(t)
            elif state == TrialState.WAITING:
                census.waiting = True
            elif state in (TrialState.COMPLETE, TrialState.PRUNED) and not imported:
                census.finished += 1
            if state == TrialState.FAIL or imported:
                census.dead += 1
            if t.number >= first_number:
                census.mine += 1
                if state == TrialState.FAIL and keys.failure(t) in ("error", "timeout"):
                    census.errors += 1
            if state == TrialState.FAIL:
                census.failed.append(t)
        return census


@dataclass
class TrialLoop:
    study: optuna.Study
    space: dict[str, Any]
    runs: SweepRuns
    jobs: Jobs
    objectives: Objectives
    settings: LoopSettings
    # set by the command's SIGTERM handler: an interruption from a scheduler, not from Ctrl-C
    terminated: threading.Event = field(default_factory=threading.Event)
    # set by Slurm's signal before its job's time limit (USR1): the trial stops at its next
    # epoch, checkpointed, to be continued elsewhere, and no other starts here
    leaving: threading.Event = field(default_factory=threading.Event)
    job_stop_at: float | None = None  # in a Slurm task: no trial starts that would end after it
    # hydra.sweeper.cancel=true, read from the study in a thread of its own (sweep.cancel): its
    # event stops the trial at its next epoch, and no other starts
    cancel: cancelling.Watch | None = None
    # a detached Slurm sweep's worker (a peer, in a task): a running trial whose Slurm task has
    # left the queue is failed (and continued), whatever the storage's heartbeats say
    slurm_peer: bool = False
    tasks_read_at: float = float("-inf")
    progress: console.EpochProgress | None = None
    deadline: float | None = None  # time.time() after which no trial runs (the time budget)
    durations: list[float] = field(default_factory=list)
    first_number: int = 0
    last: tuple[int, float] | None = None  # the last trial's number and seconds, not printed
    in_flight: str | None = None  # the run of the trial being trained, until it is told
    # the search-space function: its params join each trial's after the grammar's (ask)
    search: SearchFunction | None = None

    def __post_init__(self) -> None:
        # the failure budget counts the failures of trials asked since this command started,
        # so that "fix the cause and rerun" continues
        self.first_number = len(self.study.get_trials(deepcopy=False))

    # -- the loop --
    def run(self) -> LoopEnd:
        try:
            return self.ask_run_tell()
        finally:
            self.jobs.close()  # the sweep's logging back after the last job

    def ask_run_tell(self) -> LoopEnd:
        while True:
            trials = self.study.get_trials(deepcopy=False)
            census = Census.of(trials, self.first_number)
            if census.running and self.recover(trials=census.running):
                trials = self.study.get_trials(deepcopy=False)
                census = Census.of(trials, self.first_number)
            finished = census.finished
            self.print_result(trials, finished)
            self.check_failure_budget(census)
            if finished >= self.settings.n_trials:
                return LoopEnd(Ending.FINISHED)
            if self.cancelled():
                if census.running or not self.cancel_settled():
                    unwatched = self.running_unwatched(trials)
                    if unwatched:  # trials whose end this command could not see
                        return LoopEnd(Ending.WAITING_ON_OTHERS, tuple(unwatched))
                    time.sleep(1)  # other workers' trials stop at their next epoch
                    continue
                return LoopEnd(Ending.CANCELLED)
            sampler = self.study.sampler
            if isinstance(sampler, ExhaustibleGridSampler) and sampler.exhausted(self.study):
                return LoopEnd(Ending.GRID_USED_UP)
            if self.deadline is not None and time.time() + expected_seconds(trials) > self.deadline:
                return LoopEnd(Ending.OUT_OF_BUDGET)
            if self.leaving.is_set() or (
                self.job_stop_at is not None
                and time.time() + expected_seconds(trials) > self.job_stop_at
            ):
                return LoopEnd(Ending.JOB_TIME_LIMIT)
            enqueued = resume.enqueue_continuations(self.study, census.failed)
            enqueued += retry.enqueue_retries(self.study, census.failed)
            for note in enqueued:
                print(note, flush=True)
            # trials in training; an enqueued (WAITING) one is for `ask` below to hand out
            training = len(census.running)
            if finished + training >= self.settings.n_trials:
                unwatched = self.running_unwatched(trials)
                if unwatched:  # trials whose death this command could not see
                    return LoopEnd(Ending.WAITING_ON_OTHERS, tuple(unwatched))
                time.sleep(1)  # the last trials: recover() fails them if their worker dies
                continue
            with optuna_quietly():
                waiting = bool(enqueued) or census.waiting
                trial = liveness.ask_labelled(self.study, self.space, waiting)
            crash_point("after-ask")
            if self.surplus(trial, census):
                continue
            started = time.perf_counter()
            number = self.run_trial(trial)
            self.durations.append(time.perf_counter() - started)
            self.last = (number, self.durations[-1])

    def watch(self, workers: Any, poll_s: float = 1.0) -> LoopEnd:
        """The study watched while other processes train it (Ray's workers): the trials of dead
        workers failed, the failure budget kept; returns how it ended."""
        while True:
            workers.poll()  # a lost worker: its trial failed now (see _sweep), its slot refilled
            trials = self.study.get_trials(deepcopy=False)
            if self.recover(trials=trials):
                trials = self.study.get_trials(deepcopy=False)
            census = Census.of(trials, self.first_number)
            self.check_failure_budget(census)
            if census.finished >= self.settings.n_trials:
                return LoopEnd(Ending.FINISHED)
            stopping = self.cancel_settled() or not workers.alive()
            if self.cancelled() and not census.running and stopping:
                return LoopEnd(Ending.CANCELLED)
            sampler = self.study.sampler
            if isinstance(sampler, ExhaustibleGridSampler) and sampler.exhausted(self.study):
                return LoopEnd(Ending.GRID_USED_UP)
            if not workers.alive():
                if self.deadline is not None and time.time() + 1 >= self.deadline:
                    return LoopEnd(Ending.OUT_OF_BUDGET)
                if self.cancelled():  # their trials stopped; any left RUNNING are recovered
                    return LoopEnd(Ending.CANCELLED)
                raise SweepStopped(
                    "every worker stopped before the study had n_trials finished trials (their "
                    "lines above say why); rerun the command to resume"
                )
            time.sleep(poll_s)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled.is_set()

    def cancel_settled(self) -> bool:
        return self.cancel is not None and self.cancel.settled()

    def abandon(self, why: str) -> None:
        """The sweep stops with a trial in flight whose end the storage could not record: its
        run is closed KILLED, not left RUNNING; the rerun fails the trial and settles the run."""
        if self.in_flight is not None:
            tags = {keys.STATE: "FAIL", keys.FAILURE_REASON: why}
            self.runs.trial_ended(self.in_flight, "KILLED", tags)
            self.in_flight = None

    def recover(self, between_trials: bool = True, trials: list[FrozenTrial] | None = None) -> bool:
        """Fail the trials whose worker died, and close their runs; True if there were any."""
        failed = liveness.fail_orphaned_trials(
            self.study, self.settings.grace_s, own_trials_are_dead=between_trials, trials=trials
        )
        failed += self.fail_gone_tasks(trials)
        for number, reason in failed:
            log.warning("trial %d is marked FAIL: %s", number, reason)
        if failed:
            numbers = {number for number, _ in failed}
            self.runs.settle(
                t for t in self.study.get_trials(deepcopy=False) if t.number in numbers
            )
        return bool(failed)

    def fail_gone_tasks(self, trials: list[FrozenTrial] | None) -> list[tuple[int, str]]:
        """A Slurm peer: the running trials of other tasks that Slurm's queue no longer runs
        (scancelled, a lost node, a time limit), failed to be continued; at most every
        TASKS_READ_S, and only when such trials run."""
        if not self.slurm_peer or time.monotonic() - self.tasks_read_at < TASKS_READ_S:
            return []
        if trials is None:
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        mine = liveness.worker_label().get("slurm")
        tasks = {t.number: task_of(t) for t in trials if t.state == TrialState.RUNNING}
        others = {n: task for n, task in tasks.items() if task and task != mine}
        if not others:
            return []
        self.tasks_read_at = time.monotonic()
        alive = slurm.tasks_alive()
        if alive is None:  # the controller did not answer: asked again next time
            return []
        failed = []
        by_number = {t.number: t for t in trials}
        for number, task in others.items():
            if task in alive:
                continue
            reason = f"its worker's Slurm task {task} is no longer running (squeue)"
            trial_id = optuna_internals.trial_id(by_number[number])
            if fail_trial(self.study, trial_id, "orphaned", reason):
                failed.append((number, reason))
        return failed

    def running_unwatched(self, trials: list[FrozenTrial]) -> list[str]:
        """Running trials on other machines without heartbeats (a journal file storage), but
        for a Slurm peer's, whose tasks Slurm's queue tells about."""
        if liveness.watched(self.study):
            return []
        me = liveness.machine_key()
        out = []
        for t in trials:
            host, pid = keys.worker(t)
            if t.state != TrialState.RUNNING or host == me or (self.slurm_peer and task_of(t)):
                continue
            out.append(f"trial {t.number} (pid {pid} on {liveness.host_name(host)})")
        return out

    def check_failure_budget(self, census: Census) -> None:
        mine, errors = census.mine, census.errors
        if errors >= 2 * self.settings.n_trials + 10:
            # max_failure_rate=1.0 never stops on the rate: a command whose every trial fails
            # would otherwise ask for trials forever
            raise SweepStopped(
                f"{errors} of {mine} trials started by this command failed (twice "
                f"n_trials plus 10): the sweep stopped. See each failed run's failure_reason tag "
                f"in MLflow, fix the cause and rerun the command to resume."
            )
        # judged against the planned trials until more than that have run, so that one early
        # failure does not look like a 100% rate
        if errors > self.settings.max_failure_rate * max(self.settings.n_trials, mine):
            raise SweepStopped(
                f"{errors} of {mine} trials started by this command failed, more than "
                f"hydra.sweeper.max_failure_rate={self.settings.max_failure_rate} allows: the "
                f"sweep stopped. See each failed run's failure_reason tag in MLflow; fix the "
                f"cause, or raise max_failure_rate (at 1.0 the sweep stops only after 2 x "
                f"n_trials + 10 failures), and rerun the command to resume."
            )

    def surplus(self, trial: optuna.Trial, before: Census) -> bool:
        """Another worker asked for the last trial at the same moment: give this one back."""
        # the trials numbered below this one that were failed or imported stay so: if the rest
        # cannot reach n_trials, there is nothing to read
        if trial.number - before.dead < self.settings.n_trials:
            return False
        ahead = [
            t
            for t in self.study.get_trials(deepcopy=False, states=LIVE)
            if t.number < trial.number and not keys.is_imported(t)
        ]
        if len(ahead) < self.settings.n_trials:
            return False
        trial_id = optuna_internals.trial_id(trial)
        optuna_internals.drop_held(trial_id)
        fail_trial(self.study, trial_id, "surplus", "not run: n_trials were already taken")
        return True

    # -- one trial --
    def run_trial(self, trial: optuna.Trial) -> int:
        """Run one trial from its run's start to its end; returns its number."""
        trial_id = optuna_internals.trial_id(trial)
        refused = None
        if self.search is not None:
            try:
                self.search.extend(trial)  # its params join the trial's, before its run exists
            except SearchFunctionError as err:
                refused = str(err)[:2000]
        run_id = self.runs.trial_started(trial.number, trial.params, self.retry_tags(trial))
        crash_point("run-created")  # a run no trial records yet: SweepRuns.settle closes it
        self.in_flight = run_id
        optuna_internals.record_started(self.study, trial, {keys.RUN_ID: run_id})  # params too
        # a run created while the tracking server was away has a provisional id; the relay
        # tells the study its real one when it delivers it, but if it did so before the line
        # above, the study was told nothing yet and kept the provisional one (the soak found it)
        real = self.runs.real(run_id)
        if real != run_id:
            trial.set_user_attr(keys.RUN_ID, real)
        crash_point("after-run-start")
        if refused is not None:  # nothing to train: the trial fails, its run says why
            log.warning("trial %d failed: %s", trial.number, refused)
            outcome = Outcome(TrialState.FAIL, kind="error", reason=refused)
            self.tell(trial, run_id, outcome)
            self.in_flight = None
            return trial.number
        env = contract.job_environment(
            run_id, self.runs.experiment_id, self.study.study_name, trial_id, trial.number
        )
        env |= resume.prepare(self.study, self.runs.client, trial, run_id)
        # what a job in this process reports goes through this reporter (see trial.launch)
        reporter = job_side.TrialReporter(
            self.study,
            trial_id,
            self.progress,
            trial,
            leaving=self.leaving,
            cancelled=self.cancel.cancelled if self.cancel is not None else None,
        )
        in_process = self.jobs.in_process
        ret, read = None, None
        try:
            # MLFLOW_RUN_ID in this process too, for any launcher (see contract.trial_run)
            with (
                liveness.Heartbeat(self.study, trial_id),
                trial_deadline(self.settings.trial_timeout),
                contract.trial_run(run_id),
            ):
                ret = self.jobs.run(trial.number, trial.params, env, reporter)
            # a job in this process may report from processes it started (torchrun-style
            # ranks): what they decided is in the storage
            if in_process and reporter.reported:
                decided = reporter.decided()
            else:
                read = optuna_internals.frozen(self.study, trial_id)
                decided = job_side.Decisions.of(read)
            outcome = self.judge(trial, ret, decided)
        except TrialTimeout as err:  # raised between the job's end and launch returning
            outcome = Outcome(TrialState.FAIL, kind="timeout", reason=str(err))
        except (KeyboardInterrupt, SystemExit) as err:
            why = "stopped by SIGTERM" if self.terminated.is_set() else "interrupted by Ctrl-C"
            reason = f"{why} while training"
            with contextlib.suppress(StorageUnreachable):  # the rerun fails it then
                fail_trial(self.study, trial_id, "interrupted", reason)
            if in_process:
                self.runs.release_job_runs("KILLED")
            self.runs.trial_ended(
                run_id,
                "KILLED",
                {keys.STATE: "FAIL", keys.FAILURE_REASON: f"{why} ({type(err).__name__})"},
            )
            self.in_flight = None
            raise
        except Exception as err:  # the launcher itself failed; the failure budget decides
            outcome = Outcome(TrialState.FAIL, kind="error", reason=f"{type(err).__name__}: {err}")
        finally:
            if in_process:
                ok = ret is not None and ret.status == JobStatus.COMPLETED
                self.runs.release_job_runs("FINISHED" if ok else "FAILED")
            if self.progress is not None:
                self.progress.clear()
        crash_point("after-job")
        self.tell(trial, run_id, outcome, read)
        self.in_flight = None
        if outcome.stop:
            raise SweepStopped(
                f"trial {trial.number}: {outcome.reason}. Every trial would fail the same way: "
                f"the sweep stopped. Fix the task function and rerun the command to resume."
            )
        return trial.number

    def retry_tags(self, trial: optuna.Trial) -> dict[str, str]:
        """A retry's run names the run of the attempt it repeats."""
        earlier = trial.user_attrs.get(keys.RETRY_OF)
        if earlier is None:
            return {}
        run = self.runs.run_id(self.study.get_trials(deepcopy=False)[earlier])
        return {keys.RETRY_OF_RUN: run or "", keys.ATTEMPT_TAG: str(retry.attempt(trial))}

    def judge(self, trial: optuna.Trial, ret: Any, decided: job_side.Decisions) -> Outcome:
        tags: dict[str, Any] = {}
        if decided.stopped_at is not None and self.leaving.is_set():
            return Outcome(  # continued from its checkpoint, as a trial whose worker died
                TrialState.FAIL,
                kind="interrupted",
                reason=f"stopped at epoch {decided.stopped_at}: its Slurm job's time limit is "
                f"near (USR1)",
                tags={keys.STOPPED_BY: "job_time_limit"},
            )
        if decided.stopped_at is not None and self.cancelled():
            return Outcome(  # continued from its checkpoint when the sweep is resumed
                TrialState.FAIL,
                kind="interrupted",
                reason=f"stopped at epoch {decided.stopped_at}: the sweep was cancelled "
                f"(hydra.sweeper.cancel=true)",
                tags={keys.STOPPED_BY: "cancel"},
            )
        if decided.stopped_at is not None:
            return Outcome(
                TrialState.FAIL,
                kind="time_budget",
                reason=f"stopped by the time budget (hydra.sweeper.timeout) at epoch "
                f"{decided.stopped_at}",
                tags={keys.STOPPED_BY: "time_budget"},
            )
        if decided.pruned_at is not None:
            tags[keys.PRUNED_AT_EPOCH] = decided.pruned_at
        saved = decided.checkpoint_at
        if ret.status == JobStatus.COMPLETED:
            if decided.pruned_at is not None:
                return Outcome(TrialState.PRUNED, tags=tags, checkpoint_at=saved)
            try:
                values = self.objectives.values(ret.return_value)
            except ValueError as err:  # not a number, NaN, a tuple where a dict is wanted
                stop = isinstance(err, ReturnFormError)
                return Outcome(TrialState.FAIL, kind="error", reason=str(err), stop=stop)
            return Outcome(TrialState.COMPLETE, values=values, checkpoint_at=saved)
        err = job_error(ret)
        if isinstance(err, optuna.TrialPruned) or decided.pruned_at is not None:
            return Outcome(TrialState.PRUNED, tags=tags, checkpoint_at=saved)
        if isinstance(err, TrialTimeout):
            return Outcome(TrialState.FAIL, kind="timeout", reason=str(err))
        log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
        kind = "error"
        if self.settings.retry.transient(err) and self.settings.retry.attempts_left(trial):
            kind = retry.TRANSIENT  # tried again (enqueue_retries); not a failure of the budget
        return Outcome(TrialState.FAIL, kind=kind, reason=f"{type(err).__name__}: {err}")

    def tell(
        self, trial: optuna.Trial, run_id: str, outcome: Outcome, read: FrozenTrial | None = None
    ) -> None:
        """The outcome into the study, then onto the run. A complete or pruned trial is not read
        back (what its run needs is known; the loop's next read has it, for its line); a failed
        one is, for the reason recorded. `read`: the trial as read since its job ended, if it
        was (Optuna's tell reads it first otherwise)."""
        trial_id = optuna_internals.trial_id(trial)
        values, frozen = None, None
        if outcome.state in (TrialState.COMPLETE, TrialState.PRUNED):
            complete = outcome.state == TrialState.COMPLETE
            with optuna_quietly():
                state = optuna_internals.tell(
                    self.study,
                    trial,
                    values=outcome.values if complete else None,
                    state=None if complete else TrialState.PRUNED,
                    read=read,
                )
            if complete:
                values = dict(zip(self.objectives.names, outcome.values, strict=True))
            saved = outcome.checkpoint_at
        else:
            fail_trial(self.study, trial_id, outcome.kind, outcome.reason)
            state = None
        if state not in (TrialState.COMPLETE, TrialState.PRUNED):  # failed, or values refused
            frozen = optuna_internals.frozen(self.study, trial_id)
            state, saved = frozen.state, keys.checkpoint_step(frozen)
        crash_point("after-tell")
        tags = {keys.STATE: state.name, **outcome.tags}
        if frozen is not None and state == TrialState.FAIL:
            tags[keys.FAILURE_REASON] = keys.fail_reason(frozen)
        status = keys.run_status(frozen) if frozen is not None else keys.RUN_STATUS[state.name]
        # every objective on the run, also those the job did not log itself
        self.runs.trial_ended(run_id, status, tags, values)
        # an interrupted trial keeps its checkpoint; a trial that never saved one costs nothing
        if outcome.kind not in (*resume.CONTINUABLE, retry.TRANSIENT) and (
            saved is not None or keys.continues(trial) is not None
        ):
            frozen = frozen or optuna_internals.frozen(self.study, trial_id)
            resume.tidy_checkpoints(
                self.runs.client, self.study, frozen, self.settings.keep_checkpoints
            )

    def print_result(self, trials: list[FrozenTrial], finished: int) -> None:
        """The last trial's line, with the counts of the read that follows it."""
        if self.last is None:
            return
        number, seconds = self.last
        self.last = None
        frozen = trials[number] if number < len(trials) else None
        if frozen is None or frozen.number != number:
            frozen = next(t for t in trials if t.number == number)
        left = max(self.settings.n_trials - finished, 0)
        mean = sum(self.durations) / len(self.durations)
        seconds_left = mean * left / self.settings.n_jobs if left else None
        if self.progress is not None:
            self.progress.sweep_left = seconds_left
        line = console.progress_line(
            frozen, finished, self.settings.n_trials, self.objectives, seconds, seconds_left
        )
        print(line, flush=True)


def task_of(trial: FrozenTrial) -> str | None:
    """The Slurm task (JOB_INDEX) of the worker that took `trial`, if it ran in one."""
    return (trial.system_attrs.get(keys.WORKER) or {}).get("slurm")
