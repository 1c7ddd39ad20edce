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

from hydra_plugins.mlflow_optuna_sweeper._errors import SweepConfigError

SEEDED_ATTR = "mlflow_optuna.seeded"
IMPORTED = "imported_from"  # a user attribute: "<study>#<trial number>"


def is_imported(trial: optuna.trial.FrozenTrial) -> bool:
    return IMPORTED in trial.user_attrs


def fits(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (ValueError, TypeError):
        return False


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
            if not fits(space[key], value):
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
) -> list[str]:
    """Enqueue and import once; return what to tell the user."""
    attrs = study._storage.get_study_system_attrs(study._study_id)
    if attrs.get(SEEDED_ATTR) or not (enqueue or warm_start_from):
        return []
    notes = []
    if warm_start_from:
        notes.append(import_trials(study, space, warm_start_from))
    for params in enqueue:
        study.enqueue_trial(params, skip_if_exists=True)
    if enqueue:
        notes.append(f"{len(enqueue)} enqueued parameter set(s) run first")
    study._storage.set_study_system_attr(study._study_id, SEEDED_ATTR, True)
    return notes


def import_trials(study: optuna.Study, space: dict[str, Any], source_name: str) -> str:
    try:
        source = optuna.load_study(study_name=source_name, storage=study._storage)
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
        elif not all(fits(space[k], v) for k, v in trial.params.items()):
            skipped["outside the search space"] += 1
        else:
            study.add_trial(
                optuna.trial.create_trial(
                    params=trial.params,
                    distributions=space,
                    values=trial.values,
                    user_attrs={
                        IMPORTED: f"{source_name}#{trial.number}",
                        "imported_run_id": trial.user_attrs.get("mlflow_run_id", ""),
                    },
                )
            )
            imported += 1
    why = ", ".join(f"{n} {reason}" for reason, n in skipped.items())
    return f"warm start: imported {imported} trial(s) of study {source_name!r}" + (
        f"; skipped {why}" if why else ""
    )
