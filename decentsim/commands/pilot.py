"""``decentsim pilot``: the operator's side of a run with pilot devices.

    decentsim pilot init --population DIR --pilots 3,17 --days 14 --start 2027-01-04T08:00Z \\
        --out run.json
    decentsim pilot enrol --state-dir C --run run.json --coordinator HOST:7000 \\
        --enrol HOST:7002 --out enrol/      # one URI + QR code per pilot
    decentsim pilot status --state-dir C [--json]

``init`` writes the run spec (the population's N agents, the K pilot agents, the schedule and
the run clock); the coordinator serves it (``coordinator serve --run run.json``). ``enrol``
mints one single-use token per pilot agent, bound to it, and writes the pilot's enrolment URI
(coordinator, enrolment endpoint, token, agent and the pinned CA: see
:mod:`identity.enrolment_uri`) as a file and a QR-code PNG, both ``0600`` (they hold the token).
``status`` reads the coordinator's database: which pilots are enrolled, when each was last
heard from, its clock skew, the last round it completed and its health. It shows no count of
beacons or contacts per device: those say how social a person is.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import segno

from contract.runspec import RunSpec, RunSpecError
from decentsim.usage import (
    CommandFailed,
    UsageError,
    agent_ids,
    nonnegative_int,
    positive_float,
    positive_int,
)
from identity.enrolment import EnrolmentError, EnrolmentRegistry
from identity.enrolment_uri import EnrolmentURI, EnrolmentURIError, pilot_label
from identity.pki import LocalCA
from identity.secret_files import write_secret
from launcher.federation import make_spec
from proto.decentsim.v1 import device_pb2 as pb
from sim.populations import PopulationError, from_spec

#: a pilot heard from within this many seconds is online
ONLINE_S = 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``pilot init|enrol|status``."""
    sub = p.add_subparsers(dest="action", required=True)
    init = sub.add_parser("init", help="the run spec of a run with pilots")
    init.add_argument("--population", required=True, help="synthetic:N or a directory")
    init.add_argument("--population-seed", type=nonnegative_int, default=0)
    init.add_argument(
        "--pilots", type=agent_ids, required=True, help="the pilot agents (comma-separated ids)"
    )
    init.add_argument("--days", type=positive_int, required=True, help="days of the run")
    init.add_argument(
        "--start",
        required=True,
        help="when day 0 starts: ISO 8601 (2027-01-04T08:00Z) or unix seconds",
    )
    init.add_argument(
        "--clock-scale",
        type=positive_float,
        default=1.0,
        help="protocol seconds per wall second (1 for pilots carried by people)",
    )
    init.add_argument(
        "--round-at",
        default="00:00",
        help="when each day's round opens, HH:MM after the day's midnight (default 00:00)",
    )
    init.add_argument("--pools", type=positive_int, default=2, help="simulated device pools")
    init.add_argument("--mode", default="mailbox", choices=("mailbox", "shuffled", "dense"))
    init.add_argument("--radio", default="ideal", choices=("ideal", "simulated"))
    init.add_argument("--seed", type=nonnegative_int, default=0, help="the run's seed")
    init.add_argument(
        "--step-timeout-s",
        type=positive_float,
        default=300.0,
        help="deadline of each step of a daily round (a late pilot drops out of that day)",
    )
    init.add_argument("--out", type=Path, required=True, help="the run spec (JSON) to write")

    enrol = sub.add_parser("enrol", help="one enrolment URI and QR code per pilot agent")
    enrol.add_argument("--state-dir", type=Path, required=True, help="the coordinator's")
    enrol.add_argument("--run", type=Path, required=True, help="the run spec (pilot init)")
    enrol.add_argument("--coordinator", required=True, help="HOST:PORT devices connect to")
    enrol.add_argument("--enrol", required=True, help="HOST:PORT of the enrolment endpoint")
    enrol.add_argument("--agents", type=agent_ids, help="only these pilots (default: all)")
    enrol.add_argument("--ttl-days", type=positive_float, default=7.0, help="token validity")
    enrol.add_argument(
        "--calibration",
        type=Path,
        help="CSV agent,tx_power_dbm,rssi_correction_db: each pilot device's calibration "
        "profile, handed over in its URI (docs/pilot.md, Calibration)",
    )
    enrol.add_argument("--out", type=Path, required=True, help="directory for URIs and PNGs")

    status = sub.add_parser("status", help="the pilot fleet: enrolled, online, health")
    status.add_argument("--state-dir", type=Path, required=True, help="the coordinator's")
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _iso_time(text: str) -> float:
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--start {text!r}: not ISO 8601 or unix seconds") from None
    if when.tzinfo is None:
        raise UsageError(f"--start {text!r}: give a time zone (e.g. Z)")
    return when.timestamp()


