"""One sweep command, start to end: checks, the study, the parent run, the trials, the end."""

from __future__ import annotations

import contextlib
import gc
import logging
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import optuna
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

from mlflow_study_sweeper import console, contract, keys
from mlflow_study_sweeper.backends.local import WorkerPool
from mlflow_study_sweeper.backends.ray import RayWorkers
from mlflow_study_sweeper.backends.slurm import SlurmWorkers
from mlflow_study_sweeper.end.finish import SweepEnd
from mlflow_study_sweeper.errors import SweepError, mask_url
from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.search import grammar
from mlflow_study_sweeper.search.grammar import check_space_unchanged
from mlflow_study_sweeper.storage import liveness, optuna_internals
from mlflow_study_sweeper.storage.outages import StorageUnreachable
from mlflow_study_sweeper.storage.studies import open_or_explain
from mlflow_study_sweeper.sweep import cancel, status
from mlflow_study_sweeper.sweep.checks import Checks, Plan
from mlflow_study_sweeper.sweep.loop import Ending, LoopEnd, TrialLoop
from mlflow_study_sweeper.sweep.warm import seed_study
from mlflow_study_sweeper.tracking import lifecycle, store
from mlflow_study_sweeper.tracking.lifecycle import SweepRuns
from mlflow_study_sweeper.tracking.store import TrackingStore
from mlflow_study_sweeper.trial.launch import jobs_for

log = logging.getLogger(__name__)
WAIT_FOR_PARENT_S = 60


def run_sweep(
    settings: Any,  # the facade's MlflowStudySweeperConf, read by the checks alone
    hydra_context: Any,
    task_function: Any,
    config: DictConfig,
    arguments: list[str],
) -> Any:
    # MLflow's and Optuna's imports leave millions of objects that live as long as the process:
    # out of the collector's sight, its passes stop costing tenths of a second (measured in
    # benchmarks/bench_overhead.py)
    gc.freeze()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    # one progress line per trial replaces the launcher's "Launching 1 jobs locally" pair
    logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
    contract.quiet_libraries()
    sweep = SweepRun(settings, hydra_context, task_function, config)
    try:
        result = sweep.run(arguments)
        crash_point("before-exit")  # every write of this command is on the server by now
        return result
    except SweepError as err:
        # every run is closed by now; the message says what to change
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


@contextlib.contextmanager
def sigterm_as_interrupt(
    terminated: threading.Event, interrupted: threading.Event, leaving: threading.Event
):
    """SIGTERM (a scheduler's preemption) stops the sweep as Ctrl-C does, then exits 143;
    `terminated` tells the two apart. `interrupted` is set by either: a KeyboardInterrupt raised
    inside a database call comes out as the driver's error (psycopg cancels the query). In a
    Slurm task, USR1 (its time limit is near) sets `leaving`: the trial stops at its next epoch,
    and the worker leaves."""

    def stop(signum, frame):
        terminated.set()
        interrupted.set()
        raise KeyboardInterrupt("SIGTERM")

    def interrupt(signum, frame):
        interrupted.set()
        raise KeyboardInterrupt

    def time_limit(signum, frame):
        if not leaving.is_set():
            print(
                "Slurm's signal: this task's time limit is near; the trial stops at its next "
                "epoch, checkpointed, and this worker leaves for a fresh task",
                file=sys.stderr,
                flush=True,
            )
        leaving.set()

    terminated.clear()
    interrupted.clear()
    previous_usr1 = None
    if contract.in_slurm_task():
        previous_usr1 = signal.signal(signal.SIGUSR1, time_limit)
    previous = signal.signal(signal.SIGTERM, stop)
    # a shell that starts a command in the background (`cmd &`) makes it ignore SIGINT, and
    # Python then never raises KeyboardInterrupt: `kill -INT` must stop a sweep cleanly anyway
    previous_int = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, previous_usr1)


