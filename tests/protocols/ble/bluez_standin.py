"""A stand-in for BlueZ on a private D-Bus bus: the adapter ``/org/bluez/hci0`` with the two
interfaces a pilot's advertiser uses, behaving as ``bluetoothd`` documents them
(``doc/org.bluez.LEAdvertisingManager.rst``, ``org.bluez.Adapter.rst``):

* ``org.bluez.Adapter1``: ``Discoverable`` and ``Connectable`` (read-write; a change is signalled
  with ``PropertiesChanged``), ``Address`` and ``Powered``;
* ``org.bluez.LEAdvertisingManager1``: ``RegisterAdvertisement(o, a{sv})`` reads the
  advertisement's properties from its owner over the bus (as BlueZ does), keeps it on the air
  until ``UnregisterAdvertisement(o)`` or its ``Timeout``, then calls its ``Release()``;
  unregistering an unknown object fails with ``org.bluez.Error.DoesNotExist``.

It records every registration (when, what) for the tests to check. It runs a real
``dbus-daemon`` (the session configuration, on a socket in a temporary directory).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from dbus_fast import DBusError, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusObjectPath, DBusSignature, DBusStr
from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_method, dbus_property

ADVERTISEMENT = "org.bluez.LEAdvertisement1"


def dbus_daemon() -> str | None:
    """The ``dbus-daemon`` binary, if this machine has one."""
    return shutil.which("dbus-daemon")


class PrivateBus:
    """A ``dbus-daemon`` of our own, listening on a socket under ``directory``."""

    def __init__(self, directory: Path) -> None:
        binary = dbus_daemon()
        assert binary is not None
        self.process = subprocess.Popen(
            [binary, "--session", "--nofork", "--print-address=1",
             f"--address=unix:path={directory / 'bus'}"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.address = self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass
class Registration:
    """One advertisement BlueZ put on the air."""

    path: str
    owner: str
    properties: dict[str, Any]
    registered: float
    removed: float | None = None
    how: str = ""  # "unregistered" or "timeout"


class Adapter(ServiceInterface):
    """``org.bluez.Adapter1`` (the settings a pilot cares about)."""

    def __init__(self, discoverable: bool, connectable: bool) -> None:
        super().__init__("org.bluez.Adapter1")
        self._discoverable = discoverable
        self._connectable = connectable

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return "00:1A:7D:DA:71:13"

    @dbus_property(access=PropertyAccess.READ)
    def Powered(self) -> DBusBool:
        return True

    @dbus_property()
    def Discoverable(self) -> DBusBool:
        return self._discoverable

    @Discoverable.setter
    def Discoverable(self, value: DBusBool) -> None:
        self.turn("Discoverable", value)

    @dbus_property()
    def Connectable(self) -> DBusBool:
        return self._connectable

    @Connectable.setter
    def Connectable(self, value: DBusBool) -> None:
        self.turn("Connectable", value)

    def turn(self, name: str, value: bool) -> None:
        """Change a setting (a client's Set, or someone at the desktop) and signal it."""
        setattr(self, f"_{name.lower()}", bool(value))
        self.emit_properties_changed({name: bool(value)})


class AdvertisingManager(ServiceInterface):
    """``org.bluez.LEAdvertisingManager1``."""

    def __init__(self, bluez: StandInBlueZ) -> None:
        super().__init__("org.bluez.LEAdvertisingManager1")
        self._bluez = bluez

    @dbus_method()
    async def RegisterAdvertisement(
        self,
        advertisement: DBusObjectPath,
        options: Annotated[dict[str, Variant], DBusSignature("a{sv}")],
    ):
        bluez = self._bluez
        owner = bluez.current_sender
        # BlueZ reads the advertisement's properties from the object's owner
        intro = await bluez.bus.introspect(owner, advertisement)
        proxy = bluez.bus.get_proxy_object(owner, advertisement, intro)
        props = await proxy.get_interface("org.freedesktop.DBus.Properties").call_get_all(
            ADVERTISEMENT
        )
        reg = Registration(
            advertisement, owner, {k: v.value for k, v in props.items()}, time.monotonic()
        )
        bluez.registrations.append(reg)
        timeout = reg.properties.get("Timeout")
        if timeout:
            asyncio.get_running_loop().call_later(timeout, bluez.expire, reg, proxy)

    @dbus_method()
    def UnregisterAdvertisement(self, advertisement: DBusObjectPath):
        for reg in self._bluez.active():
            if reg.path == advertisement:
                reg.removed, reg.how = time.monotonic(), "unregistered"
                return
        raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")


@dataclass
class StandInBlueZ:
    """The stand-in service, connected to ``address`` as ``org.bluez``."""

    address: str
    discoverable: bool = False
    connectable: bool = False
    registrations: list[Registration] = field(default_factory=list)
    releases: list[str] = field(default_factory=list)

    async def start(self) -> None:
        self.bus = await MessageBus(bus_address=self.address).connect()
        self.adapter = Adapter(self.discoverable, self.connectable)
        self.bus.export("/org/bluez/hci0", self.adapter)
        self.bus.export("/org/bluez/hci0", AdvertisingManager(self))
        self.current_sender = ""
        # dbus-fast hands a method no message: note each call's sender for the manager
        self.bus.add_message_handler(self._note_sender)
        await self.bus.request_name("org.bluez")

    def _note_sender(self, message: Any) -> None:
        if message.interface == "org.bluez.LEAdvertisingManager1":
            self.current_sender = message.sender

    def active(self) -> list[Registration]:
        """What is on the air now."""
        return [r for r in self.registrations if r.removed is None]

    def expire(self, reg: Registration, proxy: Any) -> None:
        """The advertisement's Timeout passed: take it off the air and tell its owner."""
        if reg.removed is not None:
            return
        reg.removed, reg.how = time.monotonic(), "timeout"
        self.releases.append(reg.path)
        asyncio.get_running_loop().create_task(proxy.get_interface(ADVERTISEMENT).call_release())

    def close(self) -> None:
        self.bus.disconnect()