def _round_at(text: str) -> float:
    hours, _, minutes = text.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and int(hours) < 24 and int(minutes) < 60):
        raise UsageError(f"--round-at {text!r}: expected HH:MM, e.g. 02:00")
    return 3600.0 * int(hours) + 60.0 * int(minutes)


def _start(text: str) -> float:
    try:
        start = float(text)
    except ValueError:
        start = _iso_time(text)
    if not start > 0:
        raise UsageError(f"--start {text!r}: must be after 1970-01-01T00:00Z")
    return start


def _init(args: argparse.Namespace) -> int:
    try:
        population = from_spec(args.population, seed=args.population_seed)
        spec = make_spec(
            args.population,
            args.days,
            population_seed=args.population_seed,
            pools=args.pools,
            radio=args.radio,
            loaded=population,
            pilots=args.pilots,
            mode=args.mode,
            seed=args.seed,
            clock_scale=args.clock_scale,
            clock_wall_epoch=_start(args.start),
            round_at_s=_round_at(args.round_at),
            step_timeout_s=args.step_timeout_s,
        )
    except PopulationError as e:
        raise UsageError(f"--population: {e}") from None
    except RunSpecError as e:
        raise UsageError(str(e)) from None
    try:
        args.out.write_text(spec.to_json())
    except OSError as e:
        raise UsageError(f"--out {str(args.out)!r}: cannot write it ({e.strerror})") from None
    print(
        json.dumps(
            {
                "run": str(args.out),
                "agents": population.n_agents,
                "pilots": list(spec.pilots),
                "days": spec.days,
                "start_unix": spec.clock_wall_epoch,
                "clock_scale": spec.clock_scale,
            }
        )
    )
    return 0


def _read_run(path: Path) -> RunSpec:
    try:
        return RunSpec.from_json(path.read_text(), str(path))
    except OSError as e:
        raise UsageError(f"--run {str(path)!r}: cannot read it ({e.strerror})") from None
    except RunSpecError as e:
        raise UsageError(f"--run: {e}") from None


