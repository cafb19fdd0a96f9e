"""``decentsim radio-hub``: virtual Bluetooth controllers on loopback TCP, one per pilot, with
RSSI and range from a scripted proximity schedule (tests and demos without hardware).

Once listening it prints one JSON line ``{"ports": {"AGENT": PORT, ...}}`` on stdout; each pilot
then runs ``decentsim device-agent radio --hci tcp-client:127.0.0.1:PORT``. It stops on SIGTERM
or SIGINT (writing ``--sniff``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
from pathlib import Path

from decentsim.commands.clock import add_clock_arguments, clock_from_args
from decentsim.usage import CommandFailed, UsageError, agent_ids, nonnegative_int
from protocols.ble.hub import HubError, HubLink, RadioHub
from protocols.ble.proximity import ProximitySchedule, ScheduleError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``radio-hub``."""
    p.add_argument("--schedule", type=Path, required=True, help="proximity schedule (CSV)")
    p.add_argument(
        "--agents",
        type=agent_ids,
        help="pilot agent ids, comma-separated (default: every device the schedule names)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument(
        "--base-port",
        type=nonnegative_int,
        default=0,
        help="pilot i listens on BASE+i (default 0: any free ports, printed)",
    )
    p.add_argument("--noise-db", type=float, default=0.0, help="RSSI noise per packet (σ, dB)")
    p.add_argument("--loss", type=float, default=0.0, help="packet loss probability per pair")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of noise and loss")
    p.add_argument(
        "--rx-offset",
        action="append",
        default=[],
        metavar="AGENT=DB",
        help="that pilot's radio reads RSSI DB dB off (a device to calibrate); repeatable",
    )
    p.add_argument("--sniff", type=Path, help="write which address carried which RPI here")
    add_clock_arguments(p)


async def _serve(args: argparse.Namespace, hub: RadioHub) -> None:
    ports = None if args.base_port == 0 else [args.base_port + i for i in range(len(hub.agents))]
    bound = await hub.start(ports)
    print(json.dumps({"ports": {str(a): p for a, p in bound.items()}}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await hub.close()
        if args.sniff is not None:
            hub.write_sniff(args.sniff)


def run(args: argparse.Namespace) -> int:
    """Serve until stopped."""
    clock = clock_from_args(args)
    if not (math.isfinite(args.noise_db) and args.noise_db >= 0):
        raise UsageError(f"--noise-db must be a number >= 0 (dB), got {args.noise_db}")
    if not 0 <= args.loss < 1:
        raise UsageError(f"--loss must be a probability in [0, 1), got {args.loss}")
    try:
        schedule = ProximitySchedule.read(args.schedule)
    except ScheduleError as e:
        raise UsageError(f"--schedule: {e}") from None
    agents = args.agents if args.agents is not None else schedule.devices
    offsets: dict[int, float] = {}
    for item in args.rx_offset:
        agent, _, db = item.partition("=")
        try:
            offsets[int(agent)] = float(db)
        except ValueError:
            raise UsageError(f"--rx-offset {item!r}: expected AGENT=DB, e.g. 3=-6") from None
        if not math.isfinite(offsets[int(agent)]) or int(agent) not in agents:
            raise UsageError(f"--rx-offset {item!r}: not a finite offset of one of the pilots")
    try:
        hub = RadioHub(
            HubLink(
                schedule,
                clock,
                noise_db=args.noise_db,
                loss=args.loss,
                seed=args.seed,
                rx_offset_db=offsets,
            ),
            list(agents),
            host=args.host,
        )
    except HubError as e:
        raise UsageError(f"--agents: {e}") from None
    try:
        asyncio.run(_serve(args, hub))
    except HubError as e:
        raise CommandFailed(str(e)) from None
    sys.stdout.flush()
    return 0
