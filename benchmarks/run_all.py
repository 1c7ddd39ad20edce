"""All the benchmarks in one command, sized to a time budget, ending in one table of results.

    python -m benchmarks.run_all --data DIR [--budget-s 300] [--quick] [--accelerator auto]

DIR holds MNIST/raw/ in torchvision's layout (default: data/, where a sweep downloads MNIST).
With full MNIST (60k training images) the benchmarks train on it; with a smaller set, such as
the 8k/2k real-MNIST subset the workspace's mnist_subset.py tool writes, on that. Run it from
the repository root.

A short probe times Lightning's training steps on this machine first; each benchmark's size
(repeats, images per epoch, trials, epochs, batches per epoch) is then chosen so that the whole
run fits the budget (default 300 s, meant as about 5 minutes on a GPU machine; the sizing is
estimated from the probe and the first sweep, so allow some slack). Where the budget is too
small for a benchmark's reference size (12 trials x 6 epochs for pruning, 8 x 4 for pruning
with two objectives, 6 x 2 for the workers), it keeps the trials and epochs as long as it can
and trains fewer batches per epoch (trainer.limit_train_batches), then shrinks the trials and
epochs; the table says what ran. On
a CPU the budget is usually too small for full MNIST: the sizes shrink, or pass a larger
--budget-s. --quick runs every benchmark at a smoke-test size (2-3 minutes on a 2-core CPU,
most of it the seven sweeps' start-up), where the targets mean nothing and are not judged.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import bench_parallel, bench_pruning, bench_speed
from benchmarks.common import (
    DATA_HELP,
    FULL_MNIST,
    VAL_SIZE,
    Row,
    data_folder,
    describe_data,
    image_count,
    machine,
    print_table,
)
from mnist.data import TensorBatches
from mnist.train import pick_device

BATCH = bench_speed.BATCH_SIZE
VAL_BATCHES = math.ceil(VAL_SIZE / BATCH)
MIN_EPOCH_BATCHES = 110  # an epoch of the 8k/2k subset: the least a sized-down epoch trains
PRUNED_SHARE = 0.65  # epochs the median pruner trains against no pruner (README: 42 of 72)
TWO_WORKERS_SHARE = 0.75  # a 2-worker sweep's training time against 1 worker's (about 1.4x)


@dataclass
class Costs:
    """What the probe and the overhead sweep measured; sizes are planned from these."""

    step_s: float  # one Lightning training step, batch of 64
    epoch_batches: int  # batches in a full epoch of this data
    sweep_start_s: float = 15.0  # a sweep command's fixed cost: imports, study, publish
    trial_s: float = 1.0  # a trial's cost outside training

    def epoch_s(self, batches: int) -> float:
        """A trial's epoch: `batches` training steps and a validation pass (forward only)."""
        return (batches + 0.4 * VAL_BATCHES) * self.step_s

    def sweep_s(self, trials: int, epochs: float, batches: int) -> float:
        return self.sweep_start_s + trials * (self.trial_s + epochs * self.epoch_s(batches))


class Clock:
    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.started = budget_s, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed


def plan_sweep(
    costs: Costs, budget_s: float, ladder: list[tuple[int, int]], cost_of: Callable
) -> tuple[int, int, int]:
    """(trials, epochs, batches per epoch): the first rung of `ladder` that fits `budget_s`.

    A rung fits when its epochs, cut to no fewer than MIN_EPOCH_BATCHES batches (or the full
    epoch, if smaller), fit; the last rung is taken at whatever size fits, down to 20 batches.
    """
    floor = min(costs.epoch_batches, MIN_EPOCH_BATCHES)
    for i, (trials, epochs) in enumerate(ladder):
        low = 20 if i == len(ladder) - 1 else floor
        batches = costs.epoch_batches
        while batches > low and cost_of(trials, epochs, batches) > budget_s:
            batches = max(low, int(batches * 0.8))
        if cost_of(trials, epochs, batches) <= budget_s or i == len(ladder) - 1:
            return trials, epochs, batches
    raise AssertionError("unreachable")


