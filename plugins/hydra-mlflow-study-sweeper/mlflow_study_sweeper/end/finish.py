"""The end of a sweep: tag the best run, publish and register its model, report, close.

Exactly once across workers, and redone when it was cut short: see EndClaim (_claim.py).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from hydra.utils import instantiate
from omegaconf import DictConfig

from mlflow_study_sweeper import console, keys
from mlflow_study_sweeper.end import registry, report
from mlflow_study_sweeper.end.claim import EndClaim
from mlflow_study_sweeper.end.registry import Published
from mlflow_study_sweeper.errors import mask_url
from mlflow_study_sweeper.faults import crash_point
from mlflow_study_sweeper.search.grammar import as_override
from mlflow_study_sweeper.search.objectives import KNEE, Objectives
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.tracking import lifecycle
from mlflow_study_sweeper.tracking.lifecycle import SweepRuns
from mlflow_study_sweeper.tracking.store import TrackingStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """hydra.sweeper.registry: which MLflow model of the best run to register, and the alias."""

    model: str | None = None
    name: str | None = None
    alias: str = "champion"
    metric: str | None = None
    direction: str | None = None


@dataclass(frozen=True)
class EndPlan:
    """What the end needs to know of the sweep's settings."""

    objectives: Objectives
    n_trials: int
    fixed: list[str]  # the command line's fixed overrides, to compose the best trial's config
    compose: Callable[[list[str]], DictConfig]
    sweep_dir: str
    grace_s: float
    publish: Any = None  # the app's hook, a _target_ mapping
    registry: Registration = field(default_factory=Registration)


