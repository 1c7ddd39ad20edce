"""One sweep command, start to end: checks, the study, the parent run, the trials, the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

from hydra_plugins.mlflow_optuna_sweeper import _console, _runs, _space, job
from hydra_plugins.mlflow_optuna_sweeper._checks import Checks, Plan
from hydra_plugins.mlflow_optuna_sweeper._errors import SweepConfigError, SweepError, mask_url
from hydra_plugins.mlflow_optuna_sweeper._faults import crash_point
from hydra_plugins.mlflow_optuna_sweeper._finish import SweepEnd
from hydra_plugins.mlflow_optuna_sweeper._loop import TrialLoop, settle_runs, terminated
from hydra_plugins.mlflow_optuna_sweeper._study import (
    CREATOR_ATTR,
    WORKER_HOST,
    WORKER_PID,
    check_space_unchanged,
    machine_key,
    make_storage,
    open_study,
    pid_alive,
)
from hydra_plugins.mlflow_optuna_sweeper._warm import seed_study
from hydra_plugins.mlflow_optuna_sweeper._workers import WorkerPool, is_worker
from hydra_plugins.mlflow_optuna_sweeper.config import MlflowOptunaSweeperConf

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
WAIT_FOR_PARENT_S = 60
# the launcher that runs jobs in this process; others run them elsewhere


def run_sweep(
    settings: MlflowOptunaSweeperConf,
    hydra_context: Any,
    task_function: Any,
    config: DictConfig,
    arguments: list[str],
) -> Any:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
    # one progress line per trial replaces the launcher's "Launching 1 jobs locally" pair
    logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
    # MLflow prints "View run ... / View experiment ..." for every run on an HTTP server
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    sweep = SweepRun(settings, hydra_context, task_function, config)
    try:
        return sweep.run(arguments)
    except SweepError as err:
        # every run is closed by now; the message says what to change
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's preemption) stops the sweep as Ctrl-C does, then exits 143."""

    def stop(signum, frame):
        terminated.set()
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    # a shell that starts a command in the background (`cmd &`) makes it ignore SIGINT, and
    # Python then never raises KeyboardInterrupt: `kill -INT` must stop a sweep cleanly anyway
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


