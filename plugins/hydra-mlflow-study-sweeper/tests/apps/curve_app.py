"""app.py with switches for the sweeper's tests: per-epoch reports (pruning), failures, a
non-number result, two objectives, checkpoints. Same config.yaml; with the switches at their
defaults it is app.py.
"""

import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mlflow_study_sweeper import checkpoint_saved, continues, report


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> float:
    value = cfg.x**2 + cfg.y**2
    if cfg.log_env:  # where its worker placed it (Ray's CUDA_VISIBLE_DEVICES), into its run
        import mlflow

        with mlflow.start_run():
            mlflow.set_tags({k: os.environ.get(k, "") for k in ("CUDA_VISIBLE_DEVICES",)})
    run = None
    if cfg.log_curve:  # the trial's run, as a job that logs its own curve resumes it (no `with`)
        import mlflow

        run = mlflow.start_run()
    if cfg.fail_if_x_above is not None and cfg.x > cfg.fail_if_x_above:  # (inside that run)
        raise ValueError(f"x={cfg.x} is above fail_if_x_above={cfg.fail_if_x_above}")
    continuation = continues() if cfg.checkpoint else None
    start = continuation.step + 1 if continuation else 0
    for epoch in range(start, cfg.epochs):  # a curve falling to `value`: the pruner may stop it
        time.sleep(cfg.epoch_seconds)
        if run is not None:  # each epoch's value, and a small file beside it
            mlflow.log_metric("curve", value * (1 + 1 / (epoch + 1)), step=epoch)
            mlflow.log_text(f"epoch {epoch}", f"curve/epoch-{epoch}.txt")
        if report(value * (1 + 1 / (epoch + 1)), step=epoch, total=cfg.epochs):
            break
        if cfg.checkpoint:  # its whole state is the epoch number: nothing to store
            checkpoint_saved(epoch)
        if cfg.flaky:  # the first `flaky` attempts of the sweep fail after an epoch's checkpoint
            flaky(cfg)
    if run is not None:
        mlflow.end_run()
    if cfg.pareto:  # two objectives: their Pareto front is the segment from (0, 0) to (2, 2)
        f2 = (cfg.x - 2) ** 2 + (cfg.y - 2) ** 2
        forms = {"tuple": (value, f2), "triple": (value, f2, 0.0), "text": f"{value},{f2}"}
        return forms.get(cfg.pareto, {"f1": value, "f2": f2})
    return f"{value}" if cfg.return_text else value


def flaky(cfg: DictConfig) -> None:
    """A transient failure, counted in a file of the sweep's folder across its jobs."""
    counter = Path("flaky-attempts")
    seen = int(counter.read_text()) if counter.exists() else 0
    if seen >= cfg.flaky:
        return
    counter.write_text(str(seen + 1))
    if cfg.flaky_error == "oom":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    raise ConnectionError("the data service dropped the connection")


if __name__ == "__main__":
    main()
