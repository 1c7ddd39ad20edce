"""The chaos test's short form (tests/chaos.py holds the driver and the soak command)."""

from __future__ import annotations

import pytest
from chaos import run_chaos


@pytest.mark.outage
def test_kills_tracking_outages_and_postgres_crashes_keep_the_invariant(tmp_path):
    found = run_chaos(
        tmp_path, n_trials=32, chaos_seconds=50, seed=6, epoch_seconds=0.8, outage_s=(1, 5)
    )
    print(found)
    # the seed makes every kind of fault happen (the invariant itself is checked inside)
    for fault in ("workers killed", "tracking server outages", "PostgreSQL crashes"):
        assert found.get(fault, 0) >= 1, (fault, found)
    assert found["finished"] == 32
