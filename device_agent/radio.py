"""A pilot device's radio process (``decentsim device-agent radio``) and its private store.

The radio advertises the device's Exposure Notification beacons and scans for everyone else's
(:class:`protocols.ble.pilot_radio.BumbleRadio` on a USB dongle, the kernel's HCI socket, or a
radio hub's virtual controller in tests). What it must not lose lives in ``radio.sqlite3`` in
the device's state dir (SQLite, WAL, ``0600``), beside the pool's store and like it never sent
anywhere:

* ``teks``: the device's Temporary Exposure Keys, one per day, drawn with ``os.urandom`` and
  written *before* the first beacon of the day goes on the air (a restarted radio advertises
  the same RPIs, and the device can register the day's slots from them);
* ``broadcasts``: which intervals went on the air;
* ``sightings``: every packet heard (RPI, RSSI, TX power, protocol time, scan, credited
  seconds), flushed every ``flush_s`` wall seconds and on exit.

Everything older than :data:`~device_agent.store.TRACE_RETENTION_DAYS` protocol days is
deleted as the radio runs, as Exposure Notification does. The day's contact trace is scored
from the sightings on the device (:func:`day_trace`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.store import TRACE_RETENTION_DAYS
from protocols.ble import gaen
from protocols.ble.bluez_radio import BlueZRadio
from protocols.ble.errors import BleError
from protocols.ble.pilot_radio import BumbleRadio, RadioUnavailable
from protocols.ble.radio import NOMINAL_TX_POWER_DBM
from protocols.ble.scoring import Trace, score
from protocols.ble.sightings import Sightings
from protocols.clock import RunClock
from storage.sqlite import open_db, transaction

log = logging.getLogger(__name__)

_MIGRATIONS = (
    """
    CREATE TABLE teks (rolling_start INTEGER PRIMARY KEY, tek BLOB NOT NULL);
    CREATE TABLE broadcasts (enin INTEGER PRIMARY KEY);
    CREATE TABLE sightings (rpi BLOB NOT NULL, rssi REAL NOT NULL, tx_power REAL NOT NULL,
                            t REAL NOT NULL, scan INTEGER NOT NULL, seconds REAL NOT NULL);
    CREATE INDEX sightings_t ON sightings (t);
    """,
)

_DAY_S = gaen.TEK_ROLLING_PERIOD * gaen.EN_INTERVAL_SECONDS


class RadioStore:
    """The radio's private SQLite store (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.db = open_db(state_dir / "radio.sqlite3", migrations=_MIGRATIONS)
        row = self.db.execute("SELECT MAX(scan) FROM sightings").fetchone()
        #: scan numbers of this session start after the stored ones (scans de-duplicate packets)
        self.scan_base = 0 if row[0] is None else int(row[0])

    def tek(self, rolling_start: int) -> bytes:
        """The TEK of the day starting at ``rolling_start``: the stored one, or a new one
        stored before it is returned (so it is never broadcast unsaved)."""
        row = self.db.execute(
            "SELECT tek FROM teks WHERE rolling_start = ?", (rolling_start,)
        ).fetchone()
        if row is not None:
            return bytes(row[0])
        tek = gaen.new_tek()
        with transaction(self.db) as conn:
            conn.execute("INSERT INTO teks VALUES (?, ?)", (rolling_start, tek))
        return tek

    def teks(self) -> list[gaen.TemporaryExposureKey]:
        """The retained TEKs, oldest first."""
        rows = self.db.execute("SELECT rolling_start, tek FROM teks ORDER BY rolling_start")
        return [gaen.TemporaryExposureKey(bytes(tek), int(start)) for start, tek in rows]

    def add_broadcast(self, enin: int) -> None:
        """Note that interval ``enin`` went on the air."""
        with transaction(self.db) as conn:
            conn.execute("INSERT OR IGNORE INTO broadcasts VALUES (?)", (enin,))

    def broadcasts(self, first: int, last: int) -> np.ndarray:
        """The intervals in ``[first, last)`` that went on the air."""
        rows = self.db.execute(
            "SELECT enin FROM broadcasts WHERE enin >= ? AND enin < ? ORDER BY enin", (first, last)
        ).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    def add_sightings(self, s: Sightings) -> None:
        """Append sightings (their scan numbers shifted past earlier sessions')."""
        if not len(s):
            return
        rpis = [bytes(r) for r in s.rpis]
        rows = zip(
            (rpis[b] for b in s.beacon.tolist()),
            s.rssi.tolist(),
            s.tx_power.tolist(),
            s.time.tolist(),
            (self.scan_base + s.scan).tolist(),
            s.seconds.tolist(),
            strict=True,
        )
        with transaction(self.db) as conn:
            conn.executemany("INSERT INTO sightings VALUES (?, ?, ?, ?, ?, ?)", rows)

    def sightings(self, start: float, end: float, observer: int = 0) -> Sightings:
        """The packets heard in protocol time ``[start, end)``."""
        rows = self.db.execute(
            "SELECT rpi, rssi, tx_power, t, scan, seconds FROM sightings "
            "WHERE t >= ? AND t < ? ORDER BY rowid",
            (start, end),
        ).fetchall()
        if not rows:
            return Sightings.empty()
        index: dict[bytes, int] = {}
        beacon = np.array([index.setdefault(bytes(r[0]), len(index)) for r in rows], np.int64)
        cols = list(zip(*rows, strict=True))
        return Sightings(
            observer=np.full(len(rows), observer, dtype=np.int64),
            beacon=beacon,
            rpis=np.frombuffer(b"".join(index), np.uint8).reshape(-1, gaen.RPI_LEN).copy(),
            rssi=np.array(cols[1], np.float64),
            tx_power=np.array(cols[2], np.float64),
            time=np.array(cols[3], np.float64),
            scan=np.array(cols[4], np.int64),
            seconds=np.array(cols[5], np.float64),
        )

    def prune(self, now: float) -> None:
        """Forget keys, broadcasts and sightings older than the retention (protocol time)."""
        oldest = now - TRACE_RETENTION_DAYS * _DAY_S
        oldest_enin = int(oldest // gaen.EN_INTERVAL_SECONDS)
        with transaction(self.db) as conn:
            conn.execute("DELETE FROM sightings WHERE t < ?", (oldest,))
            conn.execute("DELETE FROM broadcasts WHERE enin < ?", (oldest_enin,))
            conn.execute(
                "DELETE FROM teks WHERE rolling_start + ? <= ?",
                (gaen.TEK_ROLLING_PERIOD, oldest_enin),
            )


#: fewest packets a calibration takes a median of
MIN_CALIBRATION_PACKETS = 20


class CalibrationError(ValueError):
    """Too little to calibrate from; the message says what is missing."""


def calibration(
    store: RadioStore, rssi_correction_db: float = 0.0, reference_attenuation_db: float = 41.0
) -> dict[str, float]:
    """The RSSI correction that makes this receiver read ``reference_attenuation_db`` from a
    reference device 1 m away (GAEN's calibration: the median of the readings), from every
    packet in the store of a calibration session.

    ``rssi_correction_db`` is the correction the session ran with (already in the stored
    RSSI); the result is the new total correction.
    """
    s = store.sightings(0.0, float("inf"))
    if len(s) < MIN_CALIBRATION_PACKETS:
        raise CalibrationError(
            f"{len(s)} packet(s) in the store; a calibration needs at least "
            f"{MIN_CALIBRATION_PACKETS} from the reference device 1 m away"
        )
    median = float(np.median(s.tx_power - s.rssi))
    return {
        "packets": len(s),
        "median_attenuation_db": median,
        "rssi_correction_db": rssi_correction_db + median - reference_attenuation_db,
    }


def day_trace(store: RadioStore, day_start: float) -> Trace:
    """The device's contact trace of the protocol day starting at ``day_start`` (unix s)."""
    return score(store.sightings(day_start, day_start + _DAY_S))


@dataclass(frozen=True)
class RadioConfig:
    """How to run a pilot's radio (wall-clock settings are radio timing: infrastructure time).

    ``radio`` is ``bumble`` (a bumble host on the HCI transport ``hci``) or ``bluez`` (BlueZ's
    adapter ``adapter`` over D-Bus: the system bus, or ``dbus_address``)."""

    hci: str
    state_dir: Path
    clock: RunClock
    radio: str = "bumble"
    adapter: str = "hci0"
    dbus_address: str | None = None
    #: protocol seconds since the clock's ``sim_epoch`` at which to stop (None: until stopped)
    stop_at_s: float | None = None
    #: the device's calibration profile (from its enrolment, or measured: ``calibration``)
    tx_power_dbm: int = NOMINAL_TX_POWER_DBM
    rssi_correction_db: float = 0.0
    advertising_interval_ms: float = 250.0
    scan_window_s: float = 4.0
    scan_interval_s: float = 240.0
    #: wall seconds between flushes of the sightings to the store
    flush_s: float = 5.0


async def run_radio(config: RadioConfig, stop: asyncio.Event) -> dict[str, object]:
    """Advertise and scan until ``stop`` is set or ``stop_at_s``; returns the radio's health.

    Sightings are flushed to the store every ``flush_s`` and once more on the way out, so a
    crash loses at most the last ``flush_s`` seconds of packets.
    """
    store = RadioStore(config.state_dir)
    radio = pilot_radio(config, store)

    async def flush_until_stopped() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), config.flush_s)
            flush(radio, store, config.clock)

    async def stop_at() -> None:
        if config.stop_at_s is None:
            return
        left = config.clock.sim_epoch + config.stop_at_s - config.clock.now()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, config.clock.to_wall(left)))
        stop.set()

    try:
        await asyncio.gather(radio.run(stop), flush_until_stopped(), stop_at())
    finally:
        store.add_sightings(radio.log.drain())
        store.db.close()
    health = radio.health()
    log.info("radio stopped: %s", health)
    return health


