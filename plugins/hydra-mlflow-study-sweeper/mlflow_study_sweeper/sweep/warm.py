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
from mlflow_study_sweeper.search.grammar import describe
from mlflow_study_sweeper.search.space_function import ABSENT, SearchFunction
from mlflow_study_sweeper.storage import optuna_internals
from mlflow_study_sweeper.tracking import lifecycle

RUN_URI = "runs:/"  # warm_start_from=runs:/<parent run id>: an earlier sweep, from MLflow


def check_enqueue(
    enqueue: list[Any], space: dict[str, Any], search: SearchFunction | None = None
) -> list[dict[str, Any]]:
    """hydra.sweeper.enqueue as a list of {key: value}, each naming exactly the searched keys;
    with a search-space function, every key of the grammar and any of the function's params
    that it suggests for that set (one it omits is drawn by the sampler)."""
    out = []
    for i, params in enumerate(enqueue or []):
        if not isinstance(params, dict):
            raise SweepConfigError(
                f"hydra.sweeper.enqueue[{i}]={params!r} is not a mapping of search keys to values"
            )
        missing, unknown = set(space) - set(params), set(params) - set(space)
        if search is not None:
            unknown = set()  # the function's, judged below once the grammar's are
        if missing or unknown:
            raise SweepConfigError(
                f"hydra.sweeper.enqueue[{i}] must set exactly the searched keys "
                f"({', '.join(sorted(space))}); missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}"
            )
        for key, value in params.items():
            if key in space and not optuna_internals.contains(space[key], value):
                raise SweepConfigError(
                    f"hydra.sweeper.enqueue[{i}].{key}={value!r} is outside the search space "
                    f"{space[key]}"
                )
        if search is not None:
            check_enqueued_by_function(i, params, search)
        out.append(dict(params))
    return out


def check_enqueued_by_function(i: int, params: dict[str, Any], search: SearchFunction) -> None:
    """An enqueued set's values for the function's params: each one a param the function
    suggests for that set, inside its distribution."""
    fit = search.fit(lambda name, dist: params.get(name, ABSENT), partial=True)
    where = f"hydra.sweeper.enqueue[{i}]"
    if fit.why == "outside the search space":
        dist = fit.distributions[fit.name]
        raise SweepConfigError(
            f"{where}.{fit.name}={params[fit.name]!r} is outside the search space {dist} "
            f"({describe(dist)}, as {search.path} suggests it for this set)"
        )
    if fit.why == "refused by the search-space function":
        raise SweepConfigError(f"{where}: {fit.detail}")
    unasked = sorted(set(params) - set(fit.params))
    if unasked:
        name = unasked[0]
        also = [n for n in fit.params if keys.config_key(n) == keys.config_key(name)]
        hint = f" (it suggests {also[0]!r})" if also else ""
        raise SweepConfigError(
            f"{where}.{name}: no param of that name is searched for this set, neither in "
            f"hydra.sweeper.params nor by {search.path}{hint}; a conditional param may be "
            f"named only where its condition holds"
        )


def seed_study(
    study: optuna.Study,
    space: dict[str, Any],
    enqueue: list[dict[str, Any]],
    warm_start_from: str | None,
    client: Any = None,
    objectives: Any = None,
    search: SearchFunction | None = None,
) -> list[str]:
    """Enqueue and import once; return what to tell the user."""
    if not (enqueue or warm_start_from):
        return []
    if optuna_internals.study_system_attrs(study).get(keys.SEEDED):
        return []
    notes = []
    if warm_start_from and str(warm_start_from).startswith(RUN_URI):
        notes.append(import_runs(study, space, str(warm_start_from), client, objectives, search))
    elif warm_start_from:
        notes.append(import_trials(study, space, warm_start_from, search))
    for params in enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    if enqueue:
        notes.append(f"{len(enqueue)} enqueued parameter set(s) run first")
    optuna_internals.set_study_system_attr(study, keys.SEEDED, True)
    return notes


def import_trials(
    study: optuna.Study,
    space: dict[str, Any],
    source_name: str,
    search: SearchFunction | None = None,
) -> str:
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
            continue
        params, distributions = trial.params, space
        if search is not None:  # its params as the grammar and the function ask for them now
            fit = search.fit(lambda name, dist, had=trial.params: had.get(name, ABSENT))
            why = fit.why or ("other parameters" if set(fit.params) != set(trial.params) else None)
            params, distributions = fit.params, fit.distributions
        elif set(trial.params) != set(space):
            why = "other parameters"
        elif not all(optuna_internals.contains(space[k], v) for k, v in trial.params.items()):
            why = "outside the search space"
        else:
            why = None
        if why is not None:
            skipped[why] += 1
        else:
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=distributions,
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


def import_runs(
    study: optuna.Study,
    space: dict[str, Any],
    uri: str,
    client,
    objectives,
    search: SearchFunction | None = None,
) -> str:
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
        logged = run.data.params
        params = {
            key: from_param(dist, logged.get(keys.config_key(key))) for key, dist in space.items()
        }
        distributions = space
        if run.data.tags.get(keys.STATE) != "COMPLETE":
            skipped["not complete"] += 1
            continue
        if any(v is None or not math.isfinite(v) for v in values):
            skipped[f"without {', '.join(objectives.names)}"] += 1
            continue
        if search is not None:  # read param by param as the grammar and the function ask

            def lookup(name: str, dist: Any, logged: dict = logged) -> Any:
                return from_param(dist, logged.get(keys.config_key(name)))

            fit = search.fit(lookup)
            why = fit.why
            params, distributions = fit.params, fit.distributions
        elif any(v is ABSENT for v in params.values()):
            why = "other parameters"
        elif not all(optuna_internals.contains(space[k], v) for k, v in params.items()):
            why = "outside the search space"
        else:
            why = None
        if why is not None:
            skipped[why] += 1
        else:
            number = run.data.tags.get(keys.TRIAL_NUMBER, "?")
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=distributions,
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
    """A logged MLflow param (a string) as a value of `dist`; ABSENT when the run has none or
    it is not one (a choice of null is logged "None": it is None, a value like the others)."""
    if text is None:
        return ABSENT
    try:
        if isinstance(dist, optuna.distributions.FloatDistribution):
            return float(text)
        if isinstance(dist, optuna.distributions.IntDistribution):
            return int(float(text)) if float(text).is_integer() else ABSENT
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            return next((c for c in dist.choices if lifecycle.param_value(c) == text), ABSENT)
    except ValueError:
        return ABSENT
    return ABSENT
