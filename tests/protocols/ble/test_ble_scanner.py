"""The bleak scanner: malformed adverts are counted, never raised; scans always stop; the
watchdog restarts a stalled scan; health reports the last scan."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from protocols.ble import gaen
from protocols.ble.advert import EN_SERVICE_UUID128
from protocols.ble.scanner import ExposureScanner
from protocols.ble.scoring import score

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

    def __init__(
        self, detection_callback: Any, service_uuids: Any, scanning_mode: str = "passive", **_: Any
    ) -> None:
        super().__init__(detection_callback, service_uuids)

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


def make(**kw: Any) -> ExposureScanner:
    times = iter(range(10_000))
    return ExposureScanner(
        scan_window_s=0.01,
        scan_interval_s=0.02,
        op_timeout_s=0.2,
        backend=FakeBackend,
        clock=lambda: 1_600_000_000.0 + next(times),
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
    with pytest.raises(ValueError, match="need 0 < scan_window_s <= scan_interval_s"):
        ExposureScanner(scan_window_s=5.0, scan_interval_s=1.0)
