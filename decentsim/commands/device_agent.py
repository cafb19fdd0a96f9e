"""``decentsim device-agent``: one device-pool process (a phone is a pool of one), and a pilot
device's radio (``radio``: advertise and scan on a Bluetooth controller; ``trace``: the
device's own contact trace of a day, printed on the device)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from pathlib import Path

from contract.runspec import RunSpecError
from contract.schedule import ScheduleError, parse_slice
from decentsim.commands.clock import add_clock_arguments, clock_from_args
from decentsim.usage import (
    CommandFailed,
    UsageError,
    agent_ids,
    float_in,
    int_in,
    nonnegative_int,
    positive_float,
)
from device_agent.agent import AgentConfig, AgentError
from device_agent.agent import run_agent as run_pool
from device_agent.radio import (
    CalibrationError,
    RadioConfig,
    RadioStore,
    calibration,
    day_trace,
    run_radio,
)
from identity.enrolment_uri import EnrolmentURI, EnrolmentURIError
from protocols.ble import gaen
from protocols.ble.errors import BleError
from protocols.ble.pilot_radio import RadioUnavailable
from protocols.ble.radio import NOMINAL_TX_POWER_DBM
from protocols.clock import RunClock
from sim.populations import PopulationError
from storage.sqlite import StoreError
from transport.grpc.channels import InsecureAddressError, warn_insecure

#: the physical radios a pilot may run
RADIOS = ("bumble", "bluez")


def pool_slice(text: str) -> tuple[int, int]:
    """An argparse type: ``I/P``, this pool's share of the agents."""
    try:
        return parse_slice(text)
    except ScheduleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    """``device-agent run``."""
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="enrol (first time), then follow the coordinator's rounds")
    run.add_argument(
        "--enrolment-uri",
        type=Path,
        help="a pilot: the file holding its enrolment URI (decentsim pilot enrol), which gives "
        "the coordinator, the enrolment endpoint, the token, the pilot agent and the pinned CA",
    )
    run.add_argument("--coordinator", help="HOST:PORT of the coordinator")
    run.add_argument("--ca", type=Path, help="the coordinator's CA certificate")
    run.add_argument("--state-dir", type=Path, required=True, help="the pool's private store")
    run.add_argument("--enrol", help="HOST:PORT of the coordinator's enrolment endpoint")
    run.add_argument("--token", help="single-use enrolment token (first start only)")
    run.add_argument("--token-file", type=Path, help="read the token from this file")
    run.add_argument(
        "--population", required=True, help="synthetic:N or a directory (this pool's data)"
    )
    run.add_argument(
        "--population-seed", type=nonnegative_int, default=0, help="seed of synthetic:N"
    )
    run.add_argument(
        "--slice",
        type=pool_slice,
        default=(0, 1),
        metavar="I/P",
        help="this pool's share of the agents: the I-th of P (default 0/1)",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="DEBUGGING ONLY: no TLS (the coordinator must run --insecure too)",
    )
    run.add_argument(
        "--world-secret",
        type=Path,
        help="file with the simulated world's beacon secret (simulated radio)",
    )
    run.add_argument(
        "--pilots",
        type=agent_ids,
        default=(),
        help="a run with pilots: the pilot agents (comma-separated), which this simulated "
        "pool's slice leaves out",
    )
    run.add_argument(
        "--pilot-agent",
        type=nonnegative_int,
        help="this device is that pilot agent, with a physical radio (needs --radio bumble)",
    )
    run.add_argument(
        "--radio",
        choices=RADIOS,
        help="a pilot's physical radio: bumble on the controller --hci names, or BlueZ's "
        "adapter --adapter over D-Bus",
    )
    _add_radio_options(run)
    run.set_defaults(profile=(None, None))  # an enrolment URI may carry one
    radio = sub.add_parser(
        "radio", help="advertise and scan Exposure Notification beacons on a Bluetooth controller"
    )
    radio.add_argument("--state-dir", type=Path, required=True, help="the device's private store")
    radio.add_argument("--radio", choices=RADIOS, default="bumble", help="bumble or bluez")
    _add_radio_options(radio)
    radio.set_defaults(profile=(None, None))
    radio.add_argument(
        "--stop-at-s",
        type=positive_float,
        help="stop at this protocol second since --sim-epoch (default: run until stopped)",
    )
    add_clock_arguments(radio)
    _add_trace_arguments(sub)
    cal = sub.add_parser(
        "calibration",
        help="the RSSI correction of this device, from a session 1 m from a reference device",
    )
    cal.add_argument("--state-dir", type=Path, required=True, help="the session's radio store")
    cal.add_argument(
        "--rssi-correction-db",
        type=float_in(-40.0, 40.0),
        default=0.0,
        help="the correction the session's radio ran with (default 0)",
    )
    cal.add_argument(
        "--reference-attenuation-db",
        type=positive_float,
        default=41.0,
        help="the attenuation a calibrated pair reads at 1 m (default 41, the radios' model)",
    )


