"""Pilot radios without hardware: a radio hub process and four pilot radio processes.

Each pilot runs ``decentsim device-agent radio --hci tcp-client:…``: a real bumble host driving
the hub's virtual controller over TCP, the code path a pilot runs on a USB dongle, in a process
that cannot import server code (as on a device that installed ``decentsim[device]`` only). The
hub sets range and RSSI from a scripted proximity schedule. Two protocol hours at 1440×
straddle a TEK day, so keys, RPIs and addresses all roll. The test then reads each pilot's
private store (as a harness may after a run) and holds the recovered contact weights to the
schedule.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent.radio import RadioStore, day_trace
from protocols.ble import gaen
from protocols.ble.proximity import ProximitySchedule
from protocols.ble.scoring import match_keys, score
from tests.device_agent.test_device_install import SITECUSTOMIZE

ROOT = Path(__file__).resolve().parents[2]
SCALE = 1440.0  # a protocol day per wall minute
RUN_S = 7200.0  # two protocol hours
DAY0 = 20_000  # the TEK day the run ends in; it starts an hour before it
SIM_EPOCH = DAY0 * gaen.TEK_ROLLING_PERIOD * gaen.EN_INTERVAL_SECONDS - 3600.0
SCHEDULE = """\
start_s,end_s,a,b,distance_m
# 45 min at 1 m (closest bucket), across midnight
1800,4500,0,1,1.0
# 30 min at 8 m (59 dB: the 0.5 bucket)
3000,4800,1,2,8.0
# 30 min at 15 m (64.5 dB: the 0.25 bucket)
5100,6900,0,2,15.0
# device 3 is never near anyone
"""
PILOTS = [0, 1, 2, 3]
#: a scan credits one scan interval (240 protocol s); its phase against a contact's edges and
#: the RPI rotations moves a contact by up to one scan either way, plus a missed window or two
SCAN_WEIGHT = 240.0 / 900.0


def _decentsim(*argv: str, device_site: Path | None = None) -> subprocess.Popen[str]:
    """``decentsim ARGV`` as a process; with ``device_site``, one that cannot import what a
    pilot device does not install (the servers, the launcher, the audit and their packages)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device_site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(device_site), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "decentsim", *argv],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture(scope="module")