def pilot_radio(config: RadioConfig, store: RadioStore) -> BumbleRadio | BlueZRadio:
    """The radio ``config`` describes, keeping its TEKs and broadcasts in ``store``."""
    common: dict[str, Any] = {
        "tx_power_dbm": config.tx_power_dbm,
        "rssi_correction_db": config.rssi_correction_db,
        "scan_window_s": config.scan_window_s,
        "scan_interval_s": config.scan_interval_s,
        "on_broadcast": lambda enin, _rpi: store.add_broadcast(enin),
    }
    roller = gaen.KeyRoller(store.tek)
    if config.radio == "bluez":
        return BlueZRadio(
            config.adapter, roller, config.clock, dbus_address=config.dbus_address, **common
        )
    return BumbleRadio(
        config.hci,
        roller,
        config.clock,
        advertising_interval_ms=config.advertising_interval_ms,
        **common,
    )


def flush(radio: BumbleRadio | BlueZRadio, store: RadioStore, clock: RunClock) -> None:
    """Persist the packets heard since the last flush; forget what is past retention."""
    store.add_sightings(radio.log.drain())
    store.prune(clock.now())


class RadioThread:
    """A pilot's radio beside its round loop: its own thread and event loop, its own store
    connection. When the controller goes away (a dongle unplugged, the hub restarting) it
    reopens it after ``retry_s`` wall seconds; :meth:`flush` makes every packet heard so far
    readable from the store (the round loop calls it before reading a day)."""

    def __init__(self, config: RadioConfig, retry_s: float = 1.0) -> None:
        self.config = config
        self.retry_s = retry_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._radio: BumbleRadio | BlueZRadio | None = None
        self._store: RadioStore | None = None
        self.failures = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._main, name="pilot-radio", daemon=True)

    def start(self) -> None:
        """Start the radio (returns once its loop runs)."""
        self._thread.start()
        self._ready.wait()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BleError as err:  # a setting no retry can fix (an --hci bumble cannot parse)
            self.last_error = str(err)
            log.error("the pilot radio stopped: %s", err)
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._store = store = RadioStore(self.config.state_dir)
        self._radio = radio = pilot_radio(self.config, store)
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    await radio.run(self._stop)
                except RadioUnavailable as err:
                    self.failures += 1
                    self.last_error = str(err)
                    log.warning("radio unavailable, retrying in %.1f s: %s", self.retry_s, err)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), self.retry_s)
        finally:
            flush(radio, store, self.config.clock)
            store.db.close()

    def flush(self, timeout_s: float = 30.0) -> None:
        """Persist every packet heard so far (called from another thread)."""
        loop, radio, store = self._loop, self._radio, self._store
        if loop is None or radio is None or store is None or not self._thread.is_alive():
            raise RadioUnavailable(f"the pilot radio is not running: {self.last_error}")
        clock = self.config.clock

        async def flush_now() -> None:
            flush(radio, store, clock)

        # the store's connection belongs to the radio's thread: flush there, wait here
        asyncio.run_coroutine_threadsafe(flush_now(), loop).result(timeout_s)

    def health(self) -> dict[str, Any]:
        """The radio's health (counts and protocol times only)."""
        report: dict[str, Any] = {} if self._radio is None else dict(self._radio.health())
        report["reopened"] = self.failures
        return report

    def operator_health(self) -> dict[str, Any]:
        """What the operator may see (``pilot status``): whether the radio works and how long
        ago (wall seconds), never a count of what it heard."""
        clock = self.config.clock
        report = self.health()

        def age(protocol_time: float | None) -> float:
            return -1.0 if protocol_time is None else clock.to_wall(clock.now() - protocol_time)

        return {
            "scanner_healthy": bool(report.get("healthy", False)),
            "scanner_last_success_age_s": age(report.get("last_success")),
            "advertiser_last_rotation_age_s": age(report.get("last_broadcast")),
            # BlueZ's adapter may turn discoverable/connectable; bumble owns its controller
            "privacy_alarm": bool(report.get("privacy_alarm", False)),
            "radio_reopened": self.failures,
        }

    def stop(self) -> None:
        """Stop advertising and scanning; flush; wait for the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30.0)
