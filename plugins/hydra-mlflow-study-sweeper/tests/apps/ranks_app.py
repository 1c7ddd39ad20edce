"""curve_app.py's falling curve, trained torchrun-style: the job starts `ranks` processes of its
own (this file again, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun sets
them), which join a torch.distributed group (gloo). Every rank reports each epoch; rank 0
records it and logs the curve into the trial's run; every rank stops when the pruner says so.
Each rank writes how many epochs it trained to `rank-<n>.epochs` in the trial's folder.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mlflow_study_sweeper import rank, report

JOB = "RANKS_APP_JOB"  # what the ranks need of the job's config, as JSON


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> float:
    folder = Path(HydraConfig.get().runtime.output_dir)
    n = int(cfg.get("ranks", 2))
    job = {"x": cfg.x, "y": cfg.y, "epochs": cfg.epochs, "folder": str(folder)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__],
            env=dict(
                os.environ,
                RANK=str(r),
                WORLD_SIZE=str(n),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                **{JOB: json.dumps(job)},
            ),
        )
        for r in range(n)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"the ranks exited with {codes}")
    return json.loads((folder / "value.json").read_text())


def train_as_rank() -> None:
    import mlflow
    import torch.distributed as dist

    job = json.loads(os.environ[JOB])
    dist.init_process_group("gloo")
    value = job["x"] ** 2 + job["y"] ** 2
    run = mlflow.start_run() if rank() == 0 else None  # the trial's run (MLFLOW_RUN_ID)
    trained = 0
    for epoch in range(job["epochs"]):
        time.sleep(0.05)
        trained += 1
        point = value * (1 + 1 / (epoch + 1))
        if run is not None:
            mlflow.log_metric("curve", point, step=epoch)
        if report(point, step=epoch, total=job["epochs"]):  # every rank, the same step
            break
    folder = Path(job["folder"])
    (folder / f"rank-{rank()}.epochs").write_text(str(trained))
    if run is not None:
        (folder / "value.json").write_text(json.dumps(value))
        mlflow.end_run()
    dist.destroy_process_group()


if __name__ == "__main__":
    if JOB in os.environ:
        train_as_rank()
    else:
        main()
