"""Virtual link: bumble devices on one in-process link; the project's scanner, through the
unmodified bleak API with the bumble backend, hears rotating beacons; scoring and matching work.

The virtual clock crosses a TEK rollover (intervals 142, 143 of one day, then 0 of the next), so
the scanner must see a new RPI *and* a new random address at every rotation, and matching must
attribute each RPI to the right advertiser's key of the right day.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

from protocols.ble import gaen
from protocols.ble.advert import EN_SERVICE_UUID128, encode_advert
from protocols.ble.scanner import ExposureScanner
from protocols.ble.scoring import match_keys, score
from protocols.ble.virtual_link import BumbleScannerBackend, VirtualAdvertiser, VirtualLink
from protocols.clock import RunClock

DAY0 = 2642976  # the published test vectors' day (rolling start)
T0 = (DAY0 + 142) * gaen.EN_INTERVAL_SECONDS + 5.0  # interval 142: two rotations to the next day
INTERVALS = [DAY0 + 142, DAY0 + 143, DAY0 + 144]


class RecordingScanner(ExposureScanner):
    """The project's scanner, also noting which BLE address sent which RPI (test only)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.addresses: dict[bytes, set[str]] = {}

    def on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        data = adv.service_data.get(EN_SERVICE_UUID128, b"")
        self.addresses.setdefault(bytes(data[:16]), set()).add(device.address)
        super().on_advertisement(device, adv)


def roller(tag: int) -> gaen.KeyRoller:
    """A deterministic key schedule per advertiser (test keys, not secrets)."""
    return gaen.KeyRoller(lambda start: bytes([tag]) + start.to_bytes(15, "big"))


@dataclass
class Outcome:
    scanners: list[RecordingScanner]
    rollers: dict[str, gaen.KeyRoller]
    payloads: list[bytes] = field(default_factory=list)


async def scenario() -> Outcome:
    link = VirtualLink()
    devs = {n: await link.add_device(n) for n in ("a", "b", "v2", "bad", "scan-0", "scan-1")}
    rollers = {"a": roller(1), "b": roller(2), "v2": roller(3)}
    meta = gaen.encode_metadata(-8)
    adv = {
        "a": VirtualAdvertiser(devs["a"], rollers["a"], meta, interval_ms=20),
        "b": VirtualAdvertiser(devs["b"], rollers["b"], meta, interval_ms=20),
        # A future protocol version 2.0: only a scanner holding its key can tell.
        "v2": VirtualAdvertiser(devs["v2"], rollers["v2"], bytes([0x80, 0xF8, 0, 0]), 20),
    }
    bad = VirtualAdvertiser(devs["bad"], rollers["a"], meta, interval_ms=20)
    now = [T0]

    def aemk_for_rpi(rpi: bytes) -> bytes | None:
        # The scanner knows these keys (its contacts' published keys, in GAEN terms).
        for r in rollers.values():
            for key in r.retained_keys():
                if bytes(rpi) in {bytes(x) for x in key.all_rpis()}:
                    return key.aemk
        return None

    scanners = [
        RecordingScanner(
            observer=i,
            scan_window_s=0.15,
            scan_interval_s=240.0,
            backend=BumbleScannerBackend,
            backend_kwargs={"bumble_device": devs[f"scan-{i}"]},
            clock=RunClock(wall=lambda: now[0]),
            aemk_for_rpi=aemk_for_rpi if i == 0 else None,
        )
        for i in range(2)
    ]
    out = Outcome(scanners, rollers)
    # Malformed: 0xFD6F service data one byte short.
    short = encode_advert(bytes(16), bytes(4))[:-1].replace(b"\x17\x16", b"\x16\x16", 1)
    await bad.broadcast_at(T0, payload=short)
    for k in range(3):  # the virtual clock moves one interval per round: every beacon rotates
        now[0] = T0 + gaen.EN_INTERVAL_SECONDS * k
        for name in ("a", "b", "v2"):
            payload = await adv[name].broadcast_at(now[0])
            if name == "a":
                out.payloads.append(payload)
        await asyncio.gather(*(s.scan_once() for s in scanners))
    for a in (*adv.values(), bad):
        await a.stop()
    return out


def test_rotating_beacons_heard_over_bumble_link() -> None:
    out = asyncio.run(asyncio.wait_for(scenario(), 20))
    s0, s1 = out.scanners
    assert len(set(out.payloads)) == 3
    h0, h1 = s0.health(), s1.health()
    assert h0["scans_completed"] == h1["scans_completed"] == 3
    assert h0["accepted"] > 0 and h1["accepted"] > 0
    assert h0["rejected"].get("WrongLength", 0) > 0  # malformed adverts counted, scan survived
    assert h1["rejected"].get("WrongLength", 0) > 0
    # Version 2.0 metadata is rejected only where the key is known; elsewhere it is opaque.
    assert h0["rejected"].get("BadVersion", 0) > 0 and "BadVersion" not in h1["rejected"]

    keys = {
        (name, day): r.key_for(DAY0 + 144 * day)
        for name, r in out.rollers.items()
        for day in (0, 1)
    }
    a_rpis = [gaen.rpi(keys[("a", e >= DAY0 + 144)].rpik, e) for e in INTERVALS]
    b_rpis = [gaen.rpi(keys[("b", e >= DAY0 + 144)].rpik, e) for e in INTERVALS]
    v2_rpis = [gaen.rpi(keys[("v2", e >= DAY0 + 144)].rpik, e) for e in INTERVALS]

    # Rotation reaches the scanner: a new RPI per interval, each from its own random address,
    # a non-resolvable private address (two top bits 00), never reused across rotations.
    a_addresses = [s1.addresses[r] for r in a_rpis]
    assert all(len(addrs) == 1 for addrs in a_addresses)
    flat = [next(iter(addrs)) for addrs in a_addresses]
    assert len(set(flat)) == 3
    assert all(int(addr.split(":")[0], 16) >> 6 == 0 for addr in flat)

    for scanner, expect_v2 in ((s0, False), (s1, True)):
        trace = score(scanner.log.to_sightings())
        heard = [bytes(r) for r in trace.rpi]
        expected = a_rpis + b_rpis + (v2_rpis if expect_v2 else [])
        assert sorted(heard) == sorted(expected)
        # RSSI -50 dBm from bumble, TX -8 dBm: 42 dB, closest bucket; one 240 s scan per RPI.
        np.testing.assert_allclose(trace.weight, 240 / 900)
        order = [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("v2", 0), ("v2", 1)]
        matched = match_keys(trace.rpi, trace.interval, [keys[k] for k in order])
        owner = {
            r: (name, INTERVALS[i])
            for name, rs in (("a", a_rpis), ("b", b_rpis), ("v2", v2_rpis))
            for i, r in enumerate(rs)
        }
        for rpi, m, interval in zip(heard, matched.tolist(), trace.interval.tolist(), strict=True):
            name, day = order[m]
            assert (name, interval) == owner[rpi]  # the right advertiser, heard when broadcast
            assert day == (interval >= DAY0 + 144)  # matched to its key of the right day
