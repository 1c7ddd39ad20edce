"""What MLflow's client calls cost a trial on a database store: one call per item against one
log_batch, the numbers `tracking.lifecycle.log_few` chooses by.

    python benchmarks/bench_mlflow_calls.py [--runs 300]

On a fresh SQLite store, each case logs to a new run with the sweeper's tags and nothing else,
as a trial's run is when its params are logged (a log_batch reads the whole run first, so what
the run already holds counts). The two ways alternate run by run, so the machine's drift hits
both alike; prints the median of each (the first 5 runs of each way left out).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

# (name, one call per item, one log_batch), for a run `r` at time `now`
CASES: list[tuple[str, Callable, Callable]] = [
    (
        "one param",
        lambda c, r, now: c.log_param(r, "x", "1.0"),
        lambda c, r, now: c.log_batch(r, params=[Param("x", "1.0")]),
    ),
    (
        "two params",
        lambda c, r, now: (c.log_param(r, "x", "1.0"), c.log_param(r, "y", "2.0")),
        lambda c, r, now: c.log_batch(r, params=[Param("x", "1.0"), Param("y", "2.0")]),
    ),
    (
        "two tags",
        lambda c, r, now: (c.set_tag(r, "s", "C"), c.set_tag(r, "t", "D")),
        lambda c, r, now: c.log_batch(r, tags=[RunTag("s", "C"), RunTag("t", "D")]),
    ),
    (
        "a metric and a tag",
        lambda c, r, now: (
            c.log_metric(r, "value", 1.0, timestamp=now, step=0),
            c.set_tag(r, "optuna.state", "COMPLETE"),
        ),
        lambda c, r, now: c.log_batch(
            r, metrics=[Metric("value", 1.0, now, 0)], tags=[RunTag("optuna.state", "COMPLETE")]
        ),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as folder:
        client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
        experiment = client.create_experiment("calls")
        for i in range(args.runs):
            way = "one call per item" if i % 2 else "log_batch"
            for name, single, batch in CASES:
                tags = {
                    "sweep.role": "trial",
                    "optuna.trial_number": str(i),
                    "optuna.state": "RUNNING",
                }
                run = client.create_run(experiment, tags=tags).info.run_id
                now = int(time.time() * 1000)
                started = time.perf_counter()
                (single if i % 2 else batch)(client, run, now)
                seconds[name, way].append(time.perf_counter() - started)
                client.set_terminated(run)
    print(f"MLflow client calls on SQLite, median of {args.runs // 2} runs each way:")
    for name, _, _ in CASES:
        single, batch = (
            statistics.median(seconds[name, way][5:]) * 1000
            for way in ("one call per item", "log_batch")
        )
        print(f"  {name:20s} one call per item {single:5.2f} ms   log_batch {batch:5.2f} ms")


if __name__ == "__main__":
    main()
