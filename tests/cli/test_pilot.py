"""``decentsim pilot init|enrol|status`` in this process (a hybrid run's end-to-end test runs
``status`` on a finished run: tests/launcher/test_hybrid_run.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import numpy as np
import segno

from contract.runspec import RunSpec
from decentsim.cli import build_parser
from decentsim.commands import device_agent as device_agent_command
from identity.enrolment import EnrolmentRegistry
from identity.enrolment_uri import EnrolmentURI
from identity.pki import LocalCA
from protocols.ble.radio import DEFAULT_EPOCH
from protocols.clock import RunClock

from .conftest import Outcome

CA_NAME = "decentsim coordinator CA"


def test_pilot_init_writes_the_run_with_its_pilots_and_clock(
    cli: Callable[..., Outcome], tmp_path: Path
) -> None:
    run = tmp_path / "run.json"
    done = cli(
        "pilot", "init", "--population", "synthetic:50", "--pilots", "3,17", "--days", "14",
        "--start", "2027-01-04T08:00Z", "--round-at", "02:30", "--out", str(run),
    )  # fmt: skip
    assert done.status == 0, done.err
    spec = RunSpec.from_json(run.read_text())
    assert spec.pilots == (3, 17) and spec.days == 14 and spec.epochs == 1
    assert spec.round_at_s == 2.5 * 3600  # each day's round opens at 02:30 the next night
    assert spec.clock_scale == 1.0 and spec.clock_wall_epoch == 1799049600.0
    assert spec.clock().now() < DEFAULT_EPOCH  # before its start, the run is before day 0
    assert spec.advertising_intervals == 144 and spec.beacons_per_day == 288
    assert spec.pools == 2 + 2  # the coordinator waits for the pools and the two pilots
    assert json.loads(done.out)["pilots"] == [3, 17]
    bad = cli(
        "pilot", "init", "--population", "synthetic:50", "--pilots", "3,50", "--days", "1",
        "--start", "1799049600", "--out", str(run),
    )  # fmt: skip
    assert bad.status == 2 and "pilots [50]" in bad.error_line()
    naive = cli(
        "pilot", "init", "--population", "synthetic:50", "--pilots", "3", "--days", "1",
        "--start", "2027-01-04T08:00", "--out", str(run),
    )  # fmt: skip
    assert naive.status == 2 and "time zone" in naive.error_line()


def test_pilot_enrol_writes_a_bound_uri_and_its_qr_code(
    cli: Callable[..., Outcome], tmp_path: Path
) -> None:
    c = tmp_path / "C"
    assert cli("coordinator", "init", "--state-dir", str(c)).status == 0
    run = tmp_path / "run.json"
    init = ["pilot", "init", "--population", "synthetic:50", "--pilots", "3,17"]
    assert cli(*init, "--days", "2", "--start", "1799049600", "--out", str(run)).status == 0
    out = tmp_path / "enrol"
    done = cli(
        "pilot", "enrol", "--state-dir", str(c), "--run", str(run),
        "--coordinator", "pilot.example.org:7000", "--enrol", "pilot.example.org:7002",
        "--out", str(out),
    )  # fmt: skip
    assert done.status == 0, done.err
    assert [json.loads(line)["agent"] for line in done.out.splitlines()] == [3, 17]
    ca_pem = (c / "export" / "ca.pem").read_bytes()
    registry = EnrolmentRegistry(
        c / "enrolment.sqlite3", LocalCA.load_or_create(c / "pki", CA_NAME)
    )
    for agent in (3, 17):
        text = (out / f"pilot-{agent}.uri").read_text()
        uri = EnrolmentURI.parse(text)
        assert (uri.agent, uri.coordinator, uri.enrol) == (
            agent, "pilot.example.org:7000", "pilot.example.org:7002"
        )  # fmt: skip
        assert uri.ca_pem() == ca_pem  # the pinned CA is the coordinator's
        assert registry.label_of(uri.token) == f"pilot:{agent}"  # its token is bound to it
        for name in (f"pilot-{agent}.uri", f"pilot-{agent}.png"):
            assert (out / name).stat().st_mode & 0o077 == 0  # they hold the token
        # the PNG is the QR code of exactly that URI: its modules, read back from the pixels
        pixels = matplotlib.image.imread(out / f"pilot-{agent}.png")
        dark = (pixels[..., :3].mean(-1) if pixels.ndim == 3 else pixels) < 0.5
        expected = np.array(segno.make(text, error="m").matrix, dtype=bool)
        side = expected.shape[0]
        assert dark.shape == (4 * (side + 8), 4 * (side + 8))  # scale 4, a border of 4 modules
        np.testing.assert_array_equal(
            dark[16 : 16 + 4 * side : 4, 16 : 16 + 4 * side : 4], expected
        )
    registry.close()
    again = cli(
        "pilot", "enrol", "--state-dir", str(c), "--run", str(run), "--agents", "4",
        "--coordinator", "h:1", "--enrol", "h:2", "--out", str(out),
    )  # fmt: skip
    assert again.status == 2 and "not pilots of the run" in again.error_line()


def test_pilot_status_needs_a_coordinator_database(
    cli: Callable[..., Outcome], tmp_path: Path
) -> None:
    done = cli("pilot", "status", "--state-dir", str(tmp_path))
    assert done.status == 2 and "no coordinator database" in done.error_line()


def test_a_calibration_profile_travels_in_the_uri_to_the_radio(
    cli: Callable[..., Outcome], tmp_path: Path
) -> None:
    """``pilot enrol --calibration``: each pilot's TX power and RSSI correction go into its
    URI; the device's radio runs with them unless an option overrides one."""
    c, run, out = tmp_path / "C", tmp_path / "run.json", tmp_path / "enrol"
    assert cli("coordinator", "init", "--state-dir", str(c)).status == 0
    init = ["pilot", "init", "--population", "synthetic:50", "--pilots", "3,17", "--days", "1"]
    assert cli(*init, "--start", "1799049600", "--out", str(run)).status == 0
    cal = tmp_path / "cal.csv"
    cal.write_text("agent,tx_power_dbm,rssi_correction_db\n3,-4,6.5\n")
    enrol = ["pilot", "enrol", "--state-dir", str(c), "--run", str(run), "--coordinator", "h:1"]
    done = cli(*enrol, "--enrol", "h:2", "--calibration", str(cal), "--out", str(out))
    assert done.status == 0, done.err
    three = EnrolmentURI.parse((out / "pilot-3.uri").read_text())
    seventeen = EnrolmentURI.parse((out / "pilot-17.uri").read_text())
    assert (three.tx_power_dbm, three.rssi_correction_db) == (-4, 6.5)
    assert (seventeen.tx_power_dbm, seventeen.rssi_correction_db) == (None, None)

    def radio_of(*extra: str) -> tuple[int, float]:
        words = ["device-agent", "run", "--enrolment-uri", str(out / "pilot-3.uri")]
        words += ["--state-dir", str(tmp_path / "dev"), "--population", "synthetic:50"]
        words += ["--radio", "bumble", "--hci", "usb:0", *extra]
        args = build_parser(words).parse_args(words)
        device_agent_command._from_enrolment_uri(args)
        config = device_agent_command._radio_config(args, RunClock())
        return config.tx_power_dbm, config.rssi_correction_db

    assert radio_of() == (-4, 6.5)
    assert radio_of("--rssi-correction-db", "2") == (-4, 2.0)
    # a bad profile names its line and field
    cal.write_text("agent,tx_power_dbm,rssi_correction_db\n3,-4,6.5\n17,loud,0\n")
    bad = cli(*enrol, "--enrol", "h:2", "--calibration", str(cal), "--out", str(out))
    assert bad.status == 2 and "cal.csv:3: field tx_power_dbm" in bad.error_line()
    cal.write_text("agent,tx_power_dbm,rssi_correction_db\n4,-4,6.5\n")
    bad = cli(*enrol, "--enrol", "h:2", "--calibration", str(cal), "--out", str(out))
    assert bad.status == 2 and "4 is not a pilot of the run" in bad.error_line()
