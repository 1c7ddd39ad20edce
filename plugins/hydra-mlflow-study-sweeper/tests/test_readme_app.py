"""The README's first lines: the app and its config, exactly as printed, swept."""

import re
from pathlib import Path

import optuna
from harness import clean_env, run_in_process
from mlflow.tracking import MlflowClient

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(language: str) -> str:
    head = README.read_text().split("\n## ", 1)[0]  # before the first section
    return re.search(rf"```{language}\n(.*?)```", head, re.S).group(1)


def test_the_readme_app_sweeps_as_the_readme_says(tmp_path):
    (tmp_path / "app.py").write_text(readme_block("python"))
    (tmp_path / "config.yaml").write_text(readme_block("yaml"))
    proc = run_in_process(
        [str(tmp_path / "app.py"), "-m", "hydra.sweeper.n_trials=3"], tmp_path, clean_env()
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