def pilot_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("pilots")
    schedule = tmp / "schedule.csv"
    schedule.write_text(SCHEDULE)
    device_site = tmp / "device-site"
    device_site.mkdir()
    (device_site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # after every process has started, on a loaded 2-core machine too
    wall_epoch = time.time() + 15.0
    clock = [
        "--clock-scale",
        str(SCALE),
        "--sim-epoch",
        str(SIM_EPOCH),
        "--wall-epoch",
        str(wall_epoch),
    ]
    hub = _decentsim(
        "radio-hub",
        "--schedule",
        str(schedule),
        "--agents",
        ",".join(map(str, PILOTS)),
        "--sniff",
        str(tmp / "sniff.json"),
        *clock,
    )
    try:
        assert hub.stdout is not None
        line = hub.stdout.readline()
        assert line, hub.stderr.read() if hub.stderr else "hub died"
        ports = {int(a): p for a, p in json.loads(line)["ports"].items()}
        pilots = {
            a: _decentsim(
                "device-agent",
                "radio",
                "--hci",
                f"tcp-client:127.0.0.1:{ports[a]}",
                "--state-dir",
                str(tmp / f"pilot-{a}"),
                "--stop-at-s",
                str(RUN_S),
                "--advertising-interval-ms",
                "20",
                "--scan-window-s",
                "0.05",
                "--scan-interval-s",
                str(240.0 / SCALE),
                *clock,
            )
            for a in PILOTS
        }
        health = {}
        for a, p in pilots.items():
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            health[a] = json.loads(out.strip().splitlines()[-1])
    finally:
        hub.send_signal(signal.SIGTERM)
        hub.communicate(timeout=30)
    assert hub.returncode == 0
    return {
        "tmp": tmp,
        "health": health,
        "schedule": ProximitySchedule.read(schedule),
        "sniff": json.loads((tmp / "sniff.json").read_text()),
    }


def _weights(tmp: Path) -> dict[tuple[int, int], float]:
    """Recovered weight per (observer, heard pilot): each store's trace, matched to the TEKs
    of every pilot (which only a harness reading the private stores can do)."""
    stores = {a: RadioStore(tmp / f"pilot-{a}") for a in PILOTS}
    keys = {a: stores[a].teks() for a in PILOTS}
    out: dict[tuple[int, int], float] = {}
    for a in PILOTS:
        trace = score(stores[a].sightings(0.0, 1e12))
        for b in PILOTS:
            hit = match_keys(trace.rpi, trace.interval, keys[b]) >= 0
            out[a, b] = float(trace.weight[hit].sum())
        assert out[a, a] == 0.0  # a device does not hear itself
    return out


def test_pilots_hear_the_schedule_through_the_hub(pilot_run: dict[str, object]) -> None:
    tmp, schedule = pilot_run["tmp"], pilot_run["schedule"]
    assert isinstance(tmp, Path) and isinstance(schedule, ProximitySchedule)
    weights = _weights(tmp)
    for a in PILOTS:
        for b in PILOTS:
            if a == b:
                continue
            expected = schedule.expected_weight(a, b, 0.0, RUN_S)
            got = weights[a, b]
            if expected == 0:
                assert got == 0.0, (a, b, got)  # never near: no contact at all
            else:
                bucket = expected * 900.0 / schedule_seconds(schedule, a, b)
                band = 0.15 * expected + 2 * SCAN_WEIGHT * bucket
                assert abs(got - expected) <= band, (a, b, got, expected, band)


def schedule_seconds(schedule: ProximitySchedule, a: int, b: int) -> float:
    """Seconds the pair is in range."""
    return sum(r.end_s - r.start_s for r in schedule.rows if (r.a, r.b) == (min(a, b), max(a, b)))


def test_every_address_carries_one_rpi(pilot_run: dict[str, object]) -> None:
    sniff = pilot_run["sniff"]
    assert isinstance(sniff, dict)
    address_rpis = sniff["address_rpis"]
    # every pilot broadcast ~12 intervals: ~48 addresses, each with exactly one RPI
    assert len(address_rpis) >= 4 * 10
    assert all(len(rpis) == 1 for rpis in address_rpis.values())
    # non-resolvable private addresses: the two top bits are 00
    assert all(int(address.split(":")[0], 16) >> 6 == 0 for address in address_rpis)


def test_keys_roll_at_midnight_and_stay_on_the_device(pilot_run: dict[str, object]) -> None:
    tmp, health = pilot_run["tmp"], pilot_run["health"]
    assert isinstance(tmp, Path) and isinstance(health, dict)
    for a in PILOTS:
        store = RadioStore(tmp / f"pilot-{a}")
        starts = [k.rolling_start_interval_number for k in store.teks()]
        assert starts == [(DAY0 - 1) * 144, DAY0 * 144]  # one TEK per day, both kept
        on_air = store.broadcasts((DAY0 - 1) * 144, (DAY0 + 1) * 144)
        assert on_air.min() < DAY0 * 144 and on_air.max() >= DAY0 * 144 + 5  # both days
        assert health[a]["healthy"] and health[a]["broadcasts"] >= 12
        assert os.stat(tmp / f"pilot-{a}" / "radio.sqlite3").st_mode & 0o077 == 0
    # the device's own trace of each day, as `device-agent trace` prints it
    store = RadioStore(tmp / "pilot-1")
    before, after = day_trace(store, SIM_EPOCH - 23 * 3600.0), day_trace(store, SIM_EPOCH + 3600.0)
    assert len(before) and len(after)
    np.testing.assert_allclose(
        before.weight.sum() + after.weight.sum(), score(store.sightings(0, 1e12)).weight.sum()
    )


def test_the_device_prints_its_own_trace(pilot_run: dict[str, object]) -> None:
    """``device-agent trace`` on the device: one line per heard RPI, then the day's total."""
    tmp = pilot_run["tmp"]
    assert isinstance(tmp, Path)
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", "device-agent", "trace",
         "--state-dir", str(tmp / "pilot-1"), "--day", str(DAY0)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    total = lines[-1]
    expected = day_trace(RadioStore(tmp / "pilot-1"), SIM_EPOCH + 3600.0)
    assert total == {"day": DAY0, "contacts": len(expected), "weight": float(expected.weight.sum())}
    assert [bytes.fromhex(e["rpi"]) for e in lines[:-1]] == [bytes(r) for r in expected.rpi]
    # a state dir without a radio store is bad input, named
    empty = subprocess.run(
        [sys.executable, "-m", "decentsim", "device-agent", "trace",
         "--state-dir", str(tmp / "nowhere"), "--day", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert empty.returncode == 2 and "no radio store there" in empty.stderr
    assert "Traceback" not in empty.stderr
