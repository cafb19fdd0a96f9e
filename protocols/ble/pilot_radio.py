"""A pilot device's radio: a bumble host that advertises Exposure Notification beacons and scans.

``BumbleRadio`` owns one HCI controller through any bumble transport: a USB dongle on a pilot
board (``usb:0``), the kernel's HCI socket (``hci-socket:0``), or a virtual controller of the
radio hub in tests (``tcp-client:127.0.0.1:PORT``) — the same code path on all of them.

* **Advertiser.** At every RPI interval of *protocol* time (the run clock) it stops advertising,
  draws a new non-resolvable private address and advertises the interval's GAEN v1.2 payload
  (0xFD6F service data RPI‖AEM, non-connectable, non-scannable), so address and RPI always change
  together. The RPIs it broadcast are reported to ``on_broadcast`` (the device registers their
  slots; the keys behind them never leave the device).
* **Scanner.** :class:`~protocols.ble.scanner.ExposureScanner` with the bumble bleak backend on
  the same host (bumble owns the controller, so both go through it): duty cycle in wall seconds,
  sightings and credited seconds in protocol seconds.

The advertising interval and the duty cycle are infrastructure time (radio timing, wall seconds);
which RPI is on the air is protocol time. Under a scaled test clock an RPI lives
``600 / scale`` wall seconds, so a test picks a short advertising interval and duty cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from bumble.device import Device
from bumble.hci import Address
from bumble.transport import open_transport
from bumble.transport.common import TransportInitError, TransportSpecError

from protocols.ble import gaen
from protocols.ble.errors import BleError
from protocols.ble.radio import NOMINAL_TX_POWER_DBM
from protocols.ble.scanner import ExposureScanner, SightingLog
from protocols.ble.virtual_link import BumbleScannerBackend, VirtualAdvertiser
from protocols.clock import RunClock


class RadioConfigError(BleError):
    """A pilot radio setting is out of range; the message names it."""


class RadioUnavailable(Exception):
    """The controller cannot be opened, or its connection was lost (the process exits and its
    supervisor restarts it: the TEKs and sightings so far are in the device's store)."""


class BumbleRadio:
    """Advertise and scan on one bumble HCI transport (see the module docstring)."""

    def __init__(
        self,
        hci: str,
        roller: gaen.KeyRoller,
        clock: RunClock,
        *,
        observer: int = 0,
        tx_power_dbm: int = NOMINAL_TX_POWER_DBM,
        rssi_correction_db: float = 0.0,
        advertising_interval_ms: float = 250.0,
        scan_window_s: float = 4.0,
        scan_interval_s: float = 240.0,
        op_timeout_s: float = 10.0,
        on_broadcast: Callable[[int, bytes], None] | None = None,
    ) -> None:
        if not 20.0 <= advertising_interval_ms <= 10_240.0:
            raise RadioConfigError(
                f"advertising_interval_ms must be in [20, 10240] (Bluetooth's range), "
                f"got {advertising_interval_ms}"
            )
        self.hci = hci
        self.roller = roller
        self.clock = clock
        self.metadata = gaen.encode_metadata(tx_power_dbm)
        self.advertising_interval_ms = advertising_interval_ms
        self._scan = {
            "scan_window_s": scan_window_s,
            "scan_interval_s": scan_interval_s,
            "op_timeout_s": op_timeout_s,
            "rssi_correction_db": rssi_correction_db,
        }
        # a scanner needs the host, which exists only once the transport is open (run())
        ExposureScanner(**self._scan)  # type: ignore[arg-type]  # validates the duty cycle now
        #: every packet heard, across reconnections (the device's private sightings)
        self.log = SightingLog(observer)
        self.scanner: ExposureScanner | None = None
        self._on_broadcast = on_broadcast
        self.broadcasts = 0
        self.last_broadcast: float | None = None

    async def _advertise(self, advertiser: VirtualAdvertiser, stop: asyncio.Event) -> None:
        """Rotate RPI and address at every interval boundary of protocol time."""
        current: int | None = None
        while not stop.is_set():
            now = self.clock.now()
            enin = gaen.en_interval_number(now)
            if enin != current:
                payload = await advertiser.broadcast_at(now)
                current = enin
                self.broadcasts += 1
                self.last_broadcast = now
                if self._on_broadcast is not None:
                    self._on_broadcast(enin, payload[-20:-4])  # the service data's RPI
            boundary = (enin + 1) * gaen.EN_INTERVAL_SECONDS
            # a hair past the boundary, so the next read is in the new interval
            wait = self.clock.to_wall(boundary - self.clock.now()) + 1e-3
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(wait, 1e-3))

    async def run(self, stop: asyncio.Event) -> None:
        """Open the controller, advertise and scan until ``stop`` is set; always close it.

        Raises :class:`RadioUnavailable` when the controller cannot be opened or goes away
        (a dongle unplugged, the hub gone): a radio that cannot hear must not look healthy.
        """
        try:
            transport = await open_transport(self.hci)
        except TransportSpecError as err:
            raise RadioConfigError(f"hci {self.hci!r}: {err}") from err
        except (TransportInitError, OSError) as err:
            raise RadioUnavailable(f"hci {self.hci!r}: cannot open the controller: {err}") from err
        async with transport:
            device = Device.with_hci(
                "decentsim-pilot",
                Address.generate_private_address(),
                transport.source,
                transport.sink,
            )
            await device.power_on()
            advertiser = VirtualAdvertiser(
                device, self.roller, self.metadata, interval_ms=self.advertising_interval_ms
            )
            self.scanner = ExposureScanner(
                backend=BumbleScannerBackend,
                backend_kwargs={"bumble_device": device},
                clock=self.clock,
                log=self.log,
                **self._scan,  # type: ignore[arg-type]
            )
            lost = asyncio.ensure_future(transport.source.terminated)
            work = asyncio.gather(self._advertise(advertiser, stop), self.scanner.run(stop))
            try:
                await asyncio.wait({lost, work}, return_when=asyncio.FIRST_COMPLETED)
                if lost.done() and not work.done():
                    raise RadioUnavailable(f"hci {self.hci!r}: the controller went away")
                await work  # re-raise what stopped it
            finally:
                if not work.done():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                lost.cancel()
                if not transport.source.terminated.done():
                    await advertiser.stop()

    def health(self) -> dict[str, Any]:
        """Scanner health plus the advertiser's last rotation (protocol time; no identifiers)."""
        if self.scanner is None:
            report: dict[str, Any] = {"healthy": False, "scans_completed": 0}
        else:
            report = self.scanner.health()
        report["broadcasts"] = self.broadcasts
        report["last_broadcast"] = self.last_broadcast
        return report
