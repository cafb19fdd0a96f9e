"""A pilot's radio through BlueZ over D-Bus (``--radio bluez``): a laptop keeps its Bluetooth stack.

* **Advertiser.** At every RPI interval of protocol time it registers a new
  ``org.bluez.LEAdvertisement1`` object with the adapter's ``org.bluez.LEAdvertisingManager1``:
  type ``broadcast`` (non-connectable, non-scannable), service UUID 0xFD6F and service data
  RPI‖AEM, and a ``Timeout`` of a little more than one interval. So a crashed process stops
  broadcasting a stale RPI by itself. The previous registration is removed first. For a
  non-connectable advertisement BlueZ uses a non-resolvable private address, new at each
  registration, so the address rotates with the RPI.
* **Privacy.** That holds only while the adapter is neither *discoverable* nor *connectable*.
  Either one makes BlueZ advertise from the adapter's fixed identity address, and a listener
  could then link every rotated RPI. Anything can turn them on: a desktop's Bluetooth panel,
  ``bluetoothctl discoverable on``, a pairing agent. So the advertiser:
  * forces both off at start and before every rotation;
  * watches the adapter's ``PropertiesChanged``;
  * when either turns on, raises the **privacy alarm** (health ``privacy_alarm``: latched, with
    the number of times) and turns it off again.
* **Scanner.** :class:`~protocols.ble.scanner.ExposureScanner` with bleak's own BlueZ backend.

The D-Bus calls go through ``dbus-fast`` (bleak's own D-Bus library) on the system bus, or on
the bus at ``dbus_address`` (tests run a private ``dbus-daemon`` with a stand-in BlueZ).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Annotated, Any

from dbus_fast import BusType, DBusError, Variant
from dbus_fast.aio import MessageBus, ProxyInterface
from dbus_fast.annotations import DBusSignature, DBusStr, DBusUInt16
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

from protocols.ble import gaen
from protocols.ble.advert import EN_SERVICE_UUID128
from protocols.ble.pilot_radio import RadioUnavailable
from protocols.ble.radio import NOMINAL_TX_POWER_DBM
from protocols.ble.scanner import ExposureScanner, SightingLog
from protocols.clock import RunClock

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
ADVERTISING_MANAGER = "org.bluez.LEAdvertisingManager1"
ADVERTISEMENT = "org.bluez.LEAdvertisement1"
PROPERTIES = "org.freedesktop.DBus.Properties"
#: where this process's advertisement objects live
OBJECT_PATH = "/org/decentsim/exposure"
#: adapter settings that make BlueZ advertise from the identity address
IDENTIFYING = ("Discoverable", "Connectable")


class ExposureAdvertisement(ServiceInterface):
    """One ``org.bluez.LEAdvertisement1``: the GAEN payload of one interval."""

    def __init__(self, rpi: bytes, aem: bytes, timeout_s: int) -> None:
        super().__init__(ADVERTISEMENT)
        self._data = bytes(rpi) + bytes(aem)
        self._timeout = timeout_s
        self.released = False

    # no return annotation: dbus-fast reads a method's D-Bus signature from its annotations,
    # and this one returns nothing
    @dbus_method()
    def Release(self):
        """BlueZ dropped the advertisement (its Timeout passed, or the adapter went away)."""
        self.released = True

    @dbus_property(access=PropertyAccess.READ)
    def Type(self) -> DBusStr:
        """``broadcast``: non-connectable and non-scannable."""
        return "broadcast"

    @dbus_property(access=PropertyAccess.READ)
    def ServiceUUIDs(self) -> Annotated[list[str], DBusSignature("as")]:
        """The Exposure Notification service, 0xFD6F."""
        return [EN_SERVICE_UUID128]

    @dbus_property(access=PropertyAccess.READ)
    def ServiceData(self) -> Annotated[dict[str, Variant], DBusSignature("a{sv}")]:
        """0xFD6F → RPI‖AEM."""
        return {EN_SERVICE_UUID128: Variant("ay", self._data)}

    @dbus_property(access=PropertyAccess.READ)
    def Timeout(self) -> DBusUInt16:
        """Seconds until BlueZ removes the advertisement by itself."""
        return self._timeout


class BlueZAdvertiser:
    """Rotating Exposure Notification advertisements through BlueZ, with the privacy watch
    (see the module docstring)."""

    def __init__(
        self,
        bus: MessageBus,
        roller: gaen.KeyRoller,
        clock: RunClock,
        metadata: bytes,
        adapter: str = "hci0",
        on_broadcast: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.bus = bus
        self.roller = roller
        self.clock = clock
        self.metadata = metadata
        self.adapter_path = f"/org/bluez/{adapter}"
        self._on_broadcast = on_broadcast
        # one interval of wall time, and some slack: a crashed process's RPI goes off the air
        wall = clock.to_wall(gaen.EN_INTERVAL_SECONDS)
        self.timeout_s = max(1, min(65535, math.ceil(1.1 * wall + 1)))
        self._manager: ProxyInterface | None = None
        self._properties: ProxyInterface | None = None
        self._registered: str | None = None
        self._count = 0
        self.broadcasts = 0
        self.last_broadcast: float | None = None
        self.privacy_alarm = False
        self.privacy_alarms = 0

    async def start(self) -> None:
        """Find the adapter, force it private, and watch it."""
        intro = await self.bus.introspect(BLUEZ, self.adapter_path)
        adapter = self.bus.get_proxy_object(BLUEZ, self.adapter_path, intro)
        self._manager = adapter.get_interface(ADVERTISING_MANAGER)
        self._properties = adapter.get_interface(PROPERTIES)
        self._properties.on_properties_changed(self._on_changed)  # type: ignore[attr-defined]
        await self.force_private()

    def _on_changed(self, interface: str, changed: dict[str, Variant], _: list[str]) -> None:
        if interface == ADAPTER and any(
            changed[name].value for name in IDENTIFYING if name in changed
        ):
            self._alarm()
            asyncio.get_running_loop().create_task(self.force_private())

    def _alarm(self) -> None:
        self.privacy_alarm = True
        self.privacy_alarms += 1

    async def force_private(self) -> None:
        """Turn the adapter's discoverable and connectable off; an adapter found with either
        on raises the alarm (its beacons may have gone out from the identity address)."""
        assert self._properties is not None
        settings = await self._properties.call_get_all(ADAPTER)  # type: ignore[attr-defined]
        for name in IDENTIFYING:
            if name in settings and settings[name].value:
                if not self.privacy_alarm:
                    self._alarm()
                await self._properties.call_set(  # type: ignore[attr-defined]
                    ADAPTER, name, Variant("b", False)
                )

    async def rotate(self, now: float) -> int:
        """Put the RPI of ``now``'s interval on the air (a new registration); its ENIN."""
        assert self._manager is not None
        await self.force_private()
        enin = gaen.en_interval_number(now)
        rpi, aem = self.roller.identifiers_at(now, self.metadata)
        await self.withdraw()
        self._count += 1
        path = f"{OBJECT_PATH}/{self._count}"
        self.bus.export(path, ExposureAdvertisement(rpi, aem, self.timeout_s))
        await self._manager.call_register_advertisement(path, {})  # type: ignore[attr-defined]
        self._registered = path
        self.broadcasts += 1
        self.last_broadcast = now
        if self._on_broadcast is not None:
            self._on_broadcast(enin, rpi)
        return enin

    async def withdraw(self) -> None:
        """Take the current advertisement off the air (gone already if its Timeout passed)."""
        path, self._registered = self._registered, None
        if path is None:
            return
        assert self._manager is not None
        # BlueZ already dropped it (Timeout, adapter reset): nothing to take off the air
        with contextlib.suppress(DBusError):
            await self._manager.call_unregister_advertisement(path)  # type: ignore[attr-defined]
        self.bus.unexport(path)

    async def run(self, stop: asyncio.Event) -> None:
        """Rotate at every interval boundary of protocol time until ``stop``; then withdraw."""
        current: int | None = None
        try:
            while not stop.is_set():
                now = self.clock.now()
                if gaen.en_interval_number(now) != current:
                    current = await self.rotate(now)
                boundary = (current + 1) * gaen.EN_INTERVAL_SECONDS
                wait = self.clock.to_wall(boundary - self.clock.now()) + 1e-3
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(wait, 1e-3))
        finally:
            await self.withdraw()


