"""A Hydra sweeper that drives an Optuna study with ask/tell and keeps its MLflow runs straight.

The sweeper owns the study and the sweep's parent MLflow run; each job (one trial) owns its
child run. Trials run one after another in each worker; n_jobs > 1 starts more workers, each a
copy of this command, sharing the study through its storage.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from hydra_plugins.mnist_sweeper import report, search_space
from mnist import registry, tracking
from mnist.config import METRICS, ConfigValueError, check_config
from mnist.data import ensure_mnist
from mnist.errors import UserFacingError
from mnist.study import (
    Heartbeat,
    SweepConfigError,
    fail_orphaned_trials,
    make_pruner,
    make_sampler,
    open_study,
    worker_id,
)

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
WAIT_FOR_PARENT_S = 60
# the launcher that runs jobs in this process; others run them elsewhere
IN_PROCESS_LAUNCHERS = ("BasicLauncher",)
INTERRUPTED = "interrupted"
WORKER_ENV = "MNIST_SWEEP_WORKER"


class SweepStopped(UserFacingError, RuntimeError):
    """The sweep stopped on purpose (too many failures); every run is closed."""


class MnistOptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        pruner: Any,
        direction: str,
        n_trials: int,
        n_jobs: int,
        storage: Any,
        study_name: str,
        max_failure_rate: float,
        params: Any,
    ) -> None:
        self.sampler_spec = sampler
        self.pruner_spec = pruner
        self.direction = str(direction).lower()
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = study_name
        self.max_failure_rate = max_failure_rate
        self.params = OmegaConf.to_container(params, resolve=True) if params else {}

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.start_dir = Path(config.hydra.runtime.cwd)
        self.sweep_dir = Path(config.hydra.sweep.dir)

    # ---- checks: everything that can be wrong is found before anything is created ----------

    def _compose(self, overrides: list[str]) -> DictConfig:
        try:
            return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except HydraException as err:
            raise SweepConfigError(str(err).splitlines()[0]) from None

    def _check(self, arguments: list[str]) -> tuple[dict, list[str], DictConfig]:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise SweepConfigError(
                f"hydra.sweeper.n_trials={self.n_trials} must be a whole number >= 1"
            )
        if not isinstance(self.n_jobs, int) or self.n_jobs < 1:
            raise SweepConfigError(f"hydra.sweeper.n_jobs={self.n_jobs} must be >= 1")
        if not 0.0 <= float(self.max_failure_rate) <= 1.0:
            raise SweepConfigError(
                f"hydra.sweeper.max_failure_rate={self.max_failure_rate} must be in [0, 1]"
            )
        if self.direction not in ("maximize", "minimize"):
            raise SweepConfigError(
                f"hydra.sweeper.direction={self.direction} must be maximize or minimize"
            )
        space, fixed = search_space.parse(self.params, arguments)
        if not space:
            raise SweepConfigError(
                "the search space is empty: set hydra.sweeper.params (see conf/sweep/optuna.yaml)"
            )
        base = self._compose(fixed)
        for key in space:
            if OmegaConf.select(base, key, default="__missing__") == "__missing__":
                raise SweepConfigError(
                    f"hydra.sweeper.params.{key}: the config has no key {key!r} to search over"
                )
        # every corner of the space must make a config the trainer accepts
        for key, dist in space.items():
            values = (
                dist.choices
                if isinstance(dist, optuna.distributions.CategoricalDistribution)
                else (dist.low, dist.high)
            )
            for value in values:
                cfg = self._compose(fixed + [search_space.as_override(key, value)])
                try:
                    check_config(cfg)
                except ConfigValueError as err:
                    raise SweepConfigError(
                        f"hydra.sweeper.params.{key} = {search_space.describe(dist)} "
                        f"reaches {key}={value}, which cannot train: {err}"
                    ) from None
        check_config(base)
        wanted = METRICS[base.metric]
        if wanted != self.direction:
            raise SweepConfigError(
                f"metric={base.metric} is to {wanted}, but hydra.sweeper.direction="
                f"{self.direction}: set hydra.sweeper.direction={wanted}"
            )
        launcher = type(self.launcher).__name__
        if self.storage is None and launcher not in IN_PROCESS_LAUNCHERS:
            raise SweepConfigError(
                f"hydra.sweeper.storage=null keeps the study in memory, which jobs started by "
                f"{launcher} in other processes cannot reach: use sqlite:///optuna.db or postgresql://..."
            )
        if self.storage is None and self.n_jobs > 1:
            raise SweepConfigError(
                "hydra.sweeper.n_jobs > 1 runs workers in separate processes, which need a shared "
                "storage: set hydra.sweeper.storage=sqlite:///optuna.db or postgresql://..."
            )
        return space, fixed, base

    # ---- the sweep ---------------------------------------------------------------------------

    def sweep(self, arguments: list[str]) -> Any:
        try:
            return self._sweep(arguments)
        except UserFacingError as err:
            # every run is closed by now; the message says what to change
            print(f"Error: {err}", file=sys.stderr)
            sys.exit(2 if not isinstance(err, SweepStopped) else 1)

    def _sweep(self, arguments: list[str]) -> Any:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens
        # one progress line per trial replaces the launcher's "Launching 1 jobs locally" pair
        logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
        space, fixed, base = self._check(arguments)
        seed = base.seed
        sampler = make_sampler(self.sampler_spec, seed, space)
        pruner = make_pruner(self.pruner_spec)
        storage = tracking.absolute_uri(str(self.storage), self.start_dir) if self.storage else None
        tracking_uri = tracking.absolute_uri(base.mlflow.tracking_uri, self.start_dir)
        ensure_mnist(self.start_dir / base.data.root, download=base.data.download)
        client = tracking.connect(tracking_uri)  # a down server fails here, not after retries

        # a worker started by n_jobs > 1 trains trials; the process that started it owns the end
        is_worker = os.environ.get(WORKER_ENV) == "1"
        study, created = open_study(self.study_name, storage, self.direction, sampler, pruner)
        if not created:
            # a resumed study, or a second worker: the seed's sequence would repeat the first
            # worker's trials, so only the process that created the study keeps the seed
            sampler.reseed_rng()
        experiment = tracking.experiment_id(client, base.mlflow.experiment_name)
        self._recover(client, study)

        done = report.counts(study)
        if done["complete"] + done["pruned"] >= self.n_trials and not is_worker:
            parent = study.user_attrs.get(PARENT_ATTR)
            if parent and not done["running"] and self._claim_finish(study):
                # every trial ended but the worker that ran the last one died before the end
                tracking.reopen_run(client, parent)
                return self._finish(study, client, parent, base, tracking_uri)
            print(self._summary(study, base.metric, tracking_uri, parent_run_id=None))
            print(
                f"Study {self.study_name!r} already has {done['complete'] + done['pruned']} "
                f"finished trials (n_trials={self.n_trials}). To continue it, raise "
                f"hydra.sweeper.n_trials; to start over, set a new hydra.sweeper.study_name."
            )
            return []

        parent = self._parent_run(client, study, experiment, created, sampler, pruner)
        self._print_plan(space, study, storage, tracking_uri)
        workers = [] if is_worker else self._start_workers()
        try:
            self._loop(study, space, fixed, parent, base.metric, client)
            for proc in workers:
                proc.wait()
        except (KeyboardInterrupt, SystemExit) as err:
            self._stop_workers(workers)
            self._close_orphaned_runs(client, study)
            print(
                f"\nSweep interrupted ({type(err).__name__}); finished trials are kept in "
                f"{storage or 'memory'}. Resume with the same command:\n  "
                + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
                file=sys.stderr,
            )
            if not is_worker:
                tracking.end_run(client, parent, "KILLED", {"sweep.state": INTERRUPTED})
            sys.exit(130)
        except BaseException:
            self._stop_workers(workers)
            self._close_orphaned_runs(client, study)
            if not is_worker:
                tracking.end_run(client, parent, "FAILED", {"sweep.state": "failed"})
            raise
        if is_worker:
            return []
        if not self._claim_finish(study):
            print(
                f"This worker is done; trials of other workers are still training, and the "
                f"last one to finish tags the best run ({report.counts(study)})."
            )
            return []
        return self._finish(study, client, parent, base, tracking_uri)

    def _recover(self, client, study: optuna.Study) -> None:
        """Fail the trials whose worker died, and close their runs."""
        for number in fail_orphaned_trials(study):
            log.warning("trial %d was left running by a worker that died: marked FAIL", number)
        self._close_orphaned_runs(client, study)

    @staticmethod
    def _claim_finish(study: optuna.Study) -> bool:
        """True for exactly one worker: the one that may tag the best run and end the parent.

        Only once no trial is running; creating a study is atomic in every Optuna storage, so a
        marker study per finished-trial count is the lock (a continued study finishes again).
        """
        counts = report.counts(study)
        if counts["running"]:
            return False
        finished = counts["complete"] + counts["pruned"]
        try:
            optuna.create_study(
                study_name=f"{study.study_name}.finished-{finished}", storage=study._storage
            )
        except optuna.exceptions.DuplicatedStudyError:
            return False
        return True

    @staticmethod
    def _stop_workers(workers: list[subprocess.Popen]) -> None:
        # SIGINT first: each worker closes its own trial and run, as after Ctrl-C
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in workers:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start_workers(self) -> list[subprocess.Popen]:
        """n_jobs - 1 more copies of this command, one trial at a time each, on one study."""
        if self.n_jobs == 1:
            return []
        threads = max(1, (os.cpu_count() or 1) // self.n_jobs)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), **{WORKER_ENV: "1"})
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)  # this process trains too: share the cores evenly
        argv = [sys.executable, *sys.argv, "hydra.sweeper.n_jobs=1"]
        return [subprocess.Popen(argv, env=env) for _ in range(self.n_jobs - 1)]

    def _loop(
        self,
        study: optuna.Study,
        space: dict,
        fixed: list[str],
        parent: str,
        metric: str,
        client,
    ) -> None:
        durations: list[float] = []
        while True:
            self._recover(client, study)  # a worker elsewhere may have died meanwhile
            counts = report.counts(study)
            finished = counts["complete"] + counts["pruned"]
            errors = sum(
                1
                for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if t.system_attrs.get("failure") == "error"
            )
            # judged against the planned trials until more than that have run, so that one
            # early failure does not look like a 100% rate; 1.0 never stops
            attempts = len(study.get_trials(deepcopy=False))
            if errors > self.max_failure_rate * max(self.n_trials, attempts):
                raise SweepStopped(
                    f"{errors} of {attempts} trials failed, more than hydra.sweeper."
                    f"max_failure_rate={self.max_failure_rate} allows: the sweep stopped. See "
                    f"each failed run's failure_reason tag in MLflow; fix the cause, or raise "
                    f"max_failure_rate (1.0 never stops), and rerun the command to resume."
                )
            # running trials of other workers count: the study must not overshoot n_trials
            if finished + counts["running"] >= self.n_trials:
                return
            trial = study.ask(space)
            if self._surplus(study, trial):
                continue
            for key, value in worker_id().items():
                study._storage.set_trial_system_attr(trial._trial_id, f"worker_{key}", value)
            started = time.perf_counter()
            self._run_trial(study, trial, fixed, parent, metric)
            durations.append(time.perf_counter() - started)
            frozen = study.get_trials(deepcopy=False)[trial.number]
            counts = report.counts(study)
            finished = counts["complete"] + counts["pruned"]
            left = max(self.n_trials - finished, 0)
            mean = sum(durations) / len(durations)
            print(
                report.progress_line(
                    frozen,
                    finished,
                    self.n_trials,
                    metric,
                    durations[-1],
                    mean * left / self.n_jobs if left else None,
                ),
                flush=True,
            )

    def _surplus(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Another worker asked for the last trial at the same moment: give this one back."""
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        ahead = [
            t for t in study.get_trials(deepcopy=False, states=live) if t.number < trial.number
        ]
        if len(ahead) < self.n_trials:
            return False
        self._tell_failed(study, trial, "surplus", "not run: n_trials were already taken")
        return True

    def _run_trial(
        self, study: optuna.Study, trial: optuna.Trial, fixed: list[str], parent: str, metric: str
    ) -> TrialState:
        overrides = list(fixed)
        overrides += [search_space.as_override(k, v) for k, v in trial.params.items()]
        overrides += [
            f"trial.number={trial.number}",
            f"trial.id={trial._trial_id}",  # Trial(study, id) is how a job re-opens its trial
            f"trial.parent_run_id={parent}",
        ]
        try:
            with Heartbeat(study, trial._trial_id):
                (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
        except (KeyboardInterrupt, SystemExit):
            self._tell_failed(study, trial, INTERRUPTED, "interrupted while training")
            raise
        except Exception as err:  # the launcher itself failed; the failure budget decides
            self._tell_failed(study, trial, "error", f"{type(err).__name__}: {err}")
            log.warning("trial %d could not run: %s: %s", trial.number, type(err).__name__, err)
            return TrialState.FAIL
        if ret.status == JobStatus.COMPLETED:
            value = ret.return_value
            if isinstance(value, (int, float)) and math.isfinite(value):
                study.tell(trial, float(value))
                return TrialState.COMPLETE
            self._tell_failed(study, trial, "error", f"the job returned {value!r}, not a number")
            return TrialState.FAIL
        err = ret._return_value  # the job's exception (JobReturn.return_value would re-raise it)
        if isinstance(err, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED
        self._tell_failed(study, trial, "error", f"{type(err).__name__}: {err}")
        log.warning("trial %d failed: %s: %s", trial.number, type(err).__name__, err)
        return TrialState.FAIL

    @staticmethod
    def _tell_failed(study: optuna.Study, trial: optuna.Trial, kind: str, reason: str) -> None:
        study._storage.set_trial_system_attr(trial._trial_id, "failure", kind)
        trial.set_user_attr("fail_reason", reason.splitlines()[0][:500] if reason else "")
        study.tell(trial, state=TrialState.FAIL)

    # ---- MLflow parent run ----------------------------------------------------------------------

    def _parent_run(
        self,
        client,
        study: optuna.Study,
        experiment: str,
        created: bool,
        sampler: optuna.samplers.BaseSampler,
        pruner: optuna.pruners.BasePruner,
    ) -> str:
        """The sweep's one parent run: created with the study, found by every later worker."""
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id is None and not created:
            # another worker created the study a moment ago and is creating the parent run
            deadline = time.monotonic() + (WAIT_FOR_PARENT_S if not study.trials else 0)
            while run_id is None and time.monotonic() < deadline:
                time.sleep(1)
                run_id = optuna.load_study(
                    study_name=study.study_name, storage=study._storage
                ).user_attrs.get(PARENT_ATTR)
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:
                log.warning("parent run %s is not in this MLflow store: starting a new one", run_id)
                run_id = None
        if run_id is None and not created:
            # the study's creator died before recording its parent run: adopt the run it made
            run_id = tracking.find_parent_run(client, experiment, self.study_name)
            if run_id is not None:
                study.set_user_attr(PARENT_ATTR, run_id)
                tracking.reopen_run(client, run_id)
                return run_id
        if run_id is None:
            run_id = tracking.start_run(
                client,
                experiment,
                f"sweep-{self.study_name}",
                {
                    "sweeper.n_trials": self.n_trials,
                    "sweeper.direction": self.direction,
                    "sweeper.sampler": type(sampler).__name__,
                    "sweeper.pruner": type(pruner).__name__,
                    **{
                        f"search.{k}": v
                        for k, v in search_space.flatten_params(self.params).items()
                    },
                },
                {"sweep.role": tracking.PARENT_ROLE, "optuna.study_name": self.study_name},
            )
            study.set_user_attr(PARENT_ATTR, run_id)
        else:
            tracking.reopen_run(client, run_id)
        return run_id

    def _close_orphaned_runs(self, client, study: optuna.Study) -> None:
        """Child runs still RUNNING whose trial is over (a killed worker): close them FAILED."""
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id and tracking.is_running(client, run_id):
                kind = trial.system_attrs.get("failure", "orphaned")
                tracking.end_run(
                    client,
                    run_id,
                    "KILLED" if kind == INTERRUPTED else "FAILED",
                    {
                        "optuna.state": "FAIL",
                        "failure_reason": trial.user_attrs.get(
                            "fail_reason", "its worker died while training"
                        ),
                    },
                )

    # ---- the end -----------------------------------------------------------------------------

    def _finish(self, study, client, parent: str, base: DictConfig, tracking_uri: str) -> Any:
        try:
            return self._publish(study, client, parent, base, tracking_uri)
        except BaseException as err:
            # interrupted or broken while publishing: the parent must not stay RUNNING
            status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
            tracking.end_run(
                client, parent, status, {"sweep.state": f"{status.lower()} at the end"}
            )
            raise

    def _publish(self, study, client, parent: str, base: DictConfig, tracking_uri: str) -> Any:
        """Tag the best run, publish its model, report, end the parent run."""
        metric = base.metric
        best = report.best_trial(study)
        best_run_id = best.user_attrs.get("mlflow_run_id") if best else None
        published = None
        if best is not None and best_run_id:
            for note in tracking.mark_best(
                client, parent, best_run_id, best.number, best.params, metric, best.value
            ):
                log.warning(note)
            try:
                published = registry.publish_best(
                    client,
                    tracking_uri,
                    best_run_id,
                    parent,
                    base.mlflow.registered_model_name,
                    self.start_dir / base.data.root,
                    dropout=float(client.get_run(best_run_id).data.params["model.dropout"]),
                    tags={
                        "optuna.study_name": self.study_name,
                        "optuna.trial_number": str(best.number),
                        "parent_run_id": parent,
                        metric: f"{best.value:.6f}",
                    },
                )
            except (MlflowException, OSError, KeyError) as err:
                # the sweep's results stand without a registered model; say why there is none
                log.error("the best model was not published: %s: %s", type(err).__name__, err)
                client.set_tag(parent, "publish_error", f"{type(err).__name__}: {err}"[:5000])
        with tempfile.TemporaryDirectory() as tmp:
            if report.write_plots(study, Path(tmp)):
                client.log_artifacts(parent, tmp, "report")
        done = report.counts(study)
        tags = {
            "sweep.state": "finished",
            "trials.complete": done["complete"],
            "trials.pruned": done["pruned"],
            "trials.failed": done["failed"],
        }
        if published is not None:
            tags |= {"model_version": published.version, "champion": str(published.champion_moved)}
        tracking.end_run(client, parent, "FINISHED", tags)
        results = report.write_results(
            self.sweep_dir / "optimization_results.yaml",
            study,
            metric,
            best_run_id,
            parent,
            tracking_uri,
            published,
        )
        print(self._summary(study, metric, tracking_uri, parent))
        if published is not None:
            print(self._published(base.mlflow.registered_model_name, published))
        if best_run_id:
            print(report.run_info(client, best_run_id))
        return results

    @staticmethod
    def _published(name: str, published: registry.Published) -> str:
        line = (
            f"model: {name} version {published.version} ({published.model_uri}), "
            f"test_acc={published.test_acc:.4f}; "
        )
        if published.previous_champion is None:
            return line + f"it is the first @champion: models:/{name}@champion"
        if published.champion_moved:
            return line + (
                f"@champion moved from version {published.previous_champion} "
                f"(test_acc={published.previous_test_acc:.4f})"
            )
        return line + (
            f"@champion stays on version {published.previous_champion} "
            f"(test_acc={published.previous_test_acc:.4f} is not beaten)"
        )

    def _summary(self, study, metric: str, tracking_uri: str, parent_run_id: str | None) -> str:
        done = report.counts(study)
        best = report.best_trial(study)
        lines = [
            "",
            report.table(study, metric),
            "",
            f"{done['complete']} complete, {done['pruned']} pruned, {done['failed']} failed",
        ]
        if best is not None:
            params = ", ".join(f"{k}={report.short(v)}" for k, v in best.params.items())
            lines.append(
                f"best: trial {best.number} {metric}={best.value:.4f} ({params}), "
                f"run {best.user_attrs.get('mlflow_run_id')}"
            )
        else:
            lines.append("no trial completed, so there is no best run")
        if parent_run_id:
            lines.append(f"parent run {parent_run_id}; results in {self.sweep_dir}")
        lines.append(f"see the runs: {self._ui_command(tracking_uri)}")
        return "\n".join(lines)

    def _ui_command(self, tracking_uri: str) -> str:
        if tracking_uri.startswith(("http://", "https://")):
            return f"open {tracking_uri}"
        return f"mlflow ui --backend-store-uri {tracking_uri}"

    def _print_plan(self, space: dict, study: optuna.Study, storage, tracking_uri: str) -> None:
        done = report.counts(study)
        print(
            f"Study {self.study_name!r} ({storage or 'in memory'}): "
            f"{done['complete'] + done['pruned']}/{self.n_trials} finished"
            + (" - resuming" if study.trials else "")
            + f"; {self.direction} over "
            + ", ".join(f"{k} {search_space.describe(d)}" for k, d in space.items()),
            flush=True,
        )
