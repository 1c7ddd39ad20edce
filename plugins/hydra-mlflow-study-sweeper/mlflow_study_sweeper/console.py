"""What a person reads during and after a sweep: progress lines, the table, the results file."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.errors import duration
from mlflow_study_sweeper.search.objectives import Objectives


def short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def short_names(names: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest ending that no other key of `names` shares: `lr` for
    model.lr alone, `model.lr` and `optimizer.lr` when both are searched (without a `+`)."""
    keys_ = {name: keys.config_key(name) for name in names}  # `+w` is the config's w
    out = {}
    for name, key in keys_.items():
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            ending = ".".join(parts[-n:])
            others = (o for o in keys_.values() if o != key)
            if not any(o == ending or o.endswith("." + ending) for o in others):
                break
        out[name] = ending
    return out


def params_text(params: dict[str, Any]) -> str:
    names = short_names(list(params))
    return " ".join(f"{names[k]}={short(v)}" for k, v in params.items())


def number(value: float) -> str:
    """An objective's value: 0.9812, or 87486 for a count (a parameter count, a latency in us)."""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.0f}"


def show(objectives: Objectives, trial: FrozenTrial) -> str:
    return " ".join(f"{k}={number(v)}" for k, v in objectives.of(trial).items())


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return None


def progress_line(
    trial: optuna.trial.FrozenTrial,
    finished: int,
    n_trials: int,
    objectives: Objectives,
    seconds: float,
    seconds_left: float | None,
) -> str:
    params = params_text(trial.params)
    if trial.values is not None:
        value = " ".join(f"{k}={number(v)}" for k, v in objectives.of(trial).items())
    else:
        value = f"{objectives.metric}=-"
    epochs = keys.curve(trial)
    if trial.state == TrialState.PRUNED and epochs:
        epoch = max(epochs)
        value = f"{objectives.metric}={epochs[epoch]:.4f} (epoch {epoch})"
    left = f", ~{duration(seconds_left)} left" if seconds_left is not None else ""
    reason = trial.user_attrs.get(keys.FAIL_REASON)
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


def counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """Trials by state; an enqueued (WAITING) trial counts as running, an imported one apart;
    `retried`: the failed ones that were tried again (counted among `failed` too)."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "imported": 0, "retried": 0}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "running",
    }
    for trial in trials:
        out["imported" if keys.is_imported(trial) else names[trial.state]] += 1
        if trial.state == TrialState.FAIL and keys.failure(trial) == keys.TRANSIENT:
            out["retried"] += 1
    return out


def finished(trials: list[FrozenTrial]) -> int:
    done = counts(trials)
    return done["complete"] + done["pruned"]


def state_of(trial: FrozenTrial) -> str:
    """FAIL, or FAIL (retried) for a failure that was tried again."""
    if trial.state == TrialState.FAIL and keys.failure(trial) == keys.TRANSIENT:
        return "FAIL (retried)"
    return trial.state.name


def table(study: optuna.Study, objectives: Objectives) -> str:
    """Every trial: its parameters, objectives, state and time; the best (and the front) marked."""
    trials = study.get_trials(deepcopy=False)
    param_keys = sorted({k for t in trials for k in t.params})
    best = objectives.best(study)
    front = {t.number for t in objectives.front(study)} if objectives.multi else set()
    header = [
        "#",
        *short_names(param_keys).values(),
        *objectives.names,
        "state",
        "seconds",
        "",
    ]
    rows = [header]
    for t in trials:
        values = list(t.values) if t.values is not None else [None] * len(objectives.names)
        epochs = keys.curve(t)
        if t.values is None and epochs:  # a pruned trial: its last epoch
            values[0] = epochs[max(epochs)]
        seconds = trial_seconds(t)
        mark = "<- best" if best is not None and t.number == best.number else ""
        if t.number in front:
            mark = "front" + (", best" if mark else "")
        rows.append(
            [
                str(t.number),
                *[short(t.params[k]) if k in t.params else "-" for k in param_keys],
                *[number(v) if v is not None else "-" for v in values],
                "IMPORTED" if keys.is_imported(t) else state_of(t),
                f"{seconds:.1f}" if seconds is not None else "-",
                mark,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def write_results(
    path: Path,
    study: optuna.Study,
    objectives: Objectives,
    best_run_id: str | None,
    parent_run_id: str | None,
    tracking_uri: str,
    published: Any = None,
) -> dict[str, Any]:
    best = objectives.best(study)
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "direction": objectives.directions[0],
        "metric": objectives.metric,
        "trials": counts(study.get_trials(deepcopy=False)),
        "best_params": dict(best.params) if best else None,
        "best_value": float(best.values[0]) if best else None,
        "best_trial": best.number if best else None,
        "best_run_id": best_run_id,
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking_uri,
    }
    if objectives.multi:  # the lists, and the Pareto front by trial number
        results |= {
            "direction": list(objectives.directions),
            "metric": list(objectives.names),
            "best_values": objectives.of(best) if best else None,
            "champion_rule": objectives.rule(),
            "pareto_front": [t.number for t in objectives.front(study)],
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
