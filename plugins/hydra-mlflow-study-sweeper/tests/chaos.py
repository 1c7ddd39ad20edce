"""Chaos: a toy sweep with n_jobs=4 on PostgreSQL and an `mlflow server` (its backend on the same
PostgreSQL), while, at random moments from a seeded generator, workers are killed with SIGKILL,
the tracking server is stopped and started, and PostgreSQL is crashed and restarted. Afterwards
(a rerun if the sweep itself did not finish) the lifecycle invariant must hold.

tests/test_chaos.py runs a short form. The soak, from the sweeper's folder:

    python tests/chaos.py --trials 500 --minutes 20 --seed 1
    python tests/chaos.py --trials 150 --minutes 6 --seeds 1-5     # five seeds, one after another

prints what it did and what the stores hold, per seed, and exits 1 if the invariant does not
hold for any of them (the others still run).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import check_invariant, toy_app  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from servers import MlflowServer, PostgresServer, create_database  # noqa: E402


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the sweep's worker processes)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def run_chaos(
    folder: Path,
    n_trials: int,
    chaos_seconds: float,
    seed: int,
    n_jobs: int = 4,
    epochs: int = 3,
    epoch_seconds: float = 0.3,
    outage_s: tuple[float, float] = (2.0, 12.0),
) -> dict:
    """The sweep under chaos; returns what happened and what the stores hold. Raises
    AssertionError when the invariant does not hold."""
    rng = random.Random(seed)
    pg = PostgresServer()
    server = None
    toy = None
    events: collections.Counter = collections.Counter()
    started = time.monotonic()
    keep = False
    try:
        server = MlflowServer(create_database(pg.url, "mlflow"), folder)
        server.start()
        toy = toy_app(folder / "sweep", storage=create_database(pg.url, "optuna"))
        toy.tracking_uri = server.url
        toy.defaults += [
            f"hydra.sweeper.n_trials={n_trials}",
            f"hydra.sweeper.n_jobs={n_jobs}",
            f"epochs={epochs}",
            f"epoch_seconds={epoch_seconds}",
            "log_curve=true",
        ]
        env = {"SWEEP_JOURNAL_DIR": str(folder / "journal")}
        log = open(folder / "sweep.log", "w")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            toy.command(), cwd=toy.path, env=toy.env(**env), stdout=log, stderr=subprocess.STDOUT
        )
        # the chaos starts once the sweep is under way: its workers started (a storage down at
        # the very start is one Error line by design: a wrong URL and a restart look the same)
        under_way = time.monotonic() + 300
        while len(children(proc.pid)) < n_jobs - 1 and time.monotonic() < under_way:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        chaos_until = time.monotonic() + chaos_seconds
        happened: set[str] = set()
        while proc.poll() is None:
            # past its time, the chaos goes on only for a kind of fault that has not happened yet
            # (on a slow machine the seeded draws may not reach every kind in the window)
            missing = [k for k in ("kill", "tracking", "postgres") if k not in happened]
            if time.monotonic() >= chaos_until and not missing:
                break
            time.sleep(rng.uniform(1.0, 4.0))
            if proc.poll() is not None:
                break
            # the same draws whatever happens, so that a seed replays the same faults
            kind = rng.choice(["kill", "kill", "tracking", "postgres"])
            pick, seconds = rng.random(), rng.uniform(*outage_s)
            if time.monotonic() >= chaos_until:  # past the window during the sleep above
                if not missing:
                    break
                kind = missing[0]
            if kind == "kill":
                workers = sorted(children(proc.pid))
                if workers:
                    os.kill(workers[int(pick * len(workers))], signal.SIGKILL)
                    events["workers killed"] += 1
                    happened.add(kind)
            elif kind == "tracking":
                server.stop()
                time.sleep(seconds)
                server.start()
                events["tracking server outages"] += 1
                happened.add(kind)
            else:
                pg.stop("immediate")
                time.sleep(seconds / 2)
                pg.start()
                events["PostgreSQL crashes"] += 1
                happened.add(kind)
        proc.wait(timeout=max(600, n_trials * 10))
        log.close()
        code = proc.returncode
        reruns = 0
        while code != 0 and reruns < 3:  # the sweep stopped (its workers all died, say)
            reruns += 1
            again = toy.spawn(env=env, timeout=max(600, n_trials * 10))
            (folder / f"rerun-{reruns}.log").write_text(again.stdout + again.stderr)
            code = again.returncode
        assert code == 0, (folder / "sweep.log").read_text()[-5000:]
        trials = toy.study().get_trials()
        runs = toy.all_runs()
        try:
            check_invariant(toy, n_trials=n_trials)
        except AssertionError as err:
            raise AssertionError(
                f"{traceback.format_exc(limit=-1)}\n{differences(trials, runs)}"
            ) from err
        states = collections.Counter(t.state.name for t in trials)
        left = [p for p in (folder / "journal").rglob("*.jsonl") if p.name == "runs.jsonl"]
        kept = [
            p
            for p in (folder / "journal").rglob("*.jsonl")
            if p.name not in ("runs.jsonl", "rejected.jsonl")
        ]
        assert kept == [], kept  # every kept write was delivered
        provisional = [
            t.number for t in trials if t.user_attrs.get("mlflow_run_id", "").startswith("offline")
        ]
        assert provisional == [], f"trials that kept a provisional run id: {provisional}"
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        return {
            "seed": seed,
            "seconds": round(time.monotonic() - started),
            **events,
            "reruns": reruns,
            "trials": dict(states),
            "finished": len(finished),
            "runs in MLflow": len(runs),
            "runs created while the server was away": sum(
                1 for r in runs if r.data.tags.get("sweep.client_key") in _mapped(left)
            ),
            "writes refused": _count_lines(folder / "journal", "rejected.jsonl"),
        }
    except AssertionError:
        keep = True  # the stores stay, for a look: PostgreSQL's folder and the sweep's
        raise
    finally:
        if toy is not None:
            toy.close()
        if server is not None:
            server.stop()
        if keep:
            pg.stop()
            print(f"kept for a look: {folder}, PostgreSQL in {pg.folder} (port {pg.port})")
        else:
            pg.remove()


def differences(trials: list, runs: list) -> str:
    """What disagrees between the stores, in a few lines (the soak runs without pytest's
    assertion messages)."""
    by_id = {r.info.run_id: r for r in runs}
    lines = [f"RUNNING runs: {[r.info.run_name for r in runs if r.info.status == 'RUNNING']}"]
    lines.append(
        f"parent runs: {[r.info.status for r in runs if r.data.tags.get('sweep.role') == 'sweep']}"
    )
    lines.append(f"best runs: {sum(r.data.tags.get('best_run') == 'true' for r in runs)}")
    for trial in trials:
        run = by_id.get(trial.user_attrs.get("mlflow_run_id"))
        if run is None:
            if trial.state.name != "FAIL":
                lines.append(f"trial {trial.number} {trial.state.name}: no run")
            continue
        tag = run.data.tags.get("optuna.state")
        if tag != trial.state.name or run.info.status == "RUNNING":
            lines.append(
                f"trial {trial.number} {trial.state.name}: run {run.info.run_id} "
                f"{run.info.status}, optuna.state={tag}, user attrs {trial.user_attrs}"
            )
    return "\n".join(lines)


def _mapped(files: list[Path]) -> set[str]:
    import json

    found = set()
    for file in files:
        for line in file.read_text().splitlines():
            found.add(json.loads(line)[0])
    return found


def _count_lines(folder: Path, name: str) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.rglob(name))


def seeds_of(text: str) -> list[int]:
    """--seeds 1-5, 3,7,9 or 77."""
    out: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        out += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    return out


def soak(trials: int, minutes: float, seed: int, jobs: int) -> bool:
    """One seed's chaos; True when the invariant holds."""
    folder = Path(tempfile.mkdtemp(prefix=f"sweep-chaos-{seed}-"))
    # epochs long enough for the trials to fill the minutes (each trial costs ~1.5 s besides)
    per_trial = minutes * 60 * jobs / trials
    epoch_seconds = max(0.3, (per_trial - 1.5) / 3)
    print(f"chaos in {folder} (seed {seed}, epochs of {epoch_seconds:.1f} s)", flush=True)
    started = time.monotonic()
    try:
        found = run_chaos(
            folder, trials, minutes * 60, seed, n_jobs=jobs, epoch_seconds=epoch_seconds
        )
    except AssertionError as err:
        print(f"seed {seed}: the invariant does not hold: {err}", flush=True)
        return False
    for key, value in found.items():
        print(f"{key}: {value}")
    print(f"seed {seed}: the invariant holds ({time.monotonic() - started:.0f} s)", flush=True)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", help="several seeds, one after another: 1-5, or 3,7,9")
    parser.add_argument("--jobs", type=int, default=4)
    args = parser.parse_args()
    seeds = seeds_of(args.seeds) if args.seeds else [args.seed]
    held = {seed: soak(args.trials, args.minutes, seed, args.jobs) for seed in seeds}
    if len(seeds) > 1:
        print("seeds: " + ", ".join(f"{s} {'held' if ok else 'FAILED'}" for s, ok in held.items()))
    if not all(held.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
