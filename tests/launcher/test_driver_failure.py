"""An unexpected failure inside the coordinator's round driver stops the run for good: the
coordinator exits non-zero with the reason in its log, the devices are told, and ``federated
run`` (the launcher) reports it within seconds instead of waiting for its timeout."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from launcher.federation import Federation, FederationError, make_spec


@pytest.mark.slow
def test_a_crashing_round_driver_fails_the_run_within_seconds(tmp_path: Path) -> None:
    spec = make_spec(
        "synthetic:200",
        4,
        population_seed=6,
        pools=1,
        seed=6,
        theta={"beta": 0.6, "mortality": 0.01, "init_frac": 0.05},
        step_timeout_s=20,
    )
    fed = Federation(tmp_path / "state", spec, 6)
    try:
        fed.start_servers()
        # The disk "fills up" for the days table: committing a day now fails inside the driver
        # with an error it has no recovery for. (The servers are up, so their schema exists;
        # the driver waits for the pool before its first round.)
        with sqlite3.connect(fed.c_dir / "coordinator.sqlite3") as db:
            db.execute(
                "CREATE TRIGGER full BEFORE INSERT ON days "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        fed.start_pool(0)
        start = time.monotonic()
        with pytest.raises(FederationError, match="database or disk is full") as failed:
            fed.wait(timeout_s=120)
        assert time.monotonic() - start < 30, "reported only at the step deadline or later"
        assert "the coordinator stopped the run" in str(failed.value)
        assert fed.procs["coordinator"].wait(timeout=30) == 1
        assert fed.procs["pool-0"].wait(timeout=30) != 0  # told the run failed, it stops
        log = (fed.c_dir / "coordinator.log").read_text()
        assert "the round driver failed" in log and "database or disk is full" in log
        assert "the run failed" in (fed.c_dir / "stderr.log").read_text()
        assert "the coordinator stopped the run" in (fed.pool_dirs[0] / "stderr.log").read_text()
    finally:
        fed.stop()


def test_a_server_identity_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    """The launcher creates both servers' identities side by side; one that fails is reported
    by its command and reason, after both have finished (nothing is left running)."""
    spec = make_spec("synthetic:50", 1, population_seed=1, pools=1, seed=1)
    fed = Federation(tmp_path / "state", spec, 1)
    fed.root.mkdir(parents=True)
    fed.c_dir.write_text("not a directory")  # the coordinator's state dir is a file
    try:
        with pytest.raises(FederationError, match=r"^decentsim coordinator tokens failed: ") as e:
            fed.start_servers()
        assert "aggregator init" not in str(e.value)
        assert (fed.a_dir / "export" / "ca.pem").exists()  # the other identity was created
        assert not fed.procs  # no server was started
    finally:
        fed.stop()
