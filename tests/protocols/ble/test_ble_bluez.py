"""The BlueZ advertiser over a real D-Bus bus (a private ``dbus-daemon``), against a stand-in
BlueZ (``bluez_standin``): rotation with the RPI, Timeout, withdrawal, and the privacy alarm
when the adapter turns discoverable or connectable."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from device_agent.radio import RadioStore
from protocols.ble import gaen
from protocols.ble.advert import EN_SERVICE_UUID128
from protocols.ble.bluez_radio import BlueZAdvertiser
from protocols.clock import RunClock

from .bluez_standin import PrivateBus, StandInBlueZ, dbus_daemon

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.skipif(dbus_daemon() is None, reason="no dbus-daemon on this machine")

SCALE = 1440.0  # an interval every 0.42 wall seconds
DAY0 = 20_000


def roller() -> gaen.KeyRoller:
    return gaen.KeyRoller(lambda start: start.to_bytes(16, "big"))  # test keys, not secrets


async def until(condition: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def scenario(directory: Path) -> dict[str, object]:
    bus = PrivateBus(directory)
    try:
        # a desktop left the adapter discoverable: the advertiser must notice and fix it
        bluez = StandInBlueZ(bus.address, discoverable=True)
        await bluez.start()
        client = await MessageBus(bus_address=bus.address).connect()
        clock = RunClock(sim_epoch=DAY0 * 86400.0, scale=SCALE, wall_epoch=time.time())
        keys = roller()
        heard: list[tuple[int, bytes]] = []
        adv = BlueZAdvertiser(
            client,
            keys,
            clock,
            gaen.encode_metadata(-8),
            on_broadcast=lambda e, r: heard.append((e, r)),
        )
        await adv.start()
        found_on = (adv.privacy_alarm, bluez.adapter._discoverable)
        stop = asyncio.Event()
        task = asyncio.create_task(adv.run(stop))
        await until(lambda: len(bluez.registrations) >= 2)
        bluez.adapter.turn("Connectable", True)  # someone turns it on mid-run
        await until(lambda: not bluez.adapter._connectable)
        await until(lambda: len(bluez.registrations) >= 4)
        stop.set()
        await task
        on_air_after_stop = len(bluez.active())
        # a crash: one advertisement registered, never withdrawn; its Timeout takes it off
        crashed = BlueZAdvertiser(client, roller(), clock, gaen.encode_metadata(-8))
        await crashed.start()
        await crashed.rotate(clock.now())
        await until(lambda: bluez.releases, timeout_s=crashed.timeout_s + 3.0)
        return {
            "bluez": bluez,
            "adv": adv,
            "keys": keys,
            "heard": heard,
            "found_on": found_on,
            "on_air_after_stop": on_air_after_stop,
            "crashed_timeout": crashed.timeout_s,
        }
    finally:
        bus.close()


def test_bluez_advertiser_rotates_withdraws_and_raises_the_privacy_alarm(tmp_path: Path) -> None:
    out = asyncio.run(asyncio.wait_for(scenario(tmp_path), 30))
    bluez, adv, keys = out["bluez"], out["adv"], out["keys"]
    assert isinstance(bluez, StandInBlueZ) and isinstance(adv, BlueZAdvertiser)
    # found discoverable at start: alarm raised and the setting turned off
    assert out["found_on"] == (True, False)
    # turned connectable mid-run: alarmed again and turned off again
    assert adv.privacy_alarms >= 2 and not bluez.adapter._connectable
    regs = bluez.registrations[: len(out["heard"])]  # type: ignore[arg-type]
    assert len(regs) >= 4
    for reg, (enin, rpi) in zip(regs, out["heard"], strict=True):  # type: ignore[call-overload]
        props = reg.properties
        assert props["Type"] == "broadcast" and props["ServiceUUIDs"] == [EN_SERVICE_UUID128]
        data = props["ServiceData"][EN_SERVICE_UUID128].value
        expected_rpi, _ = keys.identifiers_at(enin * 600.0, gaen.encode_metadata(-8))
        assert data[:16] == rpi == expected_rpi and len(data) == 20
        # a little more than one interval (0.42 s wall here): a crashed radio goes quiet
        assert props["Timeout"] == adv.timeout_s == 2
    # one RPI per interval, each its own registration, never two on the air at once
    enins = [e for e, _ in out["heard"]]  # type: ignore[union-attr]
    assert enins == sorted(set(enins)) and all(b == a + 1 for a, b in itertools.pairwise(enins))
    for earlier, later in itertools.pairwise(regs):
        assert earlier.removed is not None and earlier.removed <= later.registered
        assert earlier.how == "unregistered"
    assert out["on_air_after_stop"] == 0  # stop withdrew the last one
    # the crashed advertiser's registration was removed by its Timeout, and released
    assert bluez.releases and bluez.registrations[-1].how == "timeout"


async def radio_process(directory: Path) -> tuple[int, str, str, StandInBlueZ]:
    bus = PrivateBus(directory)
    try:
        bluez = StandInBlueZ(bus.address)
        await bluez.start()
        start = time.time() + 3.0
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "decentsim", "device-agent", "radio", "--radio", "bluez",
            "--dbus-address", bus.address, "--state-dir", str(directory / "pilot"),
            "--stop-at-s", "1800", "--scan-window-s", "0.05", "--scan-interval-s", "0.2",
            "--clock-scale", str(SCALE), "--sim-epoch", str(DAY0 * 86400.0),
            "--wall-epoch", str(start), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode(), bluez
    finally:
        bus.close()


def test_device_agent_radio_advertises_through_bluez(tmp_path: Path) -> None:
    """``device-agent radio --radio bluez``, a real process on the bus: it advertises one
    registration per interval and withdraws the last; its TEKs stay in its store."""
    status, out, err, bluez = asyncio.run(radio_process(tmp_path))
    assert status == 0, err
    health = json.loads(out.strip().splitlines()[-1])
    assert health["broadcasts"] >= 4 and health["privacy_alarm"] is False
    assert len(bluez.registrations) == health["broadcasts"] and not bluez.active()
    # the registered RPIs are the device's own, from the TEKs in its private store
    store = RadioStore(tmp_path / "pilot")
    own = {bytes(r) for k in store.teks() for r in k.all_rpis()}
    sent = {r.properties["ServiceData"][EN_SERVICE_UUID128].value[:16] for r in bluez.registrations}
    assert sent <= own
