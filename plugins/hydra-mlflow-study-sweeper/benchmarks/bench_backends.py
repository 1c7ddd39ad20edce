"""Two workers as local processes against two workers as Ray actors: the same sweep, side by side.

    python benchmarks/bench_backends.py [--trials 40] [--rounds 3] [--epoch-seconds 0]

The README's sphere app (its trials take milliseconds, so what is measured is the sweeper and
its workers), SQLite stores, the random sampler, n_jobs=2; the Ray side starts its own local
instance, as `hydra.sweeper.backend=ray` does without an address. Per backend, the median over
interleaved rounds of:
- start-up: from the command's start to its first trial's start (imports, checks, stores; the
  second worker process, or Ray's instance, its actors and their workers);
- per trial: the trial phase's length x 2 workers / trials, the cost of a trial to a worker;
- the whole command, start to exit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_overhead import APP, CONFIG, run, sweep_args


def measure(folder: Path, backend: str, trials: int, epoch_seconds: float) -> dict[str, float]:
    import optuna

    folder.mkdir()
    (folder / "app.py").write_text(APP if not epoch_seconds else SLOW_APP % epoch_seconds)
    (folder / "config.yaml").write_text(CONFIG)
    started = time.time()
    whole = run([*sweep_args(trials, "toy"), "hydra.sweeper.n_jobs=2",
                 f"hydra.sweeper.backend={backend}"], folder)  # fmt: skip
    study = optuna.load_study(study_name="toy", storage=f"sqlite:///{folder}/optuna.db")
    done = [t for t in study.get_trials() if t.datetime_complete]
    first = min(t.datetime_start.timestamp() for t in done)
    last = max(t.datetime_complete.timestamp() for t in done)
    return {
        "start-up s": first - started,
        "per trial ms": (last - first) * 2 / len(done) * 1000,
        "whole s": whole,
    }


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
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for backend in results:
                folder = Path(tmp) / f"{backend}-{r}"
                results[backend].append(measure(folder, backend, args.trials, args.epoch_seconds))
    task = f", a task of {args.epoch_seconds} s" if args.epoch_seconds else ""
    print(f"n_jobs=2, {args.trials} trials of the sphere app{task}, median of {args.rounds}:")
    print(f"  {'':8s} {'start-up s':>11s} {'per trial ms':>13s} {'whole s':>9s}")
    for backend, rounds in results.items():
        cells = [statistics.median(r[key] for r in rounds) for key in rounds[0]]
        print(f"  {backend:8s} {cells[0]:11.2f} {cells[1]:13.1f} {cells[2]:9.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
