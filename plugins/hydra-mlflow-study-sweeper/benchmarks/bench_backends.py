"""Two workers as local processes, as Ray actors and as Slurm tasks: the same sweep, side by side.

    python benchmarks/bench_backends.py [--trials 40] [--rounds 3] [--epoch-seconds 0] [--slurm]

The README's sphere app (its trials take milliseconds, so what is measured is the sweeper and
its workers), SQLite stores, the random sampler, n_jobs=2; the Ray side starts its own local
instance, as `hydra.sweeper.backend=ray` does without an address. Per backend, the median over
interleaved rounds of:
- start-up: from the command's start to its first trial's start (imports, checks, stores; the
  second worker process, or Ray's instance, its actors and their workers);
- per trial: the trial phase's length x 2 workers / trials, the cost of a trial to a worker;
- the whole command, start to exit.

With --slurm, every backend runs on stores that Slurm's tasks reach, started here: a PostgreSQL
server (a fresh database per sweep) and `mlflow server`; and Slurm's side on the tests' single-
node cluster (tests/slurm_cluster.py: slurmctld and slurmd of this machine, installed from Debian
when missing, as root), one task per worker.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_overhead import APP, CONFIG, run, sweep_args


def measure(
    folder: Path, backend: str, trials: int, epoch_seconds: float, shared: Shared | None = None
) -> dict[str, float]:
    import optuna

    folder.mkdir()
    (folder / "app.py").write_text(APP if not epoch_seconds else SLOW_APP % epoch_seconds)
    (folder / "config.yaml").write_text(CONFIG)
    storage = f"sqlite:///{folder}/optuna.db"
    stores = []
    if shared is not None:
        storage, tracking = shared.stores(folder.name)
        stores = [f"hydra.sweeper.storage={storage}", f"hydra.sweeper.tracking_uri={tracking}"]
    started = time.time()
    whole = run([*sweep_args(trials, "toy"), "hydra.sweeper.n_jobs=2",
                 f"hydra.sweeper.backend={backend}", *stores], folder)  # fmt: skip
    study = optuna.load_study(study_name="toy", storage=storage)
    done = [t for t in study.get_trials() if t.datetime_complete]
    first = min(t.datetime_start.timestamp() for t in done)
    last = max(t.datetime_complete.timestamp() for t in done)
    return {
        "start-up s": first - started,
        "per trial ms": (last - first) * 2 / len(done) * 1000,
        "whole s": whole,
    }


class Shared:
    """PostgreSQL, `mlflow server` and a single-node Slurm cluster, for --slurm (the tests'
    own servers)."""

    def __init__(self, folder: Path) -> None:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from servers import MlflowServer, PostgresServer, create_database
        from slurm_cluster import SlurmCluster

        self.create_database = create_database
        self.postgres = PostgresServer()
        self.mlflow = MlflowServer(create_database(self.postgres.url, "mlflow"), folder)
        self.mlflow.start()
        self.slurm = SlurmCluster()
        self.slurm.start()
        os.environ.update(self.slurm.env)  # SLURM_CONF for sbatch, squeue, sinfo

    def stores(self, name: str) -> tuple[str, str]:
        return self.create_database(self.postgres.url, name.replace("-", "_")), self.mlflow.url

    def close(self) -> None:
        self.slurm.stop()
        self.mlflow.stop()
        self.postgres.remove()


# the sphere app, with a task that takes a while (a stand-in for training)
SLOW_APP = """
import time

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> float:
    time.sleep(%s)
    return cfg.x**2 + cfg.y**2


if __name__ == "__main__":
    main()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-seconds", type=float, default=0.0)
    parser.add_argument("--slurm", action="store_true", help="Slurm too, all on shared stores")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    if args.slurm:
        results["slurm"] = []
    with tempfile.TemporaryDirectory() as tmp:
        shared = Shared(Path(tmp)) if args.slurm else None
        try:
            for r in range(args.rounds):
                for backend in results:
                    folder = Path(tmp) / f"{backend}-{r}"
                    results[backend].append(
                        measure(folder, backend, args.trials, args.epoch_seconds, shared)
                    )
        finally:
            if shared is not None:
                shared.close()
    task = f", a task of {args.epoch_seconds} s" if args.epoch_seconds else ""
    stores = "PostgreSQL and mlflow server" if args.slurm else "SQLite"
    print(
        f"n_jobs=2, {args.trials} trials of the sphere app{task}, {stores}, median of "
        f"{args.rounds}:"
    )
    print(f"  {'':8s} {'start-up s':>11s} {'per trial ms':>13s} {'whole s':>9s}")
    for backend, rounds in results.items():
        cells = [statistics.median(r[key] for r in rounds) for key in rounds[0]]
        print(f"  {backend:8s} {cells[0]:11.2f} {cells[1]:13.1f} {cells[2]:9.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
