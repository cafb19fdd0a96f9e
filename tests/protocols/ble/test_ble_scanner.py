"""The bleak scanner: malformed adverts are counted, never raised; scans always stop; the
watchdog restarts a stalled scan; health reports the last scan."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.ble import gaen
from protocols.ble.advert import EN_SERVICE_UUID128
from protocols.ble.errors import ScannerConfigError
from protocols.ble.scanner import EN_OR_PATTERN, ExposureScanner
from protocols.ble.scoring import score
from protocols.clock import ClockError, RunClock

RPI = bytes(range(16))
KEY = bytes(16)


def adv(service_data: dict[str, bytes], uuids: list[str], rssi: int = -60) -> AdvertisementData:
    return AdvertisementData(None, {}, service_data, uuids, None, rssi, ())


GOOD = adv({EN_SERVICE_UUID128: RPI + b"\x01\x02\x03\x04"}, [EN_SERVICE_UUID128])
SCRIPT = [
    GOOD,
    adv({EN_SERVICE_UUID128: RPI + b"\x01\x02\x03"}, [EN_SERVICE_UUID128]),  # WrongLength
    adv({}, [EN_SERVICE_UUID128]),  # MissingServiceData
    adv({"0000feaa-0000-1000-8000-00805f9b34fb": b"x"}, ["0000feaa-0000-1000-8000-00805f9b34fb"]),
    GOOD,
]


class FakeBackend(BaseBleakScanner):
    """A bleak backend that replays a script of adverts; can hang or fail on start."""

    events: ClassVar[list[str]] = []
    mode: ClassVar[list[str]] = []
    created: ClassVar[list[dict[str, Any]]] = []

    def __init__(
        self, detection_callback: Any, service_uuids: Any, scanning_mode: str = "passive", **kw: Any
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        FakeBackend.created.append(
            {"service_uuids": service_uuids, "mode": scanning_mode, "bluez": kw.get("bluez")}
        )

    async def start(self) -> None:
        FakeBackend.events.append("start")
        behaviour = FakeBackend.mode.pop(0) if FakeBackend.mode else "ok"
        if behaviour == "hang":
            await asyncio.sleep(3600)
        if behaviour == "fail":
            raise BleakError("adapter went away")
        dev = BLEDevice("AA:BB:CC:DD:EE:FF", None, None)
        for a in SCRIPT:
            self.call_detection_callbacks(dev, a)

    async def stop(self) -> None:
        FakeBackend.events.append("stop")


@pytest.fixture(autouse=True)
def reset() -> None:
    FakeBackend.events = []
    FakeBackend.mode = []
    FakeBackend.created = []


def make(
    now: list[float] | None = None, clock: RunClock | None = None, **kw: Any
) -> ExposureScanner:
    times = iter(range(10_000))
    wall = (lambda: now[0]) if now else (lambda: 1_600_000_000.0 + next(times))
    return ExposureScanner(
        scan_window_s=0.01,
        scan_interval_s=0.02,
        op_timeout_s=0.2,
        backend=FakeBackend,
        clock=clock or RunClock(wall=wall),
        **kw,
    )


def test_malformed_adverts_counted_not_raised() -> None:
    scanner = make()
    asyncio.run(scanner.run(asyncio.Event(), max_scans=2))
    h = scanner.health()
    assert h["accepted"] == 4 and h["ignored"] == 2
    assert h["rejected"] == {"WrongLength": 2, "MissingServiceData": 2}
    assert h["scans_completed"] == 2 and h["last_scan_packets"] == 2
    assert FakeBackend.events == ["start", "stop", "start", "stop"]
    trace = score(scanner.log.to_sightings())  # 2 scans x 2 packets of one RPI, 52 dB -> bucket 0
    assert trace.entries() == [(RPI, trace.interval[0], 2 * 0.02 / 900)]


def test_stalled_and_failing_scans_restart_and_always_stop() -> None:
    FakeBackend.mode = ["hang", "fail", "ok"]
    scanner = make()
    asyncio.run(scanner.run(asyncio.Event(), max_scans=3))
    h = scanner.health()
    assert h["restarts"] == 2 and h["scans_completed"] == 1
    assert h["last_error"] == "BleakError: adapter went away"
    assert FakeBackend.events == ["start", "stop", "start", "stop", "start", "stop"]
    assert h["last_scan_ok"] is True and h["last_success"] == h["last_scan_ended"]


def test_health_turns_unhealthy_when_scans_keep_failing() -> None:
    now = [1_600_000_000.0]
    scanner = make(now)
    assert scanner.health()["healthy"] is False  # no scan completed yet
    asyncio.run(scanner.run(asyncio.Event(), max_scans=1))
    h = scanner.health()
    assert h["healthy"] is True and h["last_success"] == now[0] and h["last_scan_ok"] is True
    FakeBackend.mode = ["fail"]
    now[0] += 0.1
    asyncio.run(scanner.run(asyncio.Event(), max_scans=2))
    h = scanner.health()
    assert h["last_scan_ok"] is False and h["restarts"] == 1 and h["healthy"] is True
    now[0] += 0.3  # 0.4 s since the last success: still within 2 cycles + window + 2 timeouts
    assert scanner.health()["healthy"] is True
    now[0] += 0.1  # 0.5 s > 0.45 s
    assert scanner.health()["healthy"] is False


def test_a_scaled_clock_stamps_credits_and_ages_in_protocol_time() -> None:
    """A day a minute (scale 1440): sightings carry protocol timestamps and 1440× the wall
    scan interval as credited seconds, and health ages in protocol time, so a scanner that
    just scanned is healthy (with the duty cycle's wall seconds compared against protocol
    time it never was)."""
    wall = [1_000.0]
    clock = RunClock(
        sim_epoch=1_600_000_000.0, scale=1440.0, wall_epoch=1_000.0, wall=lambda: wall[0]
    )
    scanner = make(clock=clock)
    wall[0] += 0.01
    asyncio.run(scanner.run(asyncio.Event(), max_scans=1))
    s = scanner.log.to_sightings()
    assert s.seconds.tolist() == [0.02 * 1440.0] * 2
    assert s.time.tolist() == [1_600_000_000.0 + 0.01 * 1440.0] * 2
    h = scanner.health()
    assert h["healthy"] is True and h["last_success"] == 1_600_000_000.0 + 0.01 * 1440.0
    wall[0] += 0.44  # stale after 0.45 wall seconds, i.e. 648 protocol seconds
    assert scanner.health()["healthy"] is True
    wall[0] += 0.02
    assert scanner.health()["healthy"] is False
    # the trace credits protocol seconds: 2 scans' worth of packets in 900-second windows
    trace = score(s)
    assert trace.weight[0] > 0 and trace.interval[0] == gaen.en_interval_number(s.time[0])


def test_run_clock_refuses_bad_settings() -> None:
    for kw, field in (
        ({"scale": 0.0}, "scale"),
        ({"scale": float("nan")}, "scale"),
        ({"sim_epoch": -1.0}, "sim_epoch"),
        ({"wall_epoch": float("inf")}, "wall_epoch"),
    ):
        with pytest.raises(ClockError, match=field):
            RunClock(**kw)
    clock = RunClock(scale=60.0)
    assert clock.to_protocol(2.0) == 120.0 and clock.to_wall(120.0) == 2.0


def test_scanning_mode_sets_bleak_filters() -> None:
    asyncio.run(make().scan_once())
    asyncio.run(make(scanning_mode="active").scan_once())
    passive, active = FakeBackend.created
    assert passive["mode"] == "passive" and passive["service_uuids"] is None
    # BlueZ scans passively only with an advertisement monitor: AD 0x16 starting 6F FD.
    assert passive["bluez"] == {"or_patterns": [EN_OR_PATTERN]}
    assert tuple(EN_OR_PATTERN) == (0, 0x16, b"\x6f\xfd")
    assert active["mode"] == "active" and active["service_uuids"] == [EN_SERVICE_UUID128]
    with pytest.raises(ScannerConfigError, match="scanning_mode must be 'passive' or 'active'"):
        ExposureScanner(scanning_mode="both")  # type: ignore[arg-type]


def test_bad_version_counted_when_metadata_is_readable() -> None:
    aemk = gaen.aemk(KEY)
    good_aem = gaen.aem(aemk, RPI, gaen.encode_metadata(4))
    bad_aem = gaen.aem(aemk, RPI, bytes([0x80, 0, 0, 0]))
    scanner = make(aemk_for_rpi=lambda rpi: aemk if rpi == RPI else None)
    dev = BLEDevice("AA", None, None)
    scanner.on_advertisement(dev, adv({EN_SERVICE_UUID128: RPI + bad_aem}, []))
    scanner.on_advertisement(dev, adv({EN_SERVICE_UUID128: RPI + good_aem}, [], rssi=-40))
    assert scanner.health()["rejected"] == {"BadVersion": 1}
    s = scanner.log.to_sightings()
    assert s.tx_power.tolist() == [4.0] and s.rssi.tolist() == [-40.0]


def test_scanner_arguments_checked() -> None:
    with pytest.raises(ScannerConfigError, match="need 0 < scan_window_s <= scan_interval_s"):
        ExposureScanner(scan_window_s=5.0, scan_interval_s=1.0)
    with pytest.raises(ScannerConfigError, match="op_timeout_s must be > 0, got 0"):
        ExposureScanner(op_timeout_s=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([EN_SERVICE_UUID128, "0000feaa-0000-1000-8000-00805f9b34fb"]),
            st.one_of(st.none(), st.binary(max_size=30)),
        ),
        max_size=6,
    )
)
def test_callback_never_raises_and_counts_every_advert(items: list) -> None:
    scanner = make(aemk_for_rpi=lambda rpi: KEY if rpi[0] % 2 else None)
    dev = BLEDevice("AA", None, None)
    for uuid, data in items:
        scanner.on_advertisement(dev, adv({} if data is None else {uuid: data}, [uuid]))
    h = scanner.health()
    assert h["accepted"] + h["ignored"] + sum(h["rejected"].values()) == len(items)
    assert len(scanner.log) == h["accepted"]
