"""The end of a sweep: tag the best run, publish and register its model, report, close.

Exactly once across workers, and redone when it was cut short: see EndClaim (_claim.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from hydra_plugins.mlflow_optuna_sweeper import _console, _registry, _report, _runs, _space
from hydra_plugins.mlflow_optuna_sweeper._checks import Plan
from hydra_plugins.mlflow_optuna_sweeper._claim import EndClaim, Published
from hydra_plugins.mlflow_optuna_sweeper._errors import mask_url
from hydra_plugins.mlflow_optuna_sweeper._faults import crash_point
from hydra_plugins.mlflow_optuna_sweeper._loop import settle_runs
from hydra_plugins.mlflow_optuna_sweeper._objectives import KNEE, Objectives

log = logging.getLogger(__name__)
PARETO_TAG = "pareto_front"


class SweepEnd:
    def __init__(self, settings, compose, sweep_dir: str) -> None:
        self.s = settings
        self.compose = compose
        self.sweep_dir = sweep_dir

    def finish(self, study, client, parent: str, plan: Plan, resumed_complete: bool = False) -> Any:
        counts = _console.counts(study)
        claim = EndClaim(study, counts["complete"] + counts["pruned"], self.s.heartbeat_grace)
        if not claim.acquire():
            current = claim.current() or {}
            if current.get("state") == "done":
                if _runs.is_running(client, parent):  # reopened by this command: close again
                    _runs.end_run(client, parent, "FINISHED", {})
                if not resumed_complete:
                    print(f"The sweep is finished; {claim.describe_holder(current)} ended it.")
                    return []
                print(self.summary(study, plan, parent_run_id=None))
                if resumed_complete:
                    print(
                        f"Study {study.study_name!r} already has "
                        f"{counts['complete'] + counts['pruned']} finished trials "
                        f"(n_trials={self.s.n_trials}). To continue it, raise "
                        f"hydra.sweeper.n_trials; to start over, set a new "
                        f"hydra.sweeper.study_name."
                    )
                return []
            print(f"{claim.describe_holder(current)} is ending the sweep now.")
            return []
        if claim.value.get("taken_over"):
            log.warning("the end of the sweep was cut short earlier: finishing it now")
        try:
            result = self.end_steps(study, client, parent, plan, claim)
        except BaseException as err:
            claim.release()
            status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
            _runs.end_run(client, parent, status, {"sweep.state": f"{status.lower()} at the end"})
            raise
        claim.finish()
        return result

    def end_steps(self, study, client, parent: str, plan: Plan, claim: EndClaim) -> Any:
        """Tag the best run, publish and register its model, report, end the parent run."""
        settle_runs(client, study)
        objectives = plan.objectives
        if objectives.multi:
            self.mark_front(study, client, parent, objectives)
        best = objectives.best(study)
        best_run_id = best.user_attrs.get("mlflow_run_id") if best else None
        if best_run_id and _runs.run_or_none(client, best_run_id) is None:
            log.warning("the best trial's run %s was deleted: nothing to tag", best_run_id)
            best_run_id = None
        published = None
        if best is None:
            _runs.clear_best(client, parent)  # no champion meets the constraints (any more)
        if best is not None and best_run_id:
            for note in _runs.mark_best(
                client, parent, best_run_id, best.number, best.params, objectives.of(best)
            ):
                log.warning(note)
            crash_point("end-tagged")
            if self.s.publish and not claim.done_step("published"):
                self.publish(best, best_run_id, parent, plan, client)
                claim.record("published")
                crash_point("end-published")
            if self.s.registry.name and self.s.registry.model:
                published = self.register(
                    study, objectives, best, best_run_id, parent, client, claim
                )
        with tempfile.TemporaryDirectory() as tmp:
            if _report.write_plots(study, Path(tmp), objectives):
                client.log_artifacts(parent, tmp, "report")
        crash_point("end-reported")
        done = _console.counts(study)
        tags = {
            "sweep.state": "finished",
            "trials.complete": done["complete"],
            "trials.pruned": done["pruned"],
            "trials.failed": done["failed"],
        }
        if published is not None:
            tags |= {"model_version": published.version, published.alias: str(published.moved)}
        _runs.end_run(client, parent, "FINISHED", tags)
        crash_point("end-parent-closed")
        results = _console.write_results(
            Path(self.sweep_dir) / "optimization_results.yaml",
            study,
            objectives,
            best_run_id,
            parent,
            mask_url(plan.tracking_uri),
            published,
        )
        print(self.summary(study, plan, parent))
        if published is not None:
            print(published.line())
        if best_run_id:
            print(_console.run_info(client, best_run_id))
        return results

    def publish(self, best, best_run_id: str, parent: str, plan: Plan, client) -> None:
        """The app's hook, with the best run and its composed config (e.g. a test-set score)."""
        cfg = self.compose(plan.fixed + [_space.as_override(k, v) for k, v in best.params.items()])
        try:
            hook = instantiate(self.s.publish, _partial_=True)
            hook(run_id=best_run_id, config=cfg)
        except Exception as err:
            # the sweep's results stand without a published model; say why there is none
            log.error("the publish hook failed: %s: %s", type(err).__name__, err)
            client.set_tag(parent, "publish_error", f"{type(err).__name__}: {err}"[:5000])
        finally:
            if _runs.is_running(client, best_run_id):  # a hook that reopened the run
                _runs.end_run(client, best_run_id, "FINISHED", {})

    def register(
        self, study, objectives: Objectives, best, best_run_id: str, parent: str, client, claim
    ) -> Published:
        reg = self.s.registry
        # ranked on the registry's metric, else on the objective the champion is chosen by
        metric = reg.metric or (objectives.metric if objectives.by == KNEE else objectives.by)
        direction = reg.direction or objectives.direction_of(metric) or objectives.directions[0]
        maximize = str(direction).lower() == "maximize"
        value = client.get_run(best_run_id).data.metrics.get(metric)
        if value is not None and metric not in objectives.names:
            _runs.log_metrics(client, parent, {metric: value}, step=0)
        uri = _registry.logged_model_uri(client, best_run_id, reg.model)
        if uri is None:
            note = f"the best run {best_run_id} holds no MLflow model named {reg.model!r}"
            log.error("%s: nothing registered", note)
            client.set_tag(parent, "publish_error", note)
            return None
        version = claim.done_step("registered") or _registry.register(
            client,
            reg.name,
            uri,
            best_run_id,
            end_key=f"{parent}:{claim.key}",
            tags={
                "optuna.study_name": study.study_name,
                "optuna.trial_number": best.number,
                "parent_run_id": parent,
                "run_id": best_run_id,
                **{k: f"{v:.6f}" for k, v in objectives.of(best).items()},
                **({metric: f"{value:.6f}"} if value is not None else {}),
            },
        )
        claim.record("registered", version)
        crash_point("end-registered")
        published = _registry.move_alias(
            client, reg.name, reg.alias, version, metric, value, maximize
        )
        claim.record("aliased", published.moved)
        crash_point("end-aliased")
        return published

    def mark_front(self, study, client, parent: str, objectives: Objectives) -> None:
        """Tag the Pareto front's runs (only they), and put the front on the parent as a table."""
        front = objectives.front(study)
        on_front = {t.user_attrs.get("mlflow_run_id") for t in front} - {None}
        for run in _runs.children(client, parent, "tags.pareto_front = 'true'"):
            if run.info.run_id not in on_front:  # a continued study moved the front
                client.delete_tag(run.info.run_id, PARETO_TAG)
        for run_id in on_front:
            if _runs.run_or_none(client, run_id) is not None:
                client.set_tag(run_id, PARETO_TAG, "true")
        rows = [
            {
                "trial": t.number,
                **t.params,
                **objectives.of(t),
                "run_id": t.user_attrs.get("mlflow_run_id"),
            }
            for t in sorted(front, key=lambda t: t.values[0])
        ]
        if rows:
            _runs.log_table(client, parent, rows, "pareto_front.json")
        crash_point("end-front-tagged")

    def summary(self, study, plan: Plan, parent_run_id: str | None) -> str:
        objectives = plan.objectives
        done = _console.counts(study)
        best = objectives.best(study)
        lines = [
            "",
            _console.table(study, objectives),
            "",
            f"{done['complete']} complete, {done['pruned']} pruned, {done['failed']} failed",
        ]
        front = objectives.front(study) if objectives.multi else []
        if front:
            lines.append(
                f"Pareto front: trial{'s' if len(front) > 1 else ''} "
                f"{', '.join(str(t.number) for t in front)} (tagged pareto_front=true)"
            )
        what = f"champion ({objectives.rule()})" if objectives.multi else "best"
        if best is not None:
            params = ", ".join(f"{k}={_console.short(v)}" for k, v in best.params.items())
            lines.append(
                f"{what}: trial {best.number} {objectives.show(best)} ({params}), "
                f"run {best.user_attrs.get('mlflow_run_id')}"
            )
        elif front:
            lines.append(
                f"no run of the Pareto front meets {' and '.join(map(str, objectives.where))}: "
                f"nothing is tagged best_run, published or registered"
            )
        else:
            lines.append("no trial completed, so there is no best run")
        if parent_run_id:
            lines.append(f"parent run {parent_run_id}; results in {self.sweep_dir}")
        uri = mask_url(plan.tracking_uri)
        if uri.startswith(("http://", "https://")):
            lines.append(f"see the runs: open {uri}")
        else:
            lines.append(f"see the runs: mlflow ui --backend-store-uri {uri}")
        return "\n".join(lines)