class SweepRun:
    def __init__(self, settings, hydra_context, task_function, config: DictConfig) -> None:
        self.s = settings
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.start_dir = Path(config.hydra.runtime.cwd)
        self.is_worker = is_worker()
        self.checks = Checks(settings, hydra_context, config, self.launcher, self.start_dir)
        self.end = SweepEnd(settings, self.compose, config.hydra.sweep.dir)

    def compose(self, overrides: list[str]) -> DictConfig:
        return self.checks.compose(overrides)

    # ---- the sweep ---------------------------------------------------------------------------

    def run(self, arguments: list[str]) -> Any:
        plan = self.checks.plan(arguments)
        with sigterm_as_interrupt():
            return self._run(plan)

    def _run(self, plan: Plan) -> Any:
        study, created, client, experiment = self.open_stores(plan)
        workers = WorkerPool(self.s.n_jobs, on_death=lambda pid, code: self.worker_died(loop, pid))
        loop = self.trial_loop(study, client, experiment, plan)
        started = time.time()
        loop.recover()
        settle_runs(client, study)  # runs a killed sweep left open or mislabelled
        parent = self.parent_run(client, study, experiment, created, plan)
        done = _console.counts(study)
        if done["complete"] + done["pruned"] >= self.s.n_trials and not self.is_worker:
            return self.end.finish(study, client, parent, plan, resumed_complete=True)
        loop.parent_run_id = parent
        self.print_plan(plan, study)
        self.train(loop, workers, client, parent, plan)
        if self.is_worker:
            return []
        if plan.timeout_s:
            self.budget_report(loop, client, parent, plan.timeout_s, time.time() - started)
        if loop.grid_used_up:
            print(
                f"The grid is used up: every one of its points has been tried ({self.s.sampler})."
            )
        if loop.waiting_on:
            print(
                f"This command's trials are done; still training on other machines: "
                f"{', '.join(loop.waiting_on)}. The worker that finishes the last trial ends the "
                f"sweep; this storage has no heartbeats, so if that worker dies, rerun this "
                f"command to end it."
            )
            return []
        return self.end.finish(study, client, parent, plan)

    def open_stores(self, plan: Plan) -> tuple[optuna.Study, bool, Any, str]:
        """The study (created, or resumed if its space still fits), the MLflow store, the env."""
        study, created = open_study_or_explain(self.s, plan)
        crash_point("study-created")
        if not created:
            check_space_unchanged(study, plan.space)
            # a resumed study, or a second worker: the seed's sequence would repeat the first
            # worker's trials, so only the process that created the study keeps the seed
            plan.sampler.reseed_rng()
        client = _runs.connect(plan.tracking_uri)  # a down server fails here, not after retries
        for note in seed_study(
            study, plan.space, plan.enqueue or [], self.s.warm_start_from, client, plan.objectives
        ):
            print(note, flush=True)
        experiment = _runs.experiment_id(client, plan.experiment_name)
        crash_point("stores-created")
        # handed to every job's process through the environment, never on a command line
        os.environ["MLFLOW_TRACKING_URI"] = plan.tracking_uri
        mlflow.set_tracking_uri(plan.tracking_uri)
        if plan.storage_url:
            os.environ[job.ENV_STORAGE] = plan.storage_url
        os.environ[job.ENV_PRUNER] = json.dumps(self.s.pruner)
        return study, created, client, experiment

    def trial_loop(self, study, client, experiment: str, plan: Plan) -> TrialLoop:
        s = self.s
        loop = TrialLoop(
            study=study,
            space=plan.space,
            fixed=plan.fixed,
            parent_run_id="",
            client=client,
            experiment_id=experiment,
            launcher=self.launcher,
            n_trials=s.n_trials,
            n_jobs=s.n_jobs,
            objectives=plan.objectives,
            max_failure_rate=float(s.max_failure_rate),
            trial_timeout=s.trial_timeout,
            grace_s=s.heartbeat_grace,
            progress=_console.EpochProgress(plan.objectives.metric),
            keep_checkpoints=bool(s.keep_checkpoints),
        )
        if plan.timeout_s:
            # time is kept for the end (publishing, the report); workers share the first deadline
            reserve = min(60.0, 0.1 * plan.timeout_s)
            deadline = os.environ.get(job.ENV_DEADLINE) or time.time() + plan.timeout_s - reserve
            os.environ[job.ENV_DEADLINE] = str(deadline)
            loop.deadline = float(deadline)
        return loop

    def train(self, loop: TrialLoop, workers: WorkerPool, client, parent: str, plan: Plan) -> None:
        """This command's trials (and its workers'); Ctrl-C or SIGTERM closes every run."""
        try:
            if not self.is_worker:
                workers.start()
            loop.run()
            workers.wait()
        except (KeyboardInterrupt, SystemExit) as err:
            workers.stop()
            loop.recover()
            code = 143 if terminated.is_set() else 130
            why = "SIGTERM" if terminated.is_set() else type(err).__name__
            where = mask_url(plan.storage_url) if plan.storage_url else "memory"
            print(
                f"\nSweep interrupted ({why}); finished trials are kept in {where}. Resume with "
                f"the same command.",
                file=sys.stderr,
            )
            if not self.is_worker:
                _runs.end_run(client, parent, "KILLED", {"sweep.state": "interrupted"})
            sys.exit(code)
        except BaseException:
            workers.stop()
            loop.recover()
            if not self.is_worker:
                _runs.end_run(client, parent, "FAILED", {"sweep.state": "failed"})
            raise

    def budget_report(self, loop: TrialLoop, client, parent: str, budget: float, used: float):
        stopped = sum(
            1
            for t in loop.study.get_trials(deepcopy=False)
            if t.system_attrs.get("failure") == "time_budget" and t.number >= loop.first_number
        )
        done = _console.counts(loop.study)
        why = (
            "the next trial would not have finished in time"
            if loop.out_of_budget
            else "all trials finished"
        )
        print(
            f"Time budget {_console.duration(budget)}: trials ran for {_console.duration(used)} "
            f"({why}); {done['complete'] + done['pruned']}/{self.s.n_trials} finished, {stopped} "
            f"stopped by the budget; the end follows.",
            flush=True,
        )
        _runs.log_metrics(client, parent, {"time_budget_s": budget, "time_used_s": used}, 0)
        client.set_tag(parent, "stopped_by_budget", str(loop.out_of_budget or stopped > 0))

    def worker_died(self, loop: TrialLoop, pid: int) -> bool:
        """A worker process of this command died: fail its trial now; replace it if work is left."""
        loop.recover(between_trials=False)  # called from the watcher while this process trains
        counts = _console.counts(loop.study)
        return counts["complete"] + counts["pruned"] + counts["running"] < self.s.n_trials

    # ---- MLflow parent run ----------------------------------------------------------------------

    def parent_run(self, client, study: optuna.Study, experiment: str, created: bool, plan) -> str:
        """The sweep's one parent run: created with the study, found by every later worker."""
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is None and not created:
            # another worker created the study a moment ago and is creating the parent run,
            # unless it died doing so
            attrs = study._storage.get_study_system_attrs(study._study_id)
            creator = attrs.get(CREATOR_ATTR)
            gone = creator is None or (
                creator.get(WORKER_HOST) == machine_key()
                and not pid_alive(int(creator[WORKER_PID]))
            )
            wait = WAIT_FOR_PARENT_S if not study.trials and not gone else 0
            deadline = time.monotonic() + wait
            while run_id is None and time.monotonic() < deadline:
                time.sleep(1)
                run_id = optuna.load_study(
                    study_name=study.study_name, storage=study._storage
                ).user_attrs.get(PARENT_ATTR)
        if run_id is not None and _runs.run_or_none(client, run_id) is None:
            log.warning("parent run %s is deleted or missing: starting a new one", run_id)
            run_id = None
            created = True
        if run_id is None and not created:
            # the study's creator died before recording its parent run: adopt the run it made
            run_id = _runs.find_parent_run(client, experiment, study.study_name)
            if run_id is not None:
                study.set_user_attr(PARENT_ATTR, run_id)
        if run_id is None:
            run_id = _runs.start_run(
                client,
                experiment,
                f"sweep-{study.study_name}",
                {
                    "sweeper.n_trials": self.s.n_trials,
                    "sweeper.direction": ",".join(plan.objectives.directions),
                    **(
                        {
                            "sweeper.metric": ",".join(plan.objectives.names),
                            "sweeper.champion": plan.objectives.rule(),
                        }
                        if plan.objectives.multi
                        else {}
                    ),
                    "sweeper.sampler": type(plan.sampler).__name__,
                    "sweeper.pruner": type(plan.pruner).__name__,
                    **{f"search.{k}": _space.describe(d) for k, d in plan.space.items()},
                },
                {"sweep.role": _runs.PARENT_ROLE, "optuna.study_name": study.study_name},
            )
            study.set_user_attr(PARENT_ATTR, run_id)
        elif not _runs.is_running(client, run_id):
            _runs.reopen_run(client, run_id)
        return run_id

    def print_plan(self, plan: Plan, study: optuna.Study) -> None:
        done = _console.counts(study)
        where = mask_url(plan.storage_url) if plan.storage_url else "in memory"
        print(
            f"Study {study.study_name!r} ({where}): "
            f"{done['complete'] + done['pruned']}/{self.s.n_trials} finished"
            + (" - resuming" if study.trials else "")
            + f"; {plan.objectives.describe()} over "
            + ", ".join(f"{k} {_space.describe(d)}" for k, d in plan.space.items()),
            flush=True,
        )


def open_study_or_explain(s: MlflowOptunaSweeperConf, plan: Plan, attempts: int = 5):
    url = plan.storage_url
    for attempt in range(attempts):
        try:
            storage = make_storage(url, s.heartbeat_interval, s.heartbeat_grace)
            return open_study(s.study_name, storage, plan.objectives, plan.sampler, plan.pruner)
        except SweepError:
            raise
        except Exception as err:  # a database that does not exist, a server that refuses
            if not type(err).__module__.startswith(("sqlalchemy", "psycopg", "optuna", "sqlite3")):
                raise
            if creating_at_once(err) and attempt + 1 < attempts:
                time.sleep(0.5 * (attempt + 1))  # the other worker's tables are there by then
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SweepConfigError(
                f"cannot open the Optuna storage {mask_url(url)}: {mask_url(first)[:300]}. Check "
                f"the URL, that the database exists (createdb ...) and that its server runs"
            ) from None


def creating_at_once(err: Exception) -> bool:
    """Workers that start together on a new PostgreSQL database all create Optuna's tables;
    all but one fail on a unique index (the catalogue's, or the version row's), or find a
    table that "already exists". Opened again, the storage finds them made."""
    text = str(err)
    return "duplicate key value" in text or "already exists" in text