def _read_calibration(path: Path, pilots: set[int]) -> dict[int, tuple[int, float]]:
    """Each pilot's (TX power, RSSI correction) from ``--calibration`` (errors name the line
    and field)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"--calibration {str(path)!r}: cannot read it ({e.strerror})") from None
    header = "agent,tx_power_dbm,rssi_correction_db"
    if not lines or lines[0].replace(" ", "") != header:
        raise UsageError(f"--calibration {path}:1: the header must be {header}")
    out: dict[int, tuple[int, float]] = {}
    for no, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 3:
            raise UsageError(f"--calibration {path}:{no}: need 3 fields, got {len(cells)}")
        for name, cell in zip(header.split(","), cells, strict=True):
            try:
                value = int(cell) if name != "rssi_correction_db" else float(cell)
            except ValueError:
                raise UsageError(
                    f"--calibration {path}:{no}: field {name}: not a number: {cell!r}"
                ) from None
            bounds = {"agent": (0, 2**31), "tx_power_dbm": (-127, 20)}.get(name, (-40, 40))
            if not (math.isfinite(value) and bounds[0] <= value <= bounds[1]):
                raise UsageError(
                    f"--calibration {path}:{no}: field {name}: {cell} is not in {bounds}"
                )
        agent = int(cells[0])
        if agent not in pilots or agent in out:
            raise UsageError(
                f"--calibration {path}:{no}: field agent: {agent} is not a pilot of the run "
                "or is listed twice"
            )
        out[agent] = (int(cells[1]), float(cells[2]))
    return out


def _enrol(args: argparse.Namespace) -> int:
    spec = _read_run(args.run)
    if not spec.pilots:
        raise UsageError(f"--run {str(args.run)!r}: the run has no pilots (pilot init)")
    agents = list(args.agents) if args.agents is not None else list(spec.pilots)
    strangers = sorted(set(agents) - set(spec.pilots))
    if strangers:
        raise UsageError(f"--agents {strangers}: not pilots of the run {list(spec.pilots)}")
    ca_path = args.state_dir / "export" / "ca.pem"
    if not ca_path.is_file():
        raise UsageError(
            f"--state-dir {str(args.state_dir)!r}: no coordinator identity (coordinator init)"
        )
    try:
        args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {str(args.out)!r}: cannot create it ({e.strerror})") from None
    profiles = _read_calibration(args.calibration, set(spec.pilots)) if args.calibration else {}
    ca = LocalCA.load_or_create(args.state_dir / "pki", "decentsim coordinator CA")
    ttl = dt.timedelta(days=args.ttl_days)
    written = []
    try:
        with EnrolmentRegistry(args.state_dir / "enrolment.sqlite3", ca) as registry:
            for agent in agents:
                (token,) = registry.mint_tokens(1, ttl, label=pilot_label(agent))
                uri = EnrolmentURI.make(
                    args.coordinator,
                    args.enrol,
                    agent,
                    token,
                    ca_path.read_bytes(),
                    *profiles.get(agent, (None, None)),
                ).to_uri()
                uri_file, png = args.out / f"pilot-{agent}.uri", args.out / f"pilot-{agent}.png"
                write_secret(uri_file, uri.encode())
                image = io.BytesIO()
                segno.make(uri, error="m").save(image, kind="png", scale=4, border=4)
                write_secret(png, image.getvalue())  # 0600: it holds the token
                written.append({"agent": agent, "uri": str(uri_file), "qr": str(png)})
    except EnrolmentURIError as e:  # --coordinator / --enrol not HOST:PORT
        raise UsageError(f"--coordinator/--enrol: {e}") from None
    except EnrolmentError as e:
        raise CommandFailed(str(e)) from None
    for row in written:
        print(json.dumps(row))
    return 0


def _status(args: argparse.Namespace) -> int:
    path = args.state_dir / "coordinator.sqlite3"
    if not path.is_file():
        raise UsageError(f"--state-dir {str(args.state_dir)!r}: no coordinator database there")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        spec = RunSpec.from_json(conn.execute("SELECT spec FROM run").fetchone()[0])
        enrolled = dict(
            conn.execute(
                "SELECT pilot_agent, credential FROM credentials WHERE pilot_agent IS NOT NULL"
            ).fetchall()
        )
        beats = {
            row[0]: row[1:]
            for row in conn.execute(
                "SELECT credential, received_unix, skew_ms, progress_round, health FROM heartbeats"
            )
        }
        committed = conn.execute("SELECT COUNT(*) FROM days").fetchone()[0]
    except (sqlite3.Error, RunSpecError, TypeError) as e:
        raise CommandFailed(f"{path}: not a coordinator database this version reads: {e}") from None
    finally:
        conn.close()
    now = time.time()  # infrastructure time: how long ago a device was heard from
    pilots: list[dict[str, Any]] = []
    for agent in spec.pilots:
        row: dict[str, Any] = {"agent": agent, "enrolled": agent in enrolled}
        beat = beats.get(enrolled.get(agent, ""))
        if beat is not None:
            received, skew_ms, last_round, health = beat
            row |= {
                "last_seen_s": round(now - received, 1),
                "online": now - received <= ONLINE_S,
                "clock_skew_s": skew_ms / 1000,
                "last_round": last_round,
            }
            if health is not None:
                h = pb.DeviceHealth.FromString(health)
                row |= {
                    "version": h.agent_version,
                    "scanner_healthy": h.scanner_healthy,
                    "scanner_last_success_age_s": round(h.scanner_last_success_age_s, 1),
                    "advertiser_last_rotation_age_s": round(h.advertiser_last_rotation_age_s, 1),
                    "privacy_alarm": h.privacy_alarm,
                    "radio_reopened": h.radio_reopened,
                    "battery_bucket": h.battery_bucket,
                    "free_disk_bucket": h.free_disk_bucket,
                }
        pilots.append(row)
    fleet = {
        "pilots": len(spec.pilots),
        "enrolled": sum(r["enrolled"] for r in pilots),
        "online": sum(bool(r.get("online")) for r in pilots),
        "days_committed": committed,
        "days": spec.days,
    }
    if args.json:
        print(json.dumps({"fleet": fleet, "pilots": pilots}))
        return 0
    print(
        f"{fleet['enrolled']}/{fleet['pilots']} pilots enrolled, {fleet['online']} online; "
        f"day {fleet['days_committed']} of {fleet['days']} committed"
    )
    cols = (
        "agent", "enrolled", "online", "last_seen_s", "clock_skew_s", "last_round",
        "version", "scanner_healthy", "privacy_alarm", "battery_bucket", "free_disk_bucket",
    )  # fmt: skip
    print("  ".join(cols))
    for r in pilots:
        print("  ".join(str(r.get(c, "-")) for c in cols))
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen action."""
    if args.action == "init":
        return _init(args)
    if args.action == "enrol":
        return _enrol(args)
    return _status(args)
