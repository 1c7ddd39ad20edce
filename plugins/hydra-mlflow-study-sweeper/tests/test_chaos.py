"""The chaos test's short form (tests/chaos.py holds the driver and the soak command)."""

from __future__ import annotations

import pytest
from chaos import run_chaos


@pytest.mark.outage
@pytest.mark.parametrize("seed", [6, 77])
def test_kills_tracking_outages_and_postgres_crashes_keep_the_invariant(tmp_path, seed):
    """Two seeds (77 found the parent run left RUNNING by an outage during the end's last
    writes, in the soak form: tests/chaos.py --trials 150 --minutes 6 --seed 77)."""
    found = run_chaos(
        tmp_path, n_trials=32, chaos_seconds=50, seed=seed, epoch_seconds=0.8, outage_s=(1, 5)
    )
    print(found)
    # every kind of fault happened: the seed's draws, and past the window the kinds still missing
    # (on CI's busy machine seed 77 once ended its window without a kill); the invariant is
    # checked inside
    for fault in ("workers killed", "tracking server outages", "PostgreSQL crashes"):
        assert found.get(fault, 0) >= 1, (fault, found)
    assert found["finished"] == 32
