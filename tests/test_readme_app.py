"""The README's "Sweep your own Hydra app": its two files, exactly as printed, swept."""

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(language: str) -> str:
    section = README.read_text().split("## Sweep your own Hydra app", 1)[1]
    return re.search(rf"```{language}\n(.*?)```", section, re.S).group(1)


def test_the_readme_app_sweeps_as_the_readme_says(tmp_path):
    (tmp_path / "app.py").write_text(readme_block("python"))
    (tmp_path / "config.yaml").write_text(readme_block("yaml"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_"))}
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", "hydra.sweeper.n_trials=3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("app").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "sweep-toy"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    for run in children:
        value = float(run.data.params["x"]) ** 2 + float(run.data.params["y"]) ** 2
        assert abs(run.data.metrics["value"] - value) < 1e-9
    (best,) = [r for r in children if r.data.tags.get("best_run") == "true"]
    assert best.data.metrics["value"] == study.best_value
    assert "<- best" in proc.stdout
