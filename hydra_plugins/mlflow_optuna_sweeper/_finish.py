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
from hydra_plugins.mlflow_optuna_sweeper._checks import Plan, mask_url
from hydra_plugins.mlflow_optuna_sweeper._claim import EndClaim, Published
from hydra_plugins.mlflow_optuna_sweeper._faults import crash_point
from hydra_plugins.mlflow_optuna_sweeper._loop import settle_runs

log = logging.getLogger(__name__)


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
        best = _console.best_trial(study)
        best_run_id = best.user_attrs.get("mlflow_run_id") if best else None
        if best_run_id and _runs.run_or_none(client, best_run_id) is None:
            log.warning("the best trial's run %s was deleted: nothing to tag", best_run_id)
            best_run_id = None
        published = None
        if best is not None and best_run_id:
            for note in _runs.mark_best(
                client, parent, best_run_id, best.number, best.params, self.s.metric, best.value
            ):
                log.warning(note)
            crash_point("end-tagged")
            if self.s.publish and not claim.done_step("published"):
                self.publish(best, best_run_id, parent, plan, client)
                claim.record("published")
                crash_point("end-published")
            if self.s.registry.name and self.s.registry.model:
                published = self.register(study, best, best_run_id, parent, client, claim)
        with tempfile.TemporaryDirectory() as tmp:
            if _report.write_plots(study, Path(tmp)):
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
            self.s.metric,
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

    def register(self, study, best, best_run_id: str, parent: str, client, claim) -> Published:
        reg = self.s.registry
        metric = reg.metric or self.s.metric
        maximize = str(reg.direction or study.direction.name).lower() == "maximize"
        value = client.get_run(best_run_id).data.metrics.get(metric)
        if value is not None and metric != self.s.metric:
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
                self.s.metric: f"{best.value:.6f}",
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

    def summary(self, study, plan: Plan, parent_run_id: str | None) -> str:
        metric = self.s.metric
        done = _console.counts(study)
        best = _console.best_trial(study)
        lines = [
            "",
            _console.table(study, metric),
            "",
            f"{done['complete']} complete, {done['pruned']} pruned, {done['failed']} failed",
        ]
        if best is not None:
            params = ", ".join(f"{k}={_console.short(v)}" for k, v in best.params.items())
            lines.append(
                f"best: trial {best.number} {metric}={best.value:.4f} ({params}), "
                f"run {best.user_attrs.get('mlflow_run_id')}"
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