class SweepEnd:
    def __init__(self, plan: EndPlan, tracking: TrackingStore) -> None:
        self.plan = plan
        self.tracking = tracking

    def finish(self, study: optuna.Study, runs: SweepRuns, resumed_complete: bool = False) -> Any:
        trials = study.get_trials(deepcopy=False)
        claim = EndClaim(study, console.finished(trials), self.plan.grace_s)
        if not claim.acquire():
            return self.finished_elsewhere(study, runs, claim, resumed_complete)
        if claim.value.get("taken_over"):
            log.warning("the end of the sweep was cut short earlier: finishing it now")
        try:
            # a tracking server that goes away during the end is waited for; the steps done
            # are recorded in the claim, and not done again
            result = self.tracking.until_reachable(
                lambda: self.end_steps(study, runs, claim),
                what="end the sweep",
            )
        except BaseException as err:
            claim.release()
            status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
            runs.close_parent(status, {keys.SWEEP_STATE: f"{status.lower()} at the end"})
            raise
        claim.finish()
        crash_point("end-claimed")  # the end is recorded in the study: nothing is redone
        return result

    def finished_elsewhere(
        self, study: optuna.Study, runs: SweepRuns, claim: EndClaim, resumed_complete: bool
    ) -> Any:
        current = claim.current() or {}
        if current.get("state") != "done":
            print(f"{claim.describe_holder(current)} is ending the sweep now.")
            return []
        if lifecycle.is_running(runs.client, runs.parent_run_id):  # reopened by this command
            runs.close_parent("FINISHED", {})
        if not resumed_complete:
            print(f"The sweep is finished; {claim.describe_holder(current)} ended it.")
            return []
        print(self.summary(study, runs, parent_run_id=None))
        print(
            f"Study {study.study_name!r} already has {console.finished(study.get_trials())} "
            f"finished trials (n_trials={self.plan.n_trials}). To continue it, raise "
            f"hydra.sweeper.n_trials; to start over, set a new hydra.sweeper.study_name."
        )
        return []

    def end_steps(self, study: optuna.Study, runs: SweepRuns, claim: EndClaim) -> Any:
        """Tag the best run, publish and register its model, report, end the parent run."""
        runs.settle(study.get_trials(deepcopy=False))
        objectives = self.plan.objectives
        if objectives.multi:
            self.mark_front(study, runs)
        best = objectives.best(study)
        best_run_id = runs.run_id(best) if best else None
        if best_run_id and lifecycle.run_or_none(runs.client, best_run_id) is None:
            log.warning("the best trial's run %s was deleted: nothing to tag", best_run_id)
            best_run_id = None
        published = None
        if best is None:
            runs.clear_best()  # no champion meets the constraints (any more)
        if best is not None and best_run_id:
            for note in runs.mark_best(best_run_id, best.number, best.params, objectives.of(best)):
                log.warning(note)
            crash_point("end-tagged")
            if self.plan.publish and not claim.done_step("published"):
                self.publish(best, best_run_id, runs)
                claim.record("published")
                crash_point("end-published")
            if self.plan.registry.name and self.plan.registry.model:
                published = self.register(study, best, best_run_id, runs, claim)
        with tempfile.TemporaryDirectory() as tmp:
            if report.write_plots(study, Path(tmp), objectives):
                runs.client.log_artifacts(runs.parent_run_id, tmp, "report")
        crash_point("end-reported")
        done = console.counts(study.get_trials(deepcopy=False))
        cancelled = optuna_internals.study_system_attrs(study).get(keys.CANCEL)
        tags = {
            keys.SWEEP_STATE: "cancelled" if cancelled else "finished",
            **{
                keys.TRIAL_COUNT.format(state=s): done[s]
                for s in ("complete", "pruned", "failed", "retried")
            },
        }
        if published is not None:
            tags |= {keys.MODEL_VERSION: published.version, published.alias: str(published.moved)}
        runs.close_parent("FINISHED", tags)
        crash_point("end-parent-closed")
        results = console.write_results(
            Path(self.plan.sweep_dir) / "optimization_results.yaml",
            study,
            objectives,
            best_run_id,
            runs.parent_run_id,
            mask_url(self.tracking.uri),
            published,
        )
        print(self.summary(study, runs, runs.parent_run_id))
        if published is not None:
            print(published.line())
        if best_run_id:
            print(console.run_info(runs.client, best_run_id))
        return results

    def publish(self, best: optuna.trial.FrozenTrial, best_run_id: str, runs: SweepRuns) -> None:
        """The app's hook, with the best run and its composed config (e.g. a test-set score)."""
        cfg = self.plan.compose(
            self.plan.fixed + [as_override(k, v) for k, v in best.params.items()]
        )
        try:
            hook = instantiate(self.plan.publish, _partial_=True)
            hook(run_id=best_run_id, config=cfg)
        except Exception as err:
            if self.tracking.away(err):
                raise  # the end waits for the server, then publishes (see finish)
            # the sweep's results stand without a published model; say why there is none
            log.error("the publish hook failed: %s: %s", type(err).__name__, err)
            runs.client.set_tag(
                runs.parent_run_id, keys.PUBLISH_ERROR, f"{type(err).__name__}: {err}"[:5000]
            )
        finally:
            if lifecycle.is_running(runs.client, best_run_id):  # a hook that reopened the run
                lifecycle.end_run(runs.client, best_run_id, "FINISHED", {})

    def register(
        self,
        study: optuna.Study,
        best: optuna.trial.FrozenTrial,
        best_run_id: str,
        runs: SweepRuns,
        claim: EndClaim,
    ) -> Published | None:
        reg, objectives, client = self.plan.registry, self.plan.objectives, runs.client
        # ranked on the registry's metric, else on the objective the champion is chosen by
        metric = reg.metric or (objectives.metric if objectives.by == KNEE else objectives.by)
        direction = reg.direction or objectives.direction_of(metric) or objectives.directions[0]
        maximize = str(direction).lower() == "maximize"
        value = client.get_run(best_run_id).data.metrics.get(metric)
        if value is not None and metric not in objectives.names:
            lifecycle.log_batch(
                client, runs.parent_run_id, metrics=lifecycle.as_metrics({metric: value})
            )
        # found while the server was away, "no model" would be the relay's answer, not the truth
        self.tracking.require_server("finding the best run's model")
        uri = registry.logged_model_uri(client, best_run_id, reg.model)
        if uri is None:
            note = f"the best run {best_run_id} holds no MLflow model named {reg.model!r}"
            log.error("%s: nothing registered", note)
            client.set_tag(runs.parent_run_id, keys.PUBLISH_ERROR, note)
            return None
        version = claim.done_step("registered") or registry.register(
            client,
            reg.name,
            uri,
            best_run_id,
            end_key=f"{runs.parent_run_id}:{claim.key}",
            tags={
                keys.STUDY_NAME: study.study_name,
                keys.TRIAL_NUMBER: best.number,
                "parent_run_id": runs.parent_run_id,
                "run_id": best_run_id,
                **{k: f"{v:.6f}" for k, v in objectives.of(best).items()},
                **({metric: f"{value:.6f}"} if value is not None else {}),
            },
        )
        claim.record("registered", version)
        crash_point("end-registered")
        published = registry.move_alias(
            client, reg.name, reg.alias, version, metric, value, maximize
        )
        claim.record("aliased", published.moved)
        crash_point("end-aliased")
        return published

    def mark_front(self, study: optuna.Study, runs: SweepRuns) -> None:
        """Tag the Pareto front's runs (only they), and put the front on the parent as a table."""
        objectives = self.plan.objectives
        front = objectives.front(study)
        runs.mark_front({runs.run_id(t) for t in front} - {None})
        rows = [
            {"trial": t.number, **t.params, **objectives.of(t), "run_id": runs.run_id(t)}
            for t in sorted(front, key=lambda t: t.values[0])
        ]
        if rows:
            lifecycle.log_table(runs.client, runs.parent_run_id, rows, "pareto_front.json")
        crash_point("end-front-tagged")

    def summary(self, study: optuna.Study, runs: SweepRuns, parent_run_id: str | None) -> str:
        objectives = self.plan.objectives
        done = console.counts(study.get_trials(deepcopy=False))
        best = objectives.best(study)
        lines = [
            "",
            console.table(study, objectives),
            "",
            f"{done['complete']} complete, {done['pruned']} pruned, {done['failed']} failed"
            + (f" ({done['retried']} of them tried again)" if done["retried"] else ""),
        ]
        front = objectives.front(study) if objectives.multi else []
        if front:
            lines.append(
                f"Pareto front: trial{'s' if len(front) > 1 else ''} "
                f"{', '.join(str(t.number) for t in front)} (tagged pareto_front=true)"
            )
        what = f"champion ({objectives.rule()})" if objectives.multi else "best"
        if best is not None:
            params = ", ".join(f"{k}={console.short(v)}" for k, v in best.params.items())
            lines.append(
                f"{what}: trial {best.number} {console.show(objectives, best)} ({params}), "
                f"run {runs.run_id(best)}"
            )
        elif front:
            lines.append(
                f"no run of the Pareto front meets {' and '.join(map(str, objectives.where))}: "
                f"nothing is tagged best_run, published or registered"
            )
        else:
            lines.append("no trial completed, so there is no best run")
        if parent_run_id:
            lines.append(f"parent run {parent_run_id}; results in {self.plan.sweep_dir}")
        uri = mask_url(self.tracking.uri)
        if uri.startswith(("http://", "https://")):
            lines.append(f"see the runs: open {uri}")
        else:
            lines.append(f"see the runs: mlflow ui --backend-store-uri {uri}")
        return "\n".join(lines)
