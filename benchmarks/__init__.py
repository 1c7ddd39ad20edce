"""Benchmarks on real MNIST digits, run from the repository root (not part of the app).

    python -m benchmarks.run_all --data DIR          # all of them, sized to a time budget
    python -m benchmarks.bench_speed --data DIR      # Lightning vs hand loop, overhead, val_acc
    python -m benchmarks.bench_pruning --data DIR    # a sweep without and with the pruner
    python -m benchmarks.bench_parallel --data DIR   # trials/hour: 1 worker vs 2 workers

DIR holds MNIST/raw/ in torchvision's layout: full MNIST (the data/ a sweep downloads into) or
an 8k/2k real-MNIST subset (the workspace's mnist_subset.py tool writes one).
"""