def _add_radio_options(p: argparse.ArgumentParser) -> None:
    """The physical radio's controller and timing (wall-clock: radio timing)."""
    p.add_argument(
        "--hci",
        help="--radio bumble: the controller's bumble transport: usb:0 (a USB dongle), "
        "hci-socket:0, tcp-client:HOST:PORT (a radio hub's virtual controller)",
    )
    p.add_argument(
        "--adapter", default="hci0", help="--radio bluez: BlueZ's adapter (default hci0)"
    )
    p.add_argument(
        "--dbus-address",
        help="--radio bluez: the D-Bus bus of BlueZ (default: the system bus)",
    )
    p.add_argument(
        "--tx-power-dbm",
        type=int_in(-127, 20),
        help="calibration: the TX power the device advertises (dBm; default: its enrolment "
        "URI's, else the nominal -8)",
    )
    p.add_argument(
        "--rssi-correction-db",
        type=float_in(-40.0, 40.0),
        help="calibration: dB added to every RSSI measured (default: the enrolment URI's, else "
        "0; `device-agent calibration` measures it)",
    )
    p.add_argument(
        "--advertising-interval-ms",
        type=float_in(20.0, 10_240.0),
        default=250.0,
        help="advertising interval (wall ms, 20..10240; GAEN: 200-270)",
    )
    p.add_argument(
        "--scan-window-s", type=positive_float, default=4.0, help="scan length (wall seconds)"
    )
    p.add_argument(
        "--scan-interval-s",
        type=positive_float,
        default=240.0,
        help="one scan every this many wall seconds",
    )


def _add_trace_arguments(sub: argparse._SubParsersAction) -> None:
    trace = sub.add_parser("trace", help="this device's contact trace of a day (on the device)")
    trace.add_argument("--state-dir", type=Path, required=True, help="the device's private store")
    trace.add_argument(
        "--day",
        type=nonnegative_int,
        required=True,
        help="the protocol day (days since 1970-01-01 UTC, as the TEK's rolling start / 144)",
    )


def _read(flag: str, path: Path) -> bytes:
    """The contents of the file an option names."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {str(path)!r}: cannot read it ({e.strerror})") from None


def run_agent(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    if args.action == "radio":
        return _radio(args)
    if args.action == "trace":
        return _trace(args)
    if args.action == "calibration":
        return _calibration(args)
    return _run(args)


def _state_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--state-dir {str(path)!r}: cannot create it ({e.strerror})") from None


def _radio_config(
    args: argparse.Namespace, clock: RunClock, stop_at_s: float | None = None
) -> RadioConfig:
    # the calibration profile: an option given here, else the enrolment URI's, else nominal
    profile = args.profile
    tx = next((v for v in (args.tx_power_dbm, profile[0]) if v is not None), NOMINAL_TX_POWER_DBM)
    rssi = next((v for v in (args.rssi_correction_db, profile[1]) if v is not None), 0.0)
    if args.radio == "bumble" and args.hci is None:
        raise UsageError("--radio bumble needs --hci SPEC (the controller's bumble transport)")
    if args.radio == "bluez" and args.hci is not None:
        raise UsageError("--hci is bumble's; --radio bluez takes --adapter NAME")
    return RadioConfig(
        hci=args.hci or "",
        radio=args.radio,
        adapter=args.adapter,
        dbus_address=args.dbus_address,
        state_dir=args.state_dir,
        clock=clock,
        stop_at_s=stop_at_s,
        tx_power_dbm=tx,
        rssi_correction_db=rssi,
        advertising_interval_ms=args.advertising_interval_ms,
        scan_window_s=args.scan_window_s,
        scan_interval_s=args.scan_interval_s,
    )


def _radio(args: argparse.Namespace) -> int:
    """Advertise and scan until stopped (SIGTERM/SIGINT) or ``--stop-at-s``; print the health."""
    clock = clock_from_args(args)
    _state_dir(args.state_dir)
    logging.basicConfig(
        filename=args.state_dir / "radio.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = _radio_config(args, clock, args.stop_at_s)

    async def main() -> dict[str, object]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_radio(config, stop)

    try:
        health = asyncio.run(main())
    except BleError as e:  # the transport spec is not one bumble knows
        raise UsageError(f"--hci: {e}") from None
    except RadioUnavailable as e:  # nothing answers there, or it went away
        flag = "--hci" if args.radio == "bumble" else "--adapter"
        raise CommandFailed(f"{flag}: {e}") from None
    except (OSError, StoreError) as e:  # the device's store
        raise CommandFailed(f"--state-dir {str(args.state_dir)!r}: {e}") from None
    print(json.dumps(health, sort_keys=True))
    return 0


def _trace(args: argparse.Namespace) -> int:
    """Print the device's own trace of a day: one JSON line per heard RPI, then a total."""
    if not (args.state_dir / "radio.sqlite3").is_file():
        raise UsageError(f"--state-dir {str(args.state_dir)!r}: no radio store there")
    store = RadioStore(args.state_dir)
    day_start = args.day * gaen.TEK_ROLLING_PERIOD * gaen.EN_INTERVAL_SECONDS
    trace = day_trace(store, float(day_start))
    for rpi, interval, weight in zip(
        trace.rpi, trace.interval.tolist(), trace.weight.tolist(), strict=True
    ):
        print(json.dumps({"rpi": bytes(rpi).hex(), "interval": interval, "weight": weight}))
    total = float(trace.weight.sum())
    print(json.dumps({"day": args.day, "contacts": len(trace), "weight": total}))
    return 0


