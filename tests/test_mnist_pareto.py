"""The MNIST app's accuracy-against-size preset (conf/sweep/pareto.yaml), end to end."""

from __future__ import annotations

import pytest
from mnist_sweep import assert_ok


def non_dominated(points: dict[int, tuple[float, float]]) -> set[int]:
    def dominates(a, b):
        return all(p <= q for p, q in zip(a, b, strict=True)) and a != b

    return {n for n, p in points.items() if not any(dominates(q, p) for q in points.values())}


def by_trial(runs) -> dict[int, object]:
    return {
        int(r.data.tags["optuna.trial_number"]): r
        for r in runs
        if "optuna.trial_number" in r.data.tags
    }


def tagged(runs, tag: str) -> set[int]:
    return {n for n, r in by_trial(runs).items() if r.data.tags.get(tag) == "true"}


def test_the_mnist_pareto_preset_publishes_the_most_accurate_small_model(sweep):
    small = "{model.width: 0.25, model.dropout: 0.1, model.lr: 0.003}"  # 87,486 parameters
    proc = sweep.run(
        "sweep=pareto",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.pruner=null",
        f"hydra.sweeper.enqueue=[{small}]",
    )
    assert_ok(proc)
    client = sweep.client()
    runs = sweep.runs()
    (parent,) = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
    children = by_trial(runs)
    assert len(children) == 4
    points = {
        n: (-r.data.metrics["val_acc"], r.data.metrics["n_params"]) for n, r in children.items()
    }
    assert len({p[1] for p in points.values()}) == 4  # the width changes the cost
    front = non_dominated(points)
    assert tagged(runs, "pareto_front") == front
    small_enough = [n for n in front if points[n][1] <= 200_000]
    champion = min(small_enough, key=lambda n: points[n][0])
    assert tagged(runs, "best_run") == {champion}
    assert parent.data.params["sweeper.champion"] == "max val_acc where n_params <= 200000"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "pareto_front.json" in artifacts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/pareto_front.png" in report
    version = client.get_model_version_by_alias("mnist-cnn-pareto", "champion")
    assert version.run_id == children[champion].info.run_id
    assert float(version.tags["n_params"]) == points[champion][1] <= 200_000
    assert float(version.tags["val_acc"]) == pytest.approx(-points[champion][0], abs=1e-6)
    assert "test_acc" in version.tags  # the publish hook ran on the champion
