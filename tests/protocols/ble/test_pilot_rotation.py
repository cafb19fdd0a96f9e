"""A pilot radio under a scaled clock rotates exactly at protocol-time interval boundaries, and
takes a new TEK at protocol midnight (the radio hub's virtual controller, in process)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from protocols.ble import gaen
from protocols.ble.hub import HubLink, RadioHub
from protocols.ble.pilot_radio import BumbleRadio
from protocols.ble.proximity import ProximitySchedule
from protocols.clock import RunClock

SCALE = 1440.0  # an interval every 0.42 wall seconds
MIDNIGHT = 20_001 * 86400.0


async def broadcasts(schedule: Path) -> tuple[list[tuple[int, bytes, float]], gaen.KeyRoller]:
    # protocol time starts 2.5 intervals before midnight, half a second from now
    clock = RunClock(sim_epoch=MIDNIGHT - 1500.0, scale=SCALE, wall_epoch=time.time() + 0.5)
    hub = RadioHub(HubLink(ProximitySchedule.read(schedule), clock), [0])
    ports = await hub.start()
    teks: dict[int, bytes] = {}
    roller = gaen.KeyRoller(lambda start: teks.setdefault(start, start.to_bytes(16, "big")))
    seen: list[tuple[int, bytes, float]] = []
    radio = BumbleRadio(
        f"tcp-client:127.0.0.1:{ports[0]}", roller, clock, advertising_interval_ms=20,
        scan_window_s=0.05, scan_interval_s=0.1,
        on_broadcast=lambda enin, rpi: seen.append((enin, rpi, clock.now())),
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(radio.run(stop))
    await asyncio.sleep(0.5 + clock.to_wall(3000.0))  # until 2.5 intervals after midnight
    stop.set()
    await task
    await hub.close()
    return seen, roller


def test_rotation_on_protocol_boundaries_and_a_new_key_at_protocol_midnight(
    tmp_path: Path,
) -> None:
    schedule = tmp_path / "s.csv"
    schedule.write_text("start_s,end_s,a,b,distance_m\n0,1,0,1,1\n")
    seen, roller = asyncio.run(asyncio.wait_for(broadcasts(schedule), 30))
    midnight = int(MIDNIGHT // 600)
    enins = [e for e, _, _ in seen]
    # one broadcast per interval, in order, across midnight
    assert enins == list(range(enins[0], enins[-1] + 1))
    assert enins[0] <= midnight - 2 and enins[-1] >= midnight + 2
    for enin, rpi, at in seen[1:]:
        # a rotation happens right at its interval's start: within 90 protocol seconds
        # (60 ms of wall time at 1440x) of the boundary, never before it
        assert enin * 600 <= at < enin * 600 + 90, (enin, at - enin * 600)
        assert rpi == roller.key_for(enin).identifiers(enin, gaen.encode_metadata(-8))[0]
    before, after = roller.key_for(midnight - 1), roller.key_for(midnight)
    assert before.rolling_start_interval_number == midnight - 144
    assert after.rolling_start_interval_number == midnight and after.key != before.key
