"""The pilot-device scanner: bleak's ``BleakScanner`` with a duty cycle, a watchdog and health.

Each duty cycle opens a ``BleakScanner`` filtered on the 0xFD6F service for ``scan_window_s``,
then sleeps until the next cycle (``scan_interval_s``): a few seconds every few minutes, as the
Exposure Notification framework does, to save battery. The detection callback decodes the
service data through :mod:`protocols.ble.advert`; malformed adverts are counted by error class
and dropped, never raised into bleak. A scan is always stopped in ``finally``; a scan whose
start, window or stop overruns its deadline is abandoned and restarted on the next cycle by the
watchdog, and :meth:`ExposureScanner.health` reports the last scan.

Scanning mode: ``"passive"`` (the default: no scan requests on the air, as GAEN does) passes
bleak's BlueZ ``or_patterns`` matching AD type 0x16 starting with UUID 0xFD6F, because bleak's
BlueZ backend refuses a passive scan without them (and ignores ``service_uuids`` there; passive
scanning on Linux needs BlueZ >= 5.56 with ``--experimental`` and kernel >= 5.10). ``"active"``
filters with ``service_uuids`` instead; macOS (CoreBluetooth) supports only active scanning.

The same callback serves any bleak backend: the platform's (BlueZ, CoreBluetooth, WinRT,
Android) on a pilot device, or :class:`protocols.ble.virtual_link.BumbleScannerBackend` in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from bleak import BleakScanner
from bleak.args.bluez import OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bleak.exc import BleakError

from protocols.ble import gaen
from protocols.ble.advert import EN_SERVICE_UUID16, EN_SERVICE_UUID128, decode_service_data
from protocols.ble.errors import AdvertError, MissingServiceData, ScannerConfigError
from protocols.ble.radio import NOMINAL_TX_POWER_DBM
from protocols.ble.sightings import Sightings
from protocols.clock import REAL_TIME, RunClock

#: BlueZ advertisement-monitor pattern for passive scans: service data (AD 0x16) of UUID 0xFD6F.
EN_OR_PATTERN = OrPattern(
    0, AdvertisementDataType.SERVICE_DATA_UUID16, EN_SERVICE_UUID16.to_bytes(2, "little")
)


class SightingLog:
    """Per-packet sightings of one device, appended by the scanner, exported for scoring."""

    def __init__(self, observer: int = 0) -> None:
        self.observer = observer
        self._index: dict[bytes, int] = {}
        self._rows: list[tuple[int, float, float, float, int, float]] = []

    def add(
        self, rpi: bytes, rssi: float, tx_power: float, t: float, scan: int, seconds: float
    ) -> None:
        """Record one received packet."""
        beacon = self._index.setdefault(rpi, len(self._index))
        self._rows.append((beacon, float(rssi), float(tx_power), float(t), scan, float(seconds)))

    def __len__(self) -> int:
        return len(self._rows)

    def drain(self) -> Sightings:
        """The sightings logged so far, which the log then forgets (a caller persists them)."""
        out = self.to_sightings()
        self._index, self._rows = {}, []
        return out

    def to_sightings(self) -> Sightings:
        """The log as :class:`~protocols.ble.sightings.Sightings` (the scoring input)."""
        if not self._rows:
            return Sightings.empty()
        cols = list(zip(*self._rows, strict=True))
        rpis = np.frombuffer(b"".join(self._index), dtype=np.uint8).reshape(-1, gaen.RPI_LEN)
        return Sightings(
            observer=np.full(len(self._rows), self.observer, dtype=np.int64),
            beacon=np.array(cols[0], dtype=np.int64),
            rpis=rpis.copy(),
            rssi=np.array(cols[1], dtype=np.float64),
            tx_power=np.array(cols[2], dtype=np.float64),
            time=np.array(cols[3], dtype=np.float64),
            scan=np.array(cols[4], dtype=np.int64),
            seconds=np.array(cols[5], dtype=np.float64),
        )


@dataclass
class ScanHealth:
    """The scanner's health: what happened in the last scan and counters since start."""

    scans_started: int = 0
    scans_completed: int = 0
    restarts: int = 0
    last_scan_started: float | None = None
    last_scan_ended: float | None = None
    last_scan_packets: int = 0
    last_scan_ok: bool | None = None
    last_success: float | None = None
    last_error: str | None = None
    accepted: int = 0
    ignored: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def report(self, now: float, stale_after_s: float) -> dict[str, Any]:
        """A JSON-friendly snapshot (counts and timestamps only: no identifiers).

        ``healthy`` is false until a scan has completed, and again once the last completed scan
        is more than ``stale_after_s`` old (the scanner is stuck or keeps failing).
        """
        healthy = self.last_success is not None and now - self.last_success <= stale_after_s
        return {
            "healthy": healthy,
            "scans_started": self.scans_started,
            "scans_completed": self.scans_completed,
            "restarts": self.restarts,
            "last_scan_started": self.last_scan_started,
            "last_scan_ended": self.last_scan_ended,
            "last_scan_packets": self.last_scan_packets,
            "last_scan_ok": self.last_scan_ok,
            "last_success": self.last_success,
            "last_error": self.last_error,
            "accepted": self.accepted,
            "ignored": self.ignored,
            "rejected": dict(self.rejected),
        }


