"""What a person reads during and after a sweep: progress lines, the table, the results file."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

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


def counts(study: optuna.Study) -> dict[str, int]:
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "running",
    }
    for trial in study.get_trials(deepcopy=False):
        out[names[trial.state]] += 1
    return out


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial with a finite value (pruned and failed ones never win)."""
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
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
                t.state.name,
                f"{seconds:.1f}" if seconds is not None else "-",
                "<- best" if best is not None and t.number == best.number else "",
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def write_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optuna's four standard views of the study, as one HTML page and one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vis_png

    folder.mkdir(parents=True, exist_ok=True)
    views = {
        "optimization_history": (vis.plot_optimization_history, vis_png.plot_optimization_history),
        "parallel_coordinate": (vis.plot_parallel_coordinate, vis_png.plot_parallel_coordinate),
        "param_importances": (vis.plot_param_importances, vis_png.plot_param_importances),
        "intermediate_values": (vis.plot_intermediate_values, vis_png.plot_intermediate_values),
    }
    written, figures = [], []
    with warnings.catch_warnings():
        # the matplotlib views are marked experimental; their output is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # importances of near-equal trials warn that they are equal; the plot says as much
        warnings.filterwarnings("ignore", "Target and region quantiles", UserWarning)
        for name, (html_view, png_view) in views.items():
            try:
                figures.append((name, html_view(study)))
                axes = png_view(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.set_size_inches(9, 5)
                figure.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
                plt.close(figure)
                written.append(folder / f"{name}.png")
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                # importances need two complete trials and a varying parameter, for instance
                logging.getLogger(__name__).info("no %s plot: %s", name, err)
    if figures:
        page = folder / "sweep_report.html"
        parts = [f"<h1>Study {study.study_name}</h1>"]
        for i, (name, figure) in enumerate(figures):
            # plotly.js once, inline: the MLflow UI may have no internet to fetch it from
            parts.append(f"<h2>{name.replace('_', ' ')}</h2>")
            parts.append(figure.to_html(full_html=False, include_plotlyjs=(i == 0)))
        page.write_text("<html><body>" + "\n".join(parts) + "</body></html>")
        written.append(page)
    return written


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
            "test_acc": published.test_acc,
            "champion": published.champion_moved,
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