class SweepRun:
    def __init__(self, settings, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.start_dir = Path(config.hydra.runtime.cwd)
        self.is_worker = contract.is_worker()
        # the settings stop here: the checks turn them into the plan's typed values
        self.checks = Checks(settings, hydra_context, config, self.launcher, self.start_dir)
        self.study: optuna.Study | None = None
        self.terminated = threading.Event()
        self.interrupted = threading.Event()
        self.leaving = threading.Event()

    def run(self, arguments: list[str]) -> Any:
        if self.checks.wants_cancel:
            print(cancel.ask(self.checks.status_plan()), flush=True)
            return []
        if self.checks.wants_status:
            print(status.report(self.checks.status_plan()), flush=True)
            return []
        plan = self.checks.plan(arguments)
        try:
            with sigterm_as_interrupt(self.terminated, self.interrupted, self.leaving):
                return self.sweep(plan)
        finally:
            optuna_internals.close(self.study)
            if plan.cluster is not None:
                plan.cluster.shutdown()  # a Ray instance started for this sweep stops with it

    def sweep(self, plan: Plan) -> Any:
        study, runs, created, tracking = self.open_stores(plan)
        end = SweepEnd(plan.end, tracking)
        loop = self.trial_loop(study, runs, plan)
        started = time.time()
        # the sweep's own command resumes a cancelled sweep (not a worker, nor a detached task)
        if not self.is_worker and not contract.in_slurm_task() and cancel.withdraw(study):
            print("This sweep was cancelled (hydra.sweeper.cancel=true): it resumes.", flush=True)
        loop.recover()
        runs.settle(study.get_trials(deepcopy=False))  # runs a killed sweep left open or wrong
        tracking.until_reachable(
            lambda: self.parent_run(runs, study, created, plan), quiet=self.is_worker
        )
        n_trials = plan.loop.n_trials
        done = console.finished(study.get_trials(deepcopy=False)) >= n_trials
        if done and not self.is_worker:
            result = end.finish(study, runs, resumed_complete=True)
            self.deliver_kept(tracking, plan, started, ended=True)
            return result
        self.print_plan(plan, study)
        slurm = plan.workers.slurm
        if slurm is not None and slurm.detach and not self.is_worker:
            self.detach(loop, plan)
            self.deliver_kept(tracking, plan, started, ended=False)
            return []
        with loop.cancel:  # a cancel is heard from here on, by every worker
            ending = self.train(loop, runs, plan)
        # what was kept while the tracking server was away reaches it before anything ends
        self.deliver_kept(tracking, plan, started, ended=self.is_worker)
        if ending.how == Ending.JOB_TIME_LIMIT:  # a worker (or a detached task's peer)
            print(
                "This worker leaves: its Slurm job's time limit is near; the trials go on "
                "in a fresh task",
                flush=True,
            )
            sys.exit(contract.LEFT_FOR_TIME_LIMIT)
        if self.is_worker:
            return []
        if plan.loop.timeout_s:
            self.budget_report(loop, ending, runs, plan.loop.timeout_s, time.time() - started)
        if ending.how == Ending.GRID_USED_UP:
            print("The grid is used up: every one of its points has been tried.")
        if ending.how == Ending.CANCELLED:
            finished = console.finished(study.get_trials(deepcopy=False))
            print(
                f"The sweep was cancelled (hydra.sweeper.cancel=true) with {finished}/"
                f"{plan.loop.n_trials} finished trials; the end follows. Rerun this command "
                f"without it to resume the sweep.",
                flush=True,
            )
        runs.settle(study.get_trials(deepcopy=False))  # runs left unsettled while it was away
        if ending.how == Ending.WAITING_ON_OTHERS:
            print(
                f"This command's trials are done; still training on other machines: "
                f"{', '.join(ending.waiting_on)}. The worker that finishes the last trial ends the "
                f"sweep; this storage has no heartbeats, so if that worker dies, rerun this "
                f"command to end it."
            )
            return []
        result = end.finish(study, runs)
        self.deliver_kept(tracking, plan, started, ended=True)
        return result

    def open_stores(self, plan: Plan) -> tuple[optuna.Study, SweepRuns, bool, TrackingStore]:
        """The study (created, or resumed if its space still fits), the MLflow store, and what
        every job and worker inherits."""
        study, created = open_or_explain(
            plan.study, plan.sampler, plan.pruner, creator=liveness.worker_label()
        )
        self.study = study
        crash_point("study-created")
        if not created:
            check_space_unchanged(study, plan.space, plan.search.seen if plan.search else None)
            # a resumed study, or a second worker: the seed's sequence would repeat the first
            # worker's trials, so only the process that created the study keeps the seed
            plan.sampler.reseed_rng()
        # a down server fails here, not later
        tracking = store.connect(plan.tracking.uri, worker=self.is_worker)
        if tracking.relay is not None:
            # a run given a provisional id while the server was away gets its real one on the
            # trials too; then what killed processes kept during an outage is sent, first
            tracking.relay.on_mapped.append(
                lambda old, new: optuna_internals.replace_attr_values(study, old, new)
            )
            tracking.relay.deliver_orphans()
        seeds = plan.seeds
        for note in seed_study(
            study,
            plan.space,
            seeds.enqueue,
            seeds.warm_start_from,
            tracking.client,
            plan.objectives,
            plan.search,
        ):
            print(note, flush=True)
        experiment = tracking.until_reachable(
            lambda: tracking.experiment_id(plan.tracking.experiment_name), quiet=self.is_worker
        )
        crash_point("stores-created")
        # handed to every job's process through the environment, never on a command line
        contract.hand_to_jobs(
            plan.tracking.uri, plan.study.url, plan.study.outage_limit_s, plan.pruner_json
        )
        mlflow.set_tracking_uri(plan.tracking.uri)
        runs = SweepRuns(tracking.client, experiment, study.study_name, real=tracking.real_id)
        return study, runs, created, tracking

    def deliver_kept(
        self, tracking: TrackingStore, plan: Plan, started: float, ended: bool = False
    ) -> None:
        """What this process kept while the tracking server was away reaches it: before the
        end (`ended=False`), so that the end reads what the trials wrote, and after it
        (`ended=True`), so that no command exits 0 with writes of its own kept (a worker: before
        it exits). Within the time budget when there is one (see TrackingStore.deliver_kept)."""
        deadline = started + plan.loop.timeout_s if plan.loop.timeout_s else None
        if not ended:
            tracking.deliver_kept(
                deadline, after="rerun the same command when it is back to end the sweep"
            )
        elif self.is_worker:
            tracking.deliver_kept(deadline, ended="this worker's trials are done, and its")
        else:
            tracking.deliver_kept(deadline, ended="the sweep ended, and its last")

    def trial_loop(self, study: optuna.Study, runs: SweepRuns, plan: Plan) -> TrialLoop:
        jobs = jobs_for(
            self.launcher,
            self.hydra_context,
            self.task_function,
            self.config,
            plan.fixed,
            plan.base,
        )
        loop = TrialLoop(
            study=study,
            space=plan.space,
            runs=runs,
            jobs=jobs,
            objectives=plan.objectives,
            settings=plan.loop,
            terminated=self.terminated,
            leaving=self.leaving,
            job_stop_at=contract.job_stop_at(),  # in a Slurm task only
            progress=console.EpochProgress(plan.objectives.metric),
            search=plan.search,
            cancel=cancel.Watch(study, threading.Event()),
            # a detached sweep's workers watch each other's tasks in Slurm's queue
            slurm_peer=contract.in_slurm_task() and not self.is_worker,
        )
        if plan.loop.timeout_s:
            # time is kept for the end (publishing, the report); workers share the first deadline
            reserve = min(60.0, 0.1 * plan.loop.timeout_s)
            loop.deadline = contract.share_deadline(time.time() + plan.loop.timeout_s - reserve)
        return loop

    def train(self, loop: TrialLoop, runs: SweepRuns, plan: Plan) -> LoopEnd:
        """This command's trials (and its workers'); Ctrl-C or SIGTERM closes every run."""
        workers = self.workers(loop, plan)
        try:
            if not self.is_worker:
                workers.start()
            # Ray's actors and Slurm's tasks train while this process watches; local workers
            # train beside it
            watched = isinstance(workers, (RayWorkers, SlurmWorkers))
            ending = loop.watch(workers, poll_s=0.25) if watched else loop.run()
            workers.wait()
            return ending
        except (KeyboardInterrupt, SystemExit) as err:
            self.stop_interrupted(workers, loop, runs, plan, type(err).__name__)
        except StorageUnreachable as err:
            # nothing can be read or written in the study; the runs are closed, and the rerun
            # fails the trial that was in flight and settles its run
            workers.stop()
            loop.abandon(f"the sweep stopped: {err}"[:500])
            if not self.is_worker:
                runs.close_parent("FAILED", {keys.SWEEP_STATE: "storage_unreachable"})
            raise
        except BaseException:
            if self.interrupted.is_set():  # the signal, raised inside a database call
                self.stop_interrupted(workers, loop, runs, plan, "KeyboardInterrupt")
            workers.stop()
            loop.recover()
            if not self.is_worker:
                runs.close_parent("FAILED", {keys.SWEEP_STATE: "failed"})
            raise

    def detach(self, loop: TrialLoop, plan: Plan) -> None:
        """slurm.detach: the tasks submitted (unless this sweep's are still in the queue), one
        line on how to watch, and this command is done; the tasks' peers end the sweep."""
        workers = self.workers(loop, plan)
        assert isinstance(workers, SlurmWorkers)
        queued = workers.running()
        if queued:  # a rerun while the tasks train: nothing more to submit
            job = queued[0].split("_")[0]
            print(f"This sweep's Slurm tasks are still in the queue ({' '.join(queued)}).")
        else:
            job = workers.start()
        argv = [mask_url(arg) for arg in sys.argv]  # a password typed on it is not repeated
        watch = shlex.join(["python", *argv, "hydra.sweeper.status=true"])
        stop = shlex.join(["python", *argv, "hydra.sweeper.cancel=true"])
        print(
            f"Detached: Slurm job {job} trains the sweep and its last task to finish does the "
            f"end. Watch it with `{watch}`; stop it with `{stop}` (the end runs with the "
            f"trials so far), or at once with `scancel {job}`; rerun this command to resume",
            flush=True,
        )

    def stop_interrupted(
        self, workers: Any, loop: TrialLoop, runs: SweepRuns, plan: Plan, what: str
    ) -> NoReturn:
        """Ctrl-C or SIGTERM: the workers stopped, every trial and run closed; exit 130 or 143."""
        workers.stop()
        loop.recover()
        code = 143 if self.terminated.is_set() else 130
        why = "SIGTERM" if self.terminated.is_set() else what
        where = mask_url(plan.study.url) if plan.study.url else "memory"
        print(
            f"\nSweep interrupted ({why}); finished trials are kept in {where}. Resume with "
            f"the same command.",
            file=sys.stderr,
        )
        if not self.is_worker:
            runs.close_parent("KILLED", {keys.SWEEP_STATE: "interrupted"})
        sys.exit(code)

    def budget_report(
        self, loop: TrialLoop, ending: LoopEnd, runs: SweepRuns, budget: float, used: float
    ) -> None:
        trials = loop.study.get_trials(deepcopy=False)
        stopped = sum(
            1 for t in trials if keys.failure(t) == "time_budget" and t.number >= loop.first_number
        )
        out_of_budget = ending.how == Ending.OUT_OF_BUDGET
        why = (
            "the next trial would not have finished in time"
            if out_of_budget
            else "all trials finished"
        )
        print(
            f"Time budget {console.duration(budget)}: trials ran for {console.duration(used)} "
            f"({why}); {console.finished(trials)}/{loop.settings.n_trials} finished, {stopped} "
            f"stopped by the budget; the end follows.",
            flush=True,
        )
        lifecycle.log_batch(
            runs.client,
            runs.parent_run_id,
            metrics=lifecycle.as_metrics({keys.TIME_BUDGET: budget, keys.TIME_USED: used}),
            tags=lifecycle.as_tags({keys.STOPPED_BY_BUDGET: str(out_of_budget or stopped > 0)}),
        )

    def workers(self, loop: TrialLoop, plan: Plan) -> WorkerPool | RayWorkers | SlurmWorkers:
        w = plan.workers
        if w.slurm is not None and not self.is_worker:
            sweep_dir = self.start_dir / str(self.config.hydra.sweep.dir)  # (absolute stays)
            return SlurmWorkers(
                w.n_jobs,
                cpu=w.cpu,
                gpu=w.gpu,
                settings=w.slurm,
                folder=sweep_dir / "slurm",
                start_dir=self.start_dir,
                name=plan.study.name,
                on_death=lambda label, why: self.worker_lost(loop, label, why),
            )
        if plan.cluster is None:
            return WorkerPool(
                w.n_jobs, lambda pid, code: self.worker_died(loop, pid), cpu=w.cpu, gpu=w.gpu
            )
        return RayWorkers(
            plan.cluster,
            w.n_jobs,
            cpu=w.cpu or 1,
            gpu=w.gpu or 0,
            runtime_env=w.runtime_env,
            start_dir=self.start_dir,
            on_death=lambda label, why: self.worker_lost(loop, label, why),
        )

    def worker_died(self, loop: TrialLoop, pid: int) -> tuple[bool, bool]:
        """A worker process of this command died: fail its trial now; (whether work is left,
        whether it trained a trial)."""
        try:
            loop.recover(between_trials=False)  # called from the watcher while this trains
            label = {"host": liveness.machine_key(), "pid": str(pid)}
            return self.work_left(loop), liveness.ever_trained(loop.study, label)
        except StorageUnreachable:
            return False, False  # this process stops with the same error; the rerun recovers

    def worker_lost(
        self, loop: TrialLoop, label: dict[str, str] | None, why: str
    ) -> tuple[bool, bool]:
        """A Ray worker (its node, say) or a Slurm task is gone: fail its trial now, so that
        another worker continues it from its checkpoint; (whether work is left, whether it
        trained a trial)."""
        if label is not None:
            for number in liveness.fail_trials_of(loop.study, label, why):
                log.warning("trial %d is marked FAIL: %s", number, why)
            loop.recover(between_trials=False)
            loop.runs.settle(loop.study.get_trials(deepcopy=False))
        return self.work_left(loop), liveness.ever_trained(loop.study, label)

    def work_left(self, loop: TrialLoop) -> bool:
        counts = console.counts(loop.study.get_trials(deepcopy=False))
        return counts["complete"] + counts["pruned"] + counts["running"] < loop.settings.n_trials

    # ---- MLflow parent run ----------------------------------------------------------------------

    def parent_run(self, runs: SweepRuns, study: optuna.Study, created: bool, plan: Plan) -> None:
        """The sweep's one parent run: created with the study, found by every later worker."""
        run_id = study.user_attrs.get(keys.PARENT_RUN)
        if run_id is None and not created:
            # another worker created the study a moment ago and is creating the parent run,
            # unless it died doing so
            creator = optuna_internals.study_system_attrs(study).get(keys.CREATOR)
            gone = creator is None or liveness.is_alive_here(liveness.label_of(creator)) is False
            wait = WAIT_FOR_PARENT_S if not study.get_trials(deepcopy=False) and not gone else 0
            deadline = time.monotonic() + wait
            while run_id is None and time.monotonic() < deadline:
                time.sleep(1)
                run_id = study.user_attrs.get(keys.PARENT_RUN)
        if run_id is not None and lifecycle.run_or_none(runs.client, run_id) is None:
            log.warning("parent run %s is deleted or missing: starting a new one", run_id)
            run_id = None
            created = True
        if run_id is None and not created:
            # the study's creator died before recording its parent run: adopt the run it made
            run_id = runs.find_parent()
            if run_id is not None:
                study.set_user_attr(keys.PARENT_RUN, run_id)
        if run_id is None:
            run_id = runs.create_parent(self.parent_params(plan))
            study.set_user_attr(keys.PARENT_RUN, run_id)
        runs.use_parent(run_id)

    def parent_params(self, plan: Plan) -> dict[str, Any]:
        objectives = plan.objectives
        params = {
            "n_trials": plan.loop.n_trials,
            "direction": ",".join(objectives.directions),
            "sampler": type(plan.sampler).__name__,
            "pruner": type(plan.pruner).__name__,
        }
        if objectives.multi:
            params |= {"metric": ",".join(objectives.names), "champion": objectives.rule()}
        if plan.search is not None:
            params["search_space"] = plan.search.path
        return {
            **{keys.SWEEPER_PARAM.format(name=k): v for k, v in params.items()},
            **{
                keys.SEARCH_PARAM.format(key=keys.config_key(k)): grammar.describe(d)
                for k, d in plan.space.items()
            },
        }

    def print_plan(self, plan: Plan, study: optuna.Study) -> None:
        trials = study.get_trials(deepcopy=False)
        where = mask_url(plan.study.url) if plan.study.url else "in memory"
        print(
            f"Study {study.study_name!r} ({where}): "
            f"{console.finished(trials)}/{plan.loop.n_trials} finished"
            + (" - resuming" if trials else "")
            + f"; {plan.objectives.describe()} over "
            + ", ".join(
                [f"{k} {grammar.describe(d)}" for k, d in plan.space.items()]
                + ([f"the params of {plan.search.path}"] if plan.search else [])
            ),
            flush=True,
        )
