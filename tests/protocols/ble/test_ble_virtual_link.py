"""Virtual link: bumble devices on one in-process link; the project's scanner, through the
unmodified bleak API with the bumble backend, hears rotating beacons; scoring and matching work."""

from __future__ import annotations

import asyncio

import numpy as np

from protocols.ble import gaen
from protocols.ble.advert import encode_advert
from protocols.ble.scanner import ExposureScanner
from protocols.ble.scoring import match_keys, score
from protocols.ble.virtual_link import BumbleScannerBackend, VirtualAdvertiser, VirtualLink

T0 = 1585785600.0 + 3 * 600  # interval 3 of the published test vectors' day


def test_rotating_beacons_heard_over_bumble_link() -> None:
    async def scenario() -> tuple[ExposureScanner, gaen.KeyRoller, list[bytes], dict]:
        link = VirtualLink()
        adv_dev, bad_dev = await link.add_device("adv"), await link.add_device("bad")
        scan_a, scan_b = await link.add_device("scan-a"), await link.add_device("scan-b")
        roller = gaen.KeyRoller(lambda start: start.to_bytes(16, "big"))
        advertiser = VirtualAdvertiser(adv_dev, roller, gaen.encode_metadata(-8), interval_ms=20)
        bad = VirtualAdvertiser(bad_dev, roller, b"", interval_ms=20)
        now = [T0]
        scanners = [
            ExposureScanner(
                observer=i,
                scan_window_s=0.15,
                scan_interval_s=240.0,
                backend=BumbleScannerBackend,
                backend_kwargs={"bumble_device": dev},
                clock=lambda: now[0],
            )
            for i, dev in enumerate((scan_a, scan_b))
        ]
        payloads = []
        # Malformed: 0xFD6F service data one byte short.
        await bad.broadcast_at(
            T0, payload=encode_advert(bytes(16), bytes(4))[:-1].replace(b"\x17\x16", b"\x16\x16", 1)
        )
        for k in range(3):  # three intervals: the beacon rotates each time
            now[0] = T0 + 600 * k
            payloads.append(await advertiser.broadcast_at(now[0]))
            await asyncio.gather(*(s.scan_once() for s in scanners))
        await advertiser.stop()
        await bad.stop()
        return scanners[0], roller, payloads, scanners[1].health()

    scanner, roller, payloads, other_health = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert len(set(payloads)) == 3
    h = scanner.health()
    assert h["scans_completed"] == 3 and h["accepted"] > 0 and other_health["accepted"] > 0
    assert h["rejected"].get("WrongLength", 0) > 0  # malformed adverts counted, scan survived
    trace = score(scanner.log.to_sightings())
    key = roller.key_for(gaen.en_interval_number(T0))
    expected = [bytes(r) for r in key.all_rpis()[3:6]]
    assert [bytes(r) for r in trace.rpi] == expected  # first heard first
    # RSSI -50 dBm from bumble, TX -8 dBm: 42 dB, closest bucket; one 240 s scan per RPI.
    np.testing.assert_allclose(trace.weight, 240 / 900)
    assert match_keys(trace.rpi, trace.interval, [key]).tolist() == [0, 0, 0]
