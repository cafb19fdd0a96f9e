"""Calibrating a pilot's radio without hardware: the radio hub makes two pilots' radios read
6 dB low (``--rx-offset``), as real radios differ by several dB; a calibration session 1 m
from a reference device measures the correction, and a radio running with it reads true."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocols.ble.radio import DEFAULT_EPOCH

ROOT = Path(__file__).resolve().parents[2]
SCALE = 1440.0
SESSION_S = 3600.0  # one protocol hour, 2.5 wall seconds
#: everyone 1 m from everyone for the whole session
SCHEDULE = "start_s,end_s,a,b,distance_m\n0,3600,0,1,1\n0,3600,0,2,1\n0,3600,1,2,1\n"


def decentsim(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "decentsim", *argv],
        cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("calibration")
    (tmp / "schedule.csv").write_text(SCHEDULE)
    clock = ["--clock-scale", str(SCALE), "--sim-epoch", str(DEFAULT_EPOCH),
             "--wall-epoch", str(time.time() + 12.0)]  # fmt: skip
    # pilots 1 and 2 read 6 dB low; pilot 2 already runs with the +6 dB correction
    hub = decentsim(
        "radio-hub", "--schedule", str(tmp / "schedule.csv"), "--rx-offset", "1=-6",
        "--rx-offset", "2=-6", *clock,
    )  # fmt: skip
    try:
        assert hub.stdout is not None
        ports = json.loads(hub.stdout.readline())["ports"]
        radios = [
            decentsim(
                "device-agent",
                "radio",
                "--hci",
                f"tcp-client:127.0.0.1:{ports[str(a)]}",
                "--state-dir",
                str(tmp / f"pilot-{a}"),
                "--stop-at-s",
                str(SESSION_S),
                "--advertising-interval-ms",
                "20",
                "--scan-window-s",
                "0.05",
                "--scan-interval-s",
                str(240.0 / SCALE),
                *clock,
                *extra,
            )
            for a, extra in ((0, []), (1, []), (2, ["--rssi-correction-db", "6"]))
        ]
        for radio in radios:
            _, err = radio.communicate(timeout=120)
            assert radio.returncode == 0, err
    finally:
        hub.send_signal(signal.SIGTERM)
        hub.communicate(timeout=30)
    return tmp


def calibrate(state_dir: Path, *extra: str) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", "device-agent", "calibration",
         "--state-dir", str(state_dir), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_session_measures_the_correction_a_radio_needs(session: Path) -> None:
    reference = calibrate(session / "pilot-0")
    assert reference["packets"] >= 20
    assert reference["median_attenuation_db"] == 41.0 and reference["rssi_correction_db"] == 0.0
    low = calibrate(session / "pilot-1")  # reads 6 dB low: 47 dB at 1 m
    assert low["median_attenuation_db"] == 47.0 and low["rssi_correction_db"] == 6.0
    # a radio that runs with its correction reads true, and keeps the same correction
    corrected = calibrate(session / "pilot-2", "--rssi-correction-db", "6")
    assert corrected["median_attenuation_db"] == 41.0 and corrected["rssi_correction_db"] == 6.0


def test_too_few_packets_is_said_not_guessed(tmp_path: Path) -> None:
    from device_agent.radio import RadioStore

    RadioStore(tmp_path).db.close()  # an empty session
    done = subprocess.run(
        [sys.executable, "-m", "decentsim", "device-agent", "calibration",
         "--state-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "0 packet(s)" in done.stderr and "Traceback" not in done.stderr