class ExposureScanner:
    """Duty-cycled Exposure Notification scanning on top of bleak.

    ``backend`` is passed to ``BleakScanner`` (``None``: the platform's); ``backend_kwargs`` go
    with it. ``aemk_for_rpi`` optionally returns the AEMK of an RPI whose TEK is known (own keys,
    published diagnosis keys): the metadata is then decrypted, its version checked (bad versions
    are counted as ``BadVersion``) and its TX power used instead of the nominal one. Without a
    key the version cannot be checked at all: it travels inside the encrypted AEM.

    Two clocks (:mod:`protocols.clock`): the duty cycle (``scan_window_s``, ``scan_interval_s``,
    ``op_timeout_s``) is infrastructure time, wall seconds of the machine; sighting timestamps,
    the scan seconds credited to each sighting and the health report are protocol time, read
    from ``clock``. Under a scaled clock a scan interval of ``scan_interval_s`` wall seconds
    credits ``clock.to_protocol(scan_interval_s)`` protocol seconds, and the health report's
    staleness bound is scaled the same way.
    """

    def __init__(
        self,
        *,
        observer: int = 0,
        scan_window_s: float = 4.0,
        scan_interval_s: float = 240.0,
        op_timeout_s: float = 10.0,
        backend: type[BaseBleakScanner] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        clock: RunClock = REAL_TIME,
        nominal_tx_power_dbm: int = NOMINAL_TX_POWER_DBM,
        aemk_for_rpi: Callable[[bytes], bytes | None] | None = None,
        scanning_mode: Literal["passive", "active"] = "passive",
        log: SightingLog | None = None,
        rssi_correction_db: float = 0.0,
    ) -> None:
        if scanning_mode not in ("passive", "active"):
            raise ScannerConfigError(
                f"scanning_mode must be 'passive' or 'active', got {scanning_mode!r}"
            )
        if not 0 < scan_window_s <= scan_interval_s:
            raise ScannerConfigError(
                f"need 0 < scan_window_s <= scan_interval_s, got {scan_window_s}, {scan_interval_s}"
            )
        if op_timeout_s <= 0:
            raise ScannerConfigError(f"op_timeout_s must be > 0, got {op_timeout_s}")
        self.scan_window_s = scan_window_s
        self.scan_interval_s = scan_interval_s
        self.op_timeout_s = op_timeout_s
        self._backend = backend
        self._backend_kwargs = backend_kwargs or {}
        self._clock = clock
        self._tx = nominal_tx_power_dbm
        self._aemk_for_rpi = aemk_for_rpi
        self._mode = scanning_mode
        #: this receiver's calibration: added to every measured RSSI (GAEN's RSSI correction)
        self.rssi_correction_db = float(rssi_correction_db)
        #: where sightings go (a caller may hand in a log that outlives this scanner)
        self.log = log if log is not None else SightingLog(observer)
        self._health = ScanHealth()
        self._scan_id = 0

    def health(self) -> dict[str, Any]:
        """The "last scan" health report (protocol time); stale after two missed duty cycles."""
        stale_after = 2 * self.scan_interval_s + self.scan_window_s + 2 * self.op_timeout_s
        return self._health.report(self._clock.now(), self._clock.to_protocol(stale_after))

    def _scanner_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(self._backend_kwargs)
        if self._mode == "passive":
            bluez = dict(kwargs.pop("bluez", {}))
            bluez["or_patterns"] = [EN_OR_PATTERN]
            kwargs["bluez"] = bluez
        else:
            kwargs["service_uuids"] = [EN_SERVICE_UUID128]
        return kwargs

    def on_advertisement(self, device: BLEDevice, adv: AdvertisementData) -> None:
        """bleak detection callback: decode, validate, log; count and drop anything malformed."""
        h = self._health
        data = adv.service_data.get(EN_SERVICE_UUID128)
        try:
            if data is None:
                if EN_SERVICE_UUID128 not in adv.service_uuids:
                    h.ignored += 1  # another service: not ours, not malformed
                    return
                raise MissingServiceData("advert lists 0xFD6F but carries no 0xFD6F service data")
            beacon = decode_service_data(data)
            tx = self._tx
            aemk = self._aemk_for_rpi(beacon.rpi) if self._aemk_for_rpi else None
            if aemk is not None:
                tx = gaen.parse_metadata(
                    gaen.aem_decrypt(aemk, beacon.rpi, beacon.aem)
                ).tx_power_dbm
        except AdvertError as err:
            h.rejected[type(err).__name__] += 1
            return
        h.accepted += 1
        h.last_scan_packets += 1
        credited = self._clock.to_protocol(self.scan_interval_s)
        rssi = adv.rssi + self.rssi_correction_db
        self.log.add(beacon.rpi, rssi, tx, self._clock.now(), self._scan_id, credited)

    async def scan_once(self) -> None:
        """One scan window; the scanner is stopped in ``finally`` whatever happens."""
        h = self._health
        self._scan_id += 1
        h.scans_started += 1
        h.last_scan_started = self._clock.now()
        h.last_scan_packets = 0
        h.last_scan_ok = False
        scanner = BleakScanner(
            detection_callback=self.on_advertisement,
            scanning_mode=self._mode,
            backend=self._backend,
            **self._scanner_kwargs(),
        )
        try:
            await asyncio.wait_for(scanner.start(), self.op_timeout_s)
            await asyncio.sleep(self.scan_window_s)
        finally:
            await asyncio.wait_for(scanner.stop(), self.op_timeout_s)
            h.last_scan_ended = self._clock.now()
        h.scans_completed += 1
        h.last_scan_ok = True
        h.last_success = h.last_scan_ended

    async def run(self, stop: asyncio.Event, max_scans: int | None = None) -> None:
        """Scan every ``scan_interval_s`` until ``stop`` is set (or ``max_scans`` scans).

        Watchdog: a scan that overruns ``scan_window_s + 2 * op_timeout_s`` or fails with
        ``BleakError`` (adapter gone, passive scanning unsupported, D-Bus errors) or ``OSError``
        (which covers the ``TimeoutError`` of a stalled start/stop and socket/D-Bus I/O errors)
        is abandoned (its ``finally`` has stopped it), counted in ``restarts``/``last_error``
        and retried next cycle. Any other exception is a bug and propagates.
        """
        deadline = self.scan_window_s + 2 * self.op_timeout_s
        while not stop.is_set() and (max_scans is None or self._health.scans_started < max_scans):
            began = time.monotonic()  # infrastructure time: the duty cycle
            try:
                await asyncio.wait_for(self.scan_once(), deadline)
            except (BleakError, OSError, asyncio.TimeoutError) as err:
                self._health.restarts += 1
                self._health.last_error = f"{type(err).__name__}: {err}"
            rest = self.scan_interval_s - (time.monotonic() - began)  # infrastructure time
            if rest > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), rest)
