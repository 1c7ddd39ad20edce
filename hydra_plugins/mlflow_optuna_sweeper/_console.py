"""What a person reads during and after a sweep: progress lines, the table, the results file."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

IMPORTED = "imported_from"  # a trial of an earlier study, given to the sampler (see _warm.py)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def progress_line(
    trial: optuna.trial.FrozenTrial,
    finished: int,
    n_trials: int,
    metric: str,
    seconds: float,
    seconds_left: float | None,
) -> str:
    params = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in trial.params.items())
    value = f"{metric}={trial.value:.4f}" if trial.value is not None else f"{metric}=-"
    if trial.state == TrialState.PRUNED and trial.intermediate_values:
        epoch = max(trial.intermediate_values)
        value = f"{metric}={trial.intermediate_values[epoch]:.4f} (epoch {epoch})"
    left = f", ~{duration(seconds_left)} left" if seconds_left is not None else ""
    reason = trial.user_attrs.get("fail_reason")
    why = f" ({reason})" if trial.state == TrialState.FAIL and reason else ""
    return (
        f"[trial {trial.number}] {finished}/{n_trials} finished | {params} | {value} | "
        f"{trial.state.name}{why} | {duration(seconds)}{left}"
    )


class EpochProgress:
    """One line per reported epoch: rewritten in place on a terminal, appended otherwise."""

    def __init__(self, metric: str, stream=None) -> None:
        self.metric = metric
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.sweep_left: float | None = None  # set by the loop from the trials so far
        self.started = time.monotonic()

    def __call__(self, number: int, value: float, step: int, total: int | None, prune: bool):
        of = f"/{total}" if total else ""
        left = f" | sweep ~{duration(self.sweep_left)} left" if self.sweep_left else ""
        line = (
            f"[trial {number}] epoch {step + 1}{of} | {self.metric}={value:.4f}"
            f"{' | pruned' if prune else ''}{left}"
        )
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


def counts(study: optuna.Study) -> dict[str, int]:
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "imported": 0}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "running",
    }
    for trial in study.get_trials(deepcopy=False):
        out["imported" if IMPORTED in trial.user_attrs else names[trial.state]] += 1
    return out


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial with a finite value (pruned and failed ones never win)."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value) and IMPORTED not in t.user_attrs
    ]
    if not complete:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(complete, key=lambda t: t.value)


def table(study: optuna.Study, metric: str) -> str:
    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    best = best_trial(study)
    header = ["#", *[k.split(".")[-1] for k in keys], metric, "state", "seconds", ""]
    rows = [header]
    for t in trials:
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        seconds = trial_seconds(t)
        rows.append(
            [
                str(t.number),
                *[short(t.params[k]) if k in t.params else "-" for k in keys],
                f"{value:.4f}" if value is not None else "-",
                "IMPORTED" if IMPORTED in t.user_attrs else t.state.name,
                f"{seconds:.1f}" if seconds is not None else "-",
                "<- best" if best is not None and t.number == best.number else "",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def write_results(
    path: Path,
    study: optuna.Study,
    metric: str,
    best_run_id: str | None,
    parent_run_id: str | None,
    tracking_uri: str,
    published: Any = None,
) -> dict[str, Any]:
    best = best_trial(study)
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "direction": study.direction.name.lower(),
        "metric": metric,
        "trials": counts(study),
        "best_params": dict(best.params) if best else None,
        "best_value": float(best.value) if best else None,
        "best_trial": best.number if best else None,
        "best_run_id": best_run_id,
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri,
    }
    if published is not None:
        results |= {
            "model_uri": published.model_uri,
            "model_version": published.version,
            published.metric: published.value,
            published.alias: published.moved,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(results), path)
    return results


def run_info(client, run_id: str) -> str:
    """The best run as the MLflow autolog example printed it: id, artifacts, params, ..."""
    run = client.get_run(run_id)
    artifacts = [f.path for f in client.list_artifacts(run_id)]
    artifacts += [
        f"{m.model_uri} ({m.name})"
        for m in client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
        )
    ]
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return "\n".join(
        [
            "best run:",
            f"run_id: {run_id}",
            f"artifacts: {artifacts}",
            f"params: {dict(sorted(run.data.params.items()))}",
            f"metrics: {dict(sorted(run.data.metrics.items()))}",
            f"tags: {dict(sorted(tags.items()))}",
        ]
    )
