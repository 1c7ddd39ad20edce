"""The sweeper installed alone: no torch in this venv, and the README's sphere app (its first
two code blocks) sweeps 10 trials with two worker processes. Run by .ci/run with that venv's
python: python .ci/sweeper_alone.py plugins/hydra-mlflow-study-sweeper/README.md
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient


def main(readme: Path) -> None:
    for heavy in ("torch", "torchvision", "pytorch_lightning", "lightning"):
        assert importlib.util.find_spec(heavy) is None, f"{heavy} is installed in this venv"
    head = readme.read_text().split("\n## ", 1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, language in (("app.py", "python"), ("config.yaml", "yaml")):
            block = re.search(rf"```{language}\n(.*?)```", head, re.S).group(1)
            (folder / name).write_text(block)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SWEEP_"))}
        proc = subprocess.run(
            [sys.executable, "app.py", "-m", "hydra.sweeper.n_jobs=2"],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        assert proc.returncode == 0, f"exit {proc.returncode}"
        study = optuna.load_study(study_name="toy", storage=f"sqlite:///{folder}/optuna.db")
        trials = study.get_trials()
        assert [t.state.name for t in trials] == ["COMPLETE"] * 10, [t.state for t in trials]
        # the second worker started (each process prints the study line) and none died; the
        # toy's trials take milliseconds, so the first process may have run them all
        assert proc.stdout.count("Study 'toy' (") == 2, "the second worker did not start"
        assert "died" not in proc.stderr
        workers = {t.system_attrs["worker"]["pid"] for t in trials}
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("app").experiment_id])
        parents = [r for r in runs if r.data.tags.get("sweep.role") == "sweep"]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len([r for r in runs if r.data.tags.get("best_run") == "true"]) == 1
    print(f"the sweeper alone, without torch: 10 trials, by {len(workers)} of its 2 workers")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