def _from_enrolment_uri(args: argparse.Namespace) -> None:
    """Fill the options an enrolment URI gives (it must be the only source of them); its CA
    is kept in the state dir as the pinned trust anchor."""
    given = [
        flag
        for flag, value in (
            ("--coordinator", args.coordinator),
            ("--enrol", args.enrol),
            ("--ca", args.ca),
            ("--token", args.token),
            ("--token-file", args.token_file),
            ("--pilot-agent", args.pilot_agent),
        )
        if value is not None
    ]
    if given:
        raise UsageError(f"--enrolment-uri gives {', '.join(given)}: pass one or the other")
    try:
        text = _read("--enrolment-uri", args.enrolment_uri).decode("ascii")
        uri = EnrolmentURI.parse(text)
    except (UnicodeDecodeError, EnrolmentURIError) as e:
        raise UsageError(f"--enrolment-uri {str(args.enrolment_uri)!r}: {e}") from None
    _state_dir(args.state_dir)
    ca = args.state_dir / "ca.pem"
    ca.write_bytes(uri.ca_pem())
    args.coordinator, args.enrol, args.ca = uri.coordinator, uri.enrol, ca
    args.token, args.pilot_agent = uri.token, uri.agent
    args.profile = (uri.tx_power_dbm, uri.rssi_correction_db)


def _calibration(args: argparse.Namespace) -> int:
    """Print the correction that makes the median attenuation at 1 m the reference."""
    if not (args.state_dir / "radio.sqlite3").is_file():
        raise UsageError(f"--state-dir {str(args.state_dir)!r}: no radio store there")
    try:
        result = calibration(
            RadioStore(args.state_dir), args.rssi_correction_db, args.reference_attenuation_db
        )
    except CalibrationError as e:
        raise CommandFailed(str(e)) from None
    print(json.dumps(result))
    return 0


def _run(args: argparse.Namespace) -> int:
    """Run the agent to the end of the run."""
    if args.enrolment_uri is not None:
        _from_enrolment_uri(args)
    for flag, value in (("--coordinator", args.coordinator), ("--ca", args.ca)):
        if value is None:
            raise UsageError(f"{flag} is required (or --enrolment-uri)")
    token = args.token
    if args.token_file is not None:
        try:
            token = _read("--token-file", args.token_file).decode("ascii").strip()
        except UnicodeDecodeError:
            raise UsageError(
                f"--token-file {str(args.token_file)!r}: not a token (tokens are ASCII text)"
            ) from None
    world = _read("--world-secret", args.world_secret) if args.world_secret is not None else None
    _read("--ca", args.ca)  # the agent reads it once enrolled; a wrong path is bad input now
    _state_dir(args.state_dir)
    logging.basicConfig(
        filename=args.state_dir / "agent.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.insecure:
        warn_insecure("device-agent")
    if args.pilot_agent is not None and args.radio is None:
        raise UsageError("--pilot-agent needs --radio bumble|bluez (a pilot's own radio)")
    if args.radio is not None and args.pilot_agent is None:
        raise UsageError("--radio is a pilot's: give --pilot-agent ID (or --enrolment-uri)")
    if args.pilot_agent is not None and args.pilots:
        raise UsageError("--pilots is for simulated pools; a pilot gives --pilot-agent only")
    config = AgentConfig(
        coordinator=args.coordinator,
        state_dir=args.state_dir,
        ca_pem=args.ca,
        population=args.population,
        population_seed=args.population_seed,
        slice=args.slice,
        token=token,
        enrol_address=args.enrol,
        world_secret=world,
        pilots=args.pilots,
        pilot_agent=args.pilot_agent,
        # the run's clock replaces this one once the coordinator says which run it is
        radio=None if args.radio is None else _radio_config(args, RunClock()),
        insecure=args.insecure,
    )
    try:
        run_pool(config)
    except PopulationError as e:
        raise UsageError(f"--population: {e}") from None
    except InsecureAddressError as e:  # names the option (--coordinator, --enrol)
        raise UsageError(str(e)) from None
    # the enrolment, the coordinator or the run failed (each names why), or the pool's store
    except (AgentError, RunSpecError, ScheduleError, OSError) as e:
        raise CommandFailed(str(e)) from None
    except RadioUnavailable as e:  # a pilot's radio stopped for good (names why)
        raise CommandFailed(f"--{'hci' if args.radio == 'bumble' else 'adapter'}: {e}") from None
    return 0