class BlueZRadio:
    """Advertise through BlueZ and scan through bleak's BlueZ backend: the same interface as
    :class:`~protocols.ble.pilot_radio.BumbleRadio` (``run``, ``log``, ``health``)."""

    def __init__(
        self,
        adapter: str,
        roller: gaen.KeyRoller,
        clock: RunClock,
        *,
        dbus_address: str | None = None,
        observer: int = 0,
        tx_power_dbm: int = NOMINAL_TX_POWER_DBM,
        rssi_correction_db: float = 0.0,
        scan_window_s: float = 4.0,
        scan_interval_s: float = 240.0,
        op_timeout_s: float = 10.0,
        on_broadcast: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.adapter = adapter
        self.roller = roller
        self.clock = clock
        self.dbus_address = dbus_address
        self.metadata = gaen.encode_metadata(tx_power_dbm)
        self._on_broadcast = on_broadcast
        self.log = SightingLog(observer)
        # bleak's BlueZ backend: every packet reported (DuplicateData), on this adapter
        self.scanner = ExposureScanner(
            observer=observer,
            scan_window_s=scan_window_s,
            scan_interval_s=scan_interval_s,
            op_timeout_s=op_timeout_s,
            clock=clock,
            log=self.log,
            rssi_correction_db=rssi_correction_db,
            backend_kwargs={"bluez": {"adapter": adapter, "filters": {"DuplicateData": True}}},
        )
        self.advertiser: BlueZAdvertiser | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Connect to D-Bus, advertise and scan until ``stop``; always withdraw."""
        try:
            bus = await MessageBus(bus_address=self.dbus_address, bus_type=BusType.SYSTEM).connect()
        except OSError as err:
            raise RadioUnavailable(f"adapter {self.adapter}: no D-Bus to BlueZ: {err}") from err
        try:
            self.advertiser = BlueZAdvertiser(
                bus, self.roller, self.clock, self.metadata, self.adapter, self._on_broadcast
            )
            try:
                await self.advertiser.start()
            except DBusError as err:  # no bluetoothd, or no such adapter
                raise RadioUnavailable(f"adapter {self.adapter}: {err.text}") from err
            await asyncio.gather(self.advertiser.run(stop), self.scanner.run(stop))
        finally:
            bus.disconnect()

    def health(self) -> dict[str, Any]:
        """Scanner health, the advertiser's last rotation and the privacy alarm."""
        report = self.scanner.health()
        adv = self.advertiser
        report["broadcasts"] = 0 if adv is None else adv.broadcasts
        report["last_broadcast"] = None if adv is None else adv.last_broadcast
        report["privacy_alarm"] = False if adv is None else adv.privacy_alarm
        report["privacy_alarms"] = 0 if adv is None else adv.privacy_alarms
        return report