def limit(batches: int, costs: Costs) -> tuple[str, ...]:
    """The override that trains `batches` per epoch, or none for full epochs."""
    if batches >= costs.epoch_batches:
        return ()
    return (f"trainer.limit_train_batches={batches}",)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def epochs_text(trials: int, epochs: int, batches: int, costs: Costs) -> str:
    size = "" if batches >= costs.epoch_batches else f" x {batches} batches"
    return f"{count(trials, 'trial')} x {count(epochs, 'epoch')}{size}"


def probe(data_root: Path, device: torch.device) -> tuple[TensorBatches, Costs]:
    """The full training batches, and Lightning's seconds per step on them (after a warm-up)."""
    batches = bench_speed.training_batches(data_root, device)
    n = min(30, len(batches))
    sample = TensorBatches(batches.images[: n * BATCH], batches.labels[: n * BATCH], BATCH)
    bench_speed.lightning_seconds(sample, device)  # first-call costs
    step_s = bench_speed.lightning_seconds(sample, device) / n
    return batches, Costs(step_s=step_s, epoch_batches=len(batches))


@dataclass
class BenchmarkRun:
    """One run of the benchmarks: what they share, and one method per benchmark.

    Each benchmark adds its results to `rows`; `step` runs one, timing it and turning a failure
    into a "did not finish" row.
    """

    args: argparse.Namespace
    clock: Clock
    data_root: Path
    device: torch.device
    costs: Costs  # from the probe; the overhead sweep refines it for the later sweeps
    batches: TensorBatches  # the full training batches, from the probe
    on: str  # "full MNIST" or "subset", for the table
    rows: list[Row] = field(default_factory=list)

    @property
    def quick(self) -> bool:
        return self.args.quick

    @property
    def accel(self) -> tuple[str, ...]:
        return (f"trainer.accelerator={self.args.accelerator}",)

    def judge(self, ok: bool) -> bool | None:
        return None if self.quick else ok

    def step(self, title: str, run: Callable[[], None]) -> None:
        clock = self.clock
        print(f"\n== {title} ({clock.elapsed:.0f} s in, {clock.left:.0f} s of the budget left)")
        started = time.perf_counter()
        try:
            run()
        except Exception as err:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            error = f"{type(err).__name__}: {err}".splitlines()[0][:100]
            self.rows.append(Row(title, "did not finish", error, met=False))
        print(f"   {title}: {time.perf_counter() - started:.0f} s")

    def speed_size(self) -> tuple[int, int]:
        """(repeats, images per epoch) for the speed benchmark."""
        if self.quick:
            return 3, 20 * BATCH
        # about a fifth of the budget: the most repeats (3-7) of the longest epochs
        share, available = 0.2 * self.args.budget_s, len(self.batches.labels)
        for repeats in (7, 5, 3):
            fit = int(share / (2 * repeats * self.costs.step_s)) * BATCH
            images = min(available, fit)
            if images >= min(available, MIN_EPOCH_BATCHES * BATCH):
                break
        return repeats, max(images, 20 * BATCH)

    def speed(self) -> None:
        repeats, images = self.speed_size()
        batches = timed = self.batches
        if images < len(batches.labels):
            timed = TensorBatches(batches.images[:images], batches.labels[:images], BATCH, True)
        result = bench_speed.measure_speed(
            timed, self.device, repeats, progress=lambda s: print("  ", s)
        )
        hand_rate, light_rate = result.rates()
        self.rows.append(
            Row(
                "speed",
                f"Lightning / hand-loop throughput, median of {repeats} runs, "
                f"{result.images} images per epoch ({self.on})",
                f"{result.ratio:.3f} (runs {' '.join(f'{r:.3f}' for r in result.ratios)}; "
                f"fastest epochs {result.best_ratio:.3f})",
                f">= {bench_speed.RATIO_TARGET}",
                self.judge(result.ratio >= bench_speed.RATIO_TARGET),
            )
        )
        self.rows.append(
            Row("speed", "samples/s: hand loop, Lightning", f"{hand_rate:.0f}, {light_rate:.0f}")
        )

    def overhead(self, work: Path) -> None:
        costs, trials = self.costs, 3 if self.quick else 6
        wall, overheads, trains = bench_speed.sweep_overheads(
            self.data_root, work, trials, 5 if self.quick else 20, *self.accel
        )
        median = statistics.median(overheads)
        # what the later sweeps will cost besides training, from this one
        costs.trial_s = median
        costs.sweep_start_s = max(5.0, wall - trials * (median + statistics.median(trains)))
        self.rows.append(
            Row(
                "sweep overhead",
                f"time outside Trainer.fit per trial (median, max; {trials}-trial sweep)",
                f"{median:.2f} s, {max(overheads):.2f} s",
                f"<= {bench_speed.OVERHEAD_TARGET_S:g} s",
                self.judge(max(overheads) <= bench_speed.OVERHEAD_TARGET_S),
            )
        )
        print(
            f"   sweep of {trials} trials: {wall:.1f} s, of which ~{costs.sweep_start_s:.0f} s "
            f"start and end"
        )

    def accuracy_size(self) -> tuple[int, int]:
        """(epochs, batches per epoch) for the accuracy trial."""
        if self.quick:
            return 1, 20
        # full epochs if they fit a tenth of the budget; no fewer than the subset's
        n = self.costs.epoch_batches
        while n > MIN_EPOCH_BATCHES and 2 * self.costs.epoch_s(n) > 0.1 * self.args.budget_s:
            n = max(MIN_EPOCH_BATCHES, int(n * 0.8))
        return 2, n

    def accuracy(self, work: Path) -> None:
        epochs, n = self.accuracy_size()
        full = n >= self.costs.epoch_batches
        extra = () if full else (f"trainer.limit_train_batches={n}",)
        val_acc, seconds, values = bench_speed.trial_val_acc(
            self.data_root, work, self.args.accelerator, epochs, *extra
        )
        size = "" if full else f" x {n} batches"
        self.rows.append(
            Row(
                "accuracy",
                f"val_acc after {count(epochs, 'epoch')}{size} at the defaults, {values} "
                f"({self.on})",
                f"{val_acc:.4f}",
                f">= {bench_speed.VAL_ACC_TARGET}",
                self.judge(val_acc >= bench_speed.VAL_ACC_TARGET),
            )
        )

    def pair_size(self, ladder: list[tuple[int, int]], share: float) -> tuple[int, int, int]:
        """(trials, epochs, batches per epoch) for a sweep without and with the median pruner,
        in `share` of what is left of the budget."""
        if self.quick:
            return 4, 2, 10
        costs = self.costs

        def cost(t: int, e: int, b: int) -> float:
            return costs.sweep_s(t, e, b) + costs.sweep_s(t, e * PRUNED_SHARE, b)

        return plan_sweep(costs, share * self.clock.left, ladder, cost)

    def pruning(self) -> None:
        # most of what is left; the rest for two objectives and the workers
        trials, epochs, n = self.pair_size([(12, 6), (10, 5), (8, 4), (6, 3)], 0.45)
        results = bench_pruning.compare_pruners(
            self.data_root, ["none", "median"], trials, epochs, *self.accel, *limit(n, self.costs)
        )
        none, median = results
        saved = bench_pruning.saved_share(results)
        size = epochs_text(trials, epochs, n, self.costs)
        self.rows.append(
            Row(
                "pruning",
                f"epochs trained, no pruner vs median ({size}, {self.on})",
                f"{none['epochs']} vs {median['epochs']} ({-saved:+.0%}), "
                f"{none['wall_s']:.0f} vs {median['wall_s']:.0f} s",
                f">= {bench_pruning.SAVED_TARGET:.0%} fewer",
                self.judge(saved >= bench_pruning.SAVED_TARGET),
            )
        )
        gap = (median["best"] - none["best"]) * 100
        self.rows.append(
            Row(
                "pruning",
                "best val_acc, no pruner vs median",
                f"{none['best']:.4f} vs {median['best']:.4f} ({gap:+.2f} pp)",
                f"within {bench_pruning.BEST_WITHIN_PP} pp",
                self.judge(abs(gap) <= bench_pruning.BEST_WITHIN_PP),
            )
        )

    def pareto(self) -> None:
        trials, epochs, n = self.pair_size([(8, 4), (6, 3), (4, 2)], 0.5)
        results = bench_pruning.compare_pareto(
            self.data_root, trials, epochs, *self.accel, *limit(n, self.costs)
        )
        none, median = results
        saved = bench_pruning.saved_share(results)
        size = epochs_text(trials, epochs, n, self.costs)
        self.rows.append(
            Row(
                "pruning, 2 objectives",
                f"epochs, no pruner vs median (sweep=pareto, {size}, {self.on})",
                f"{none['epochs']} vs {median['epochs']} ({-saved:+.0%})",
            )
        )
        self.rows.append(
            Row(
                "pruning, 2 objectives",
                "Pareto front, no pruner vs median: members (shared), hypervolume",
                f"{len(none['front'])} vs {len(median['front'])} "
                f"({bench_pruning.same_members(none, median)}), "
                f"{none['hypervolume']:.4f} vs {median['hypervolume']:.4f}",
            )
        )

    def parallel_size(self) -> tuple[int, int, int]:
        """(trials, epochs, batches per epoch) for the workers: what is left of the budget."""
        if self.quick:
            return 2, 1, 10
        costs = self.costs

        def cost(t: int, e: int, b: int) -> float:
            train = t * e * costs.epoch_s(b)
            return 2 * costs.sweep_s(t, 0, b) + train * (1 + TWO_WORKERS_SHARE)

        ladder = [(6, 2), (4, 2), (4, 1), (2, 1)]
        return plan_sweep(costs, 0.95 * self.clock.left, ladder, cost)

    def parallel(self) -> None:
        trials, epochs, n = self.parallel_size()
        r = bench_parallel.compare_workers(
            self.data_root, trials, epochs, *self.accel, *limit(n, self.costs)
        )
        one, two = trials / r["one_s"] * 3600, trials / r["two_s"] * 3600
        self.rows.append(
            Row(
                "parallel",
                f"trials/hour, 1 worker x {r['cores']} threads vs 2 x {r['threads']} "
                f"({epochs_text(trials, epochs, n, self.costs)})",
                f"{one:.0f} vs {two:.0f} ({r['one_s'] / r['two_s']:.2f}x)",
            )
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help=DATA_HELP + " (default: data/)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall seconds for all")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes, targets not judged")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, mps or auto")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    clock = Clock(args.budget_s)
    data_root = data_folder(args.data)
    device = pick_device(args.accelerator)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"device {device}{name}; {machine()}")
    print(f"data: {describe_data(data_root)}")
    on = "full MNIST" if image_count(data_root) >= FULL_MNIST else "subset"
    quick = args.quick

    batches, costs = probe(data_root, device)
    print(
        f"probe: {costs.step_s * 1e3:.1f} ms per Lightning step of {BATCH} images; an epoch of "
        f"{costs.epoch_batches} batches ~{costs.epoch_s(costs.epoch_batches):.0f} s"
        f"{' (quick: smoke-test sizes)' if quick else ''}"
    )

    run = BenchmarkRun(args, clock, data_root, device, costs, batches, on)
    run.step("speed", run.speed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run.step("sweep overhead", lambda: run.overhead(work))
        run.step("accuracy", lambda: run.accuracy(work))
    run.step("pruning", run.pruning)
    run.step("pruning, 2 objectives", run.pareto)
    run.step("parallel", run.parallel)

    total, rows = clock.elapsed, run.rows
    rows.append(
        Row(
            "all",
            f"wall time of this command{' (--quick)' if quick else ''}",
            f"{total:.0f} s",
            f"<= {args.budget_s:.0f} s (--budget-s)",
            None if quick else total <= args.budget_s * 1.1,
        )
    )
    print()
    print_table(rows)
    sys.exit(1 if any(r.measure == "did not finish" for r in rows) else 0)


if __name__ == "__main__":
    main()
