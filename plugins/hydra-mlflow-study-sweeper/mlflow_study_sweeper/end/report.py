"""The sweep's report on the parent run: Optuna's views as PNGs and one self-contained page."""

from __future__ import annotations

import html
import logging
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

if TYPE_CHECKING:
    from mlflow_study_sweeper.search.objectives import Objectives


MIN_TRIALS = 2  # finished trials a report needs: one trial's report would be its run


def write_plots(study: optuna.Study, folder: Path, objectives: Objectives) -> list[Path]:
    """Optuna's four standard views of the study, as one HTML page and one PNG each.

    Several objectives: the views show the first one, and the Pareto front's plot comes first.
    A study with fewer than MIN_TRIALS finished trials gets none (and costs no second of
    matplotlib, plotly and scikit-learn imports).
    """
    shown = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    if len(shown) < MIN_TRIALS:
        return []
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
    if not any(t.intermediate_values for t in shown):
        del views["intermediate_values"]  # a job that reports no epochs has no curves to show
    if not any(t.state == TrialState.COMPLETE for t in shown):
        # the other views show complete trials (Optuna only warns that there are none)
        views = {k: v for k, v in views.items() if k == "intermediate_values"}
    if objectives.multi:
        first = {"target": lambda t: t.values[0], "target_name": objectives.metric}
        views = {
            name: tuple(partial(view, **first) for view in pair) if name != "intermediate_values"
            else pair
            for name, pair in views.items()
        }  # fmt: skip
        if len(objectives.names) in (2, 3):
            names = {"target_names": list(objectives.names)}
            views = {
                "pareto_front": (
                    partial(vis.plot_pareto_front, **names),
                    partial(vis_png.plot_pareto_front, **names),
                ),
                **views,
            }
    written, figures = [], []
    with warnings.catch_warnings():
        # the matplotlib views are marked experimental; their output is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # importances of near-equal trials warn that they are equal; the plot says as much
        warnings.filterwarnings("ignore", "Target and region quantiles", UserWarning)
        # ... and that a param with few trials per value range (one a search-space function
        # draws from another's value, say) is judged on little: so is any importance of 20 trials
        warnings.filterwarnings("ignore", "Some regimes for parameter", UserWarning)
        # with several objectives the importances are those of the first, as the page says
        warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
        # one complete trial (the others pruned): equal importances, as the plot shows
        warnings.filterwarnings("ignore", "The number of trials is too small", UserWarning)
        # a view of few or equal trials: matplotlib widens its flat axes itself, and says so
        warnings.filterwarnings("ignore", "Attempting to set identical", UserWarning)
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
        parts = [f"<h1>Study {html.escape(study.study_name)}</h1>"]
        for i, (name, figure) in enumerate(figures):
            # plotly.js once, inline: the MLflow UI may have no internet to fetch it from
            parts.append(f"<h2>{name.replace('_', ' ')}</h2>")
            parts.append(figure.to_html(full_html=False, include_plotlyjs=(i == 0)))
        page.write_text("<html><body>" + "\n".join(parts) + "</body></html>")
        written.append(page)
    return written
