"""Warm starts: parameter sets tried first, and the finished trials of an earlier study.

Both happen once per study (a system attribute remembers it), so a resumed sweep does not
enqueue or import twice. Imported trials are prior knowledge for the sampler: not trained,
not counted in n_trials, never the best run of this sweep.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import optuna
from optuna.trial import TrialState

from mlflow_study_sweeper import keys
from mlflow_study_sweeper.errors import SweepConfigError, mask_url
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.tracking import lifecycle

RUN_URI = "runs:/"  # warm_start_from=runs:/<parent run id>: an earlier sweep, from MLflow


def check_enqueue(enqueue: list[Any], space: dict[str, Any]) -> list[dict[str, Any]]:
    """hydra.sweeper.enqueue as a list of {key: value}, each naming exactly the searched keys."""
    out = []
    for i, params in enumerate(enqueue or []):
        if not isinstance(params, dict):
            raise SweepConfigError(
                f"hydra.sweeper.enqueue[{i}]={params!r} is not a mapping of search keys to values"
            )
        missing, unknown = set(space) - set(params), set(params) - set(space)
        if missing or unknown:
            raise SweepConfigError(
                f"hydra.sweeper.enqueue[{i}] must set exactly the searched keys "
                f"({', '.join(sorted(space))}); missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        for key, value in params.items():
            if not optuna_internals.contains(space[key], value):
                raise SweepConfigError(
                    f"hydra.sweeper.enqueue[{i}].{key}={value!r} is outside the search space "
                    f"{space[key]}"
                )
        out.append(dict(params))
    return out


def seed_study(
    study: optuna.Study,
    space: dict[str, Any],
    enqueue: list[dict[str, Any]],
    warm_start_from: str | None,
    client: Any = None,
    objectives: Any = None,
) -> list[str]:
    """Enqueue and import once; return what to tell the user."""
    if not (enqueue or warm_start_from):
        return []
    if optuna_internals.study_system_attrs(study).get(keys.SEEDED):
        return []
    notes = []
    if warm_start_from and str(warm_start_from).startswith(RUN_URI):
        notes.append(import_runs(study, space, str(warm_start_from), client, objectives))
    elif warm_start_from:
        notes.append(import_trials(study, space, warm_start_from))
    for params in enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    if enqueue:
        notes.append(f"{len(enqueue)} enqueued parameter set(s) run first")
    optuna_internals.set_study_system_attr(study, keys.SEEDED, True)
    return notes


def import_trials(study: optuna.Study, space: dict[str, Any], source_name: str) -> str:
    try:
        source = optuna.load_study(study_name=source_name, storage=optuna_internals.storage(study))
    except KeyError:
        raise SweepConfigError(
            f"hydra.sweeper.warm_start_from={source_name!r}: no such study in this storage "
            f"(see optuna.get_all_study_names)"
        ) from None
    if source.directions != study.directions:
        was, now = (" and ".join(d.name.lower() for d in s.directions) for s in (source, study))
        raise SweepConfigError(
            f"hydra.sweeper.warm_start_from={source_name!r} was to {was}, this study is to "
            f"{now}: their values cannot be compared"
        )
    skipped: Counter[str] = Counter()
    imported = 0
    for trial in source.get_trials(deepcopy=False):
        if (
            trial.state != TrialState.COMPLETE
            or trial.values is None
            or not all(math.isfinite(v) for v in trial.values)
        ):
            skipped["not complete"] += 1
        elif set(trial.params) != set(space):
            skipped["other parameters"] += 1
        elif not all(optuna_internals.contains(space[k], v) for k, v in trial.params.items()):
            skipped["outside the search space"] += 1
        else:
            study.add_trial(
                optuna.trial.create_trial(
                    params=trial.params,
                    distributions=space,
                    values=trial.values,
                    user_attrs={
                        keys.IMPORTED: f"{source_name}#{trial.number}",
                        keys.IMPORTED_RUN: keys.run_id(trial) or "",
                    },
                )
            )
            imported += 1
    return summary(imported, skipped, f"study {source_name!r}")


def summary(imported: int, skipped: Counter[str], source: str) -> str:
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    return f"warm start: imported {imported} trial(s) of {source}" + (
        f"; skipped {why}" if why else ""
    )


def import_runs(study: optuna.Study, space: dict[str, Any], uri: str, client, objectives) -> str:
    """The complete trials of an earlier sweep, read from its MLflow runs (runs:/<parent id>).

    For a sweep whose Optuna storage is gone or elsewhere: each child run's params give the
    parameters, its metrics the objectives' values.
    """
    from mlflow.exceptions import MlflowException

    parent_id = uri.removeprefix(RUN_URI).strip("/")
    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise SweepConfigError(
            f"hydra.sweeper.warm_start_from={uri!r}: no such run in the MLflow store "
            f"{mask_url(client.tracking_uri)}; give the parent run of an earlier sweep (its id "
            f"is parent_run_id in optimization_results.yaml) or a study name"
        ) from None
    if parent.data.tags.get(keys.ROLE) != keys.PARENT_ROLE:
        raise SweepConfigError(
            f"hydra.sweeper.warm_start_from={uri!r} is not the parent run of a sweep (tag "
            f"sweep.role=sweep): give the run named sweep-<study name>"
        )
    was = parent.data.params.get(keys.SWEEPER_PARAM.format(name="direction"), "").split(",")
    if was != list(objectives.directions):
        raise SweepConfigError(
            f"hydra.sweeper.warm_start_from={uri!r} was to {' and '.join(was)}, this study is "
            f"to {' and '.join(objectives.directions)}: their values cannot be compared"
        )
    skipped: Counter[str] = Counter()
    imported = 0
    runs = lifecycle.SweepRuns(client, parent.info.experiment_id, "")
    runs.parent_run_id = parent_id
    for run in runs.children():
        values = [run.data.metrics.get(name) for name in objectives.names]
        params = {key: from_param(dist, run.data.params.get(key)) for key, dist in space.items()}
        if run.data.tags.get(keys.STATE) != "COMPLETE":
            skipped["not complete"] += 1
        elif any(v is None or not math.isfinite(v) for v in values):
            skipped[f"without {', '.join(objectives.names)}"] += 1
        elif any(v is None for v in params.values()):
            skipped["other parameters"] += 1
        elif not all(optuna_internals.contains(space[k], v) for k, v in params.items()):
            skipped["outside the search space"] += 1
        else:
            number = run.data.tags.get(keys.TRIAL_NUMBER, "?")
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=space,
                    values=values,
                    user_attrs={
                        keys.IMPORTED: f"{uri}#{number}",
                        keys.IMPORTED_RUN: run.info.run_id,
                    },
                )
            )
            imported += 1
    return summary(imported, skipped, f"the sweep of run {parent_id}")


def from_param(dist: optuna.distributions.BaseDistribution, text: str | None) -> Any:
    """A logged MLflow param (a string) as a value of `dist`, or None."""
    if text is None:
        return None
    try:
        if isinstance(dist, optuna.distributions.FloatDistribution):
            return float(text)
        if isinstance(dist, optuna.distributions.IntDistribution):
            return int(float(text)) if float(text).is_integer() else None
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return next((c for c in dist.choices if lifecycle.param_value(c) == text), None)
    except ValueError:
        return None
    return None
