"""The pilot radio's private store, and the radio when its controller is not there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.radio import RadioStore
from device_agent.store import TRACE_RETENTION_DAYS
from protocols.ble.proximity import ProximitySchedule, ScheduleError
from protocols.ble.sightings import Sightings

ROOT = Path(__file__).resolve().parents[2]
DAY_S = 86400.0


def sightings(rpis: list[bytes], t: float, scan: int) -> Sightings:
    n = len(rpis)
    return Sightings(
        observer=np.zeros(n, np.int64),
        beacon=np.arange(n, dtype=np.int64),
        rpis=np.frombuffer(b"".join(rpis), np.uint8).reshape(n, 16).copy(),
        rssi=np.full(n, -50.0),
        tx_power=np.full(n, -8.0),
        time=np.full(n, t),
        scan=np.full(n, scan, np.int64),
        seconds=np.full(n, 240.0),
    )


def test_a_tek_is_kept_before_use_and_survives_a_restart(tmp_path: Path) -> None:
    store = RadioStore(tmp_path)
    tek = store.tek(144 * 20_000)
    assert len(tek) == 16 and store.tek(144 * 20_000) == tek
    store.db.close()
    again = RadioStore(tmp_path)  # a restarted radio advertises the same RPIs
    assert again.tek(144 * 20_000) == tek
    assert again.tek(144 * 20_001) != tek  # a new day, a new key
    assert [k.rolling_start_interval_number for k in again.teks()] == [144 * 20_000, 144 * 20_001]
    assert (tmp_path / "radio.sqlite3").stat().st_mode & 0o077 == 0


def test_scans_of_a_restarted_radio_do_not_merge_with_earlier_ones(tmp_path: Path) -> None:
    rpi = b"\x01" * 16
    store = RadioStore(tmp_path)
    store.add_sightings(sightings([rpi], 1000.0, scan=1))
    store.db.close()
    again = RadioStore(tmp_path)
    again.add_sightings(sightings([rpi], 1010.0, scan=1))  # the new session's first scan
    s = again.sightings(0.0, 2000.0)
    assert len(s) == 2 and s.scan.tolist() == [1, 2]  # two scans credit twice, not once
    assert len(again.sightings(1005.0, 2000.0)) == 1


def test_everything_older_than_the_retention_is_forgotten(tmp_path: Path) -> None:
    store = RadioStore(tmp_path)
    day0 = 20_000
    store.tek(144 * day0)
    store.add_broadcast(144 * day0 + 5)
    store.add_sightings(sightings([b"\x02" * 16], day0 * DAY_S + 60.0, scan=1))
    store.prune((day0 + TRACE_RETENTION_DAYS) * DAY_S)  # 14 days later: still kept
    assert len(store.teks()) == 1 and len(store.sightings(0, 1e12)) == 1
    store.prune((day0 + TRACE_RETENTION_DAYS + 1) * DAY_S + 120.0)
    assert store.teks() == [] and len(store.sightings(0, 1e12)) == 0
    assert store.broadcasts(0, 2**32).size == 0


def test_a_radio_with_no_controller_fails_naming_it(tmp_path: Path) -> None:
    """Nothing listens at the transport: exit 1, one line naming --hci, no traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", "device-agent", "radio",
         "--hci", "tcp-client:127.0.0.1:1", "--state-dir", str(tmp_path / "r")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "--hci" in line and "cannot open the controller" in line


def test_a_schedule_names_distances_and_expected_weights(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(
        "# comment\nstart_s,end_s,a,b,distance_m\n0,900,1,0,1.0\n900,1800,0,1,8\n3600,4500,0,2,50\n"
    )
    s = ProximitySchedule.read(path)
    assert s.devices == [0, 1, 2]
    assert s.distance(0, 1, 100.0) == s.distance(1, 0, 100.0) == 1.0
    assert s.distance(0, 1, 1800.0) is None  # end is exclusive
    assert s.distance(0, 3, 0.0) is None and np.isnan(s.rssi(0, 3, 0.0))
    assert s.rssi(0, 1, 0.0) == -8.0 - 41.0  # the ideal radio's path loss at 1 m
    # 15 min in the closest bucket (1.0) + 15 min at 8 m (59 dB: 0.5); 50 m is out of buckets
    assert s.expected_weight(0, 1, 0.0, 86400.0) == pytest.approx(1.5)
    assert s.expected_weight(0, 1, 450.0, 900.0) == pytest.approx(0.5)
    assert s.expected_weight(0, 2, 0.0, 86400.0) == 0.0
    bad = tmp_path / "bad.csv"
    bad.write_text("start_s,end_s,a,b,distance_m\n0,900,1,1,1.0\n")
    with pytest.raises(ScheduleError, match=r"bad.csv:2: field b"):
        ProximitySchedule.read(bad)


def test_a_radio_thread_that_cannot_start_says_why(tmp_path: Path) -> None:
    """A transport bumble cannot parse stops the pilot's radio thread for good; the round loop
    learns why at its next flush instead of reading a day the radio never heard."""
    from device_agent.radio import RadioConfig, RadioThread
    from protocols.ble.pilot_radio import RadioUnavailable
    from protocols.clock import RunClock

    thread = RadioThread(RadioConfig("carrier-pigeon:1", tmp_path, RunClock()))
    thread.start()
    thread.stop()
    with pytest.raises(RadioUnavailable, match="carrier-pigeon"):
        thread.flush()
