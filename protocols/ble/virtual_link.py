"""An in-process Bluetooth LE link for tests: bumble virtual controllers, bleak's scanner API.

bleak ships no bumble backend (bleak 3.x has BlueZ, CoreBluetooth, WinRT and Android ones), so
this module provides one: :class:`BumbleScannerBackend` is a ``bleak.backends.scanner.
BaseBleakScanner`` whose radio is a bumble ``Device`` on a bumble ``LocalLink``. The project's
scanner then runs the *unmodified* bleak API (``BleakScanner(..., backend=BumbleScannerBackend)``)
and its detection callback receives the adverts that other virtual devices broadcast.

:class:`VirtualAdvertiser` is the advertising side a pilot device would run on an HCI dongle with
bumble: it broadcasts the Exposure Notification payload of its current RPI and rotates RPI, AEM
and random address each interval. Bumble's virtual controller reports a fixed RSSI (-50 dBm),
so these tests exercise formats and code paths, not radio physics.
"""

from __future__ import annotations

from typing import Any, Literal

from bleak.backends.scanner import AdvertisementData, BaseBleakScanner
from bumble.controller import Controller
from bumble.core import AdvertisingData
from bumble.device import Advertisement, AdvertisingType, Device
from bumble.hci import Address, OwnAddressType
from bumble.link import LocalLink

from protocols.ble.advert import encode_advert
from protocols.ble.gaen import KeyRoller

_BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"


def _uuid16_to_128(value: int) -> str:
    return f"0000{value:04x}{_BASE_UUID_SUFFIX}"


def advertisement_data(adv: Advertisement) -> AdvertisementData:
    """bleak's ``AdvertisementData`` from a bumble advertising report, as an OS stack builds it.

    Structures the stack cannot interpret are skipped (as BlueZ does); interpreting the
    Exposure Notification service data is left to the project's decoder.
    """
    service_data: dict[str, bytes] = {}
    uuids: list[str] = []
    name: str | None = None
    tx_power: int | None = None
    for ad_type, value in adv.data.ad_structures:
        if ad_type == AdvertisingData.SERVICE_DATA_16_BIT_UUID and len(value) >= 2:
            service_data[_uuid16_to_128(int.from_bytes(value[:2], "little"))] = bytes(value[2:])
        elif ad_type in (
            AdvertisingData.COMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
            AdvertisingData.INCOMPLETE_LIST_OF_16_BIT_SERVICE_CLASS_UUIDS,
        ):
            uuids += [
                _uuid16_to_128(int.from_bytes(value[i : i + 2], "little"))
                for i in range(0, len(value) - 1, 2)
            ]
        elif ad_type == AdvertisingData.COMPLETE_LOCAL_NAME:
            name = value.decode("utf-8", "replace")
        elif ad_type == AdvertisingData.TX_POWER_LEVEL and len(value) == 1:
            tx_power = value[0] - 256 if value[0] >= 128 else value[0]
    return AdvertisementData(
        local_name=name,
        manufacturer_data={},
        service_data=service_data,
        service_uuids=uuids,
        tx_power=tx_power,
        rssi=adv.rssi,
        platform_data=(adv,),
    )


class BumbleScannerBackend(BaseBleakScanner):
    """A bleak scanner backend whose radio is a bumble ``Device`` (pass ``bumble_device=``)."""

    def __init__(
        self,
        detection_callback: Any,
        service_uuids: list[str] | None,
        scanning_mode: Literal["active", "passive"] = "passive",
        *,
        bumble_device: Device,
        **_platform_args: Any,  # bleak passes bluez=/cb= platform arguments to every backend
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        self._device = bumble_device
        self._active = scanning_mode == "active"
        self._listening = False

    def _on_advertisement(self, adv: Advertisement) -> None:
        data = advertisement_data(adv)
        if not self.is_allowed_uuid(data.service_uuids):
            return
        address = str(adv.address).split("/")[0]
        device = self.create_or_update_device(address, address, data.local_name, adv, data)
        self.call_detection_callbacks(device, data)

    async def start(self) -> None:
        """Start scanning on the bumble device."""
        self.seen_devices = {}
        self._device.on("advertisement", self._on_advertisement)
        self._listening = True
        await self._device.start_scanning(active=self._active, filter_duplicates=False)

    async def stop(self) -> None:
        """Stop scanning and detach the listener (safe to call after a failed start)."""
        if self._listening:
            self._device.remove_listener("advertisement", self._on_advertisement)
            self._listening = False
        if self._device.is_scanning:
            await self._device.stop_scanning()


class VirtualLink:
    """Several bumble devices sharing one in-process link."""

    def __init__(self) -> None:
        self.link = LocalLink()
        self._n = 0

    async def add_device(self, name: str) -> Device:
        """A powered-on bumble device with its own virtual controller on the link."""
        self._n += 1
        controller = Controller(name, link=self.link)
        address = Address(f"F0:00:00:00:00:{self._n:02X}")
        device = Device.with_hci(name, address, controller, controller)
        await device.power_on()
        return device


class VirtualAdvertiser:
    """Broadcasts rotating Exposure Notification beacons from a bumble device.

    ``payload_for`` may override the payload (tests use it to broadcast malformed adverts).
    """

    def __init__(
        self,
        device: Device,
        roller: KeyRoller,
        metadata: bytes,
        interval_ms: float = 100.0,
    ) -> None:
        self.device = device
        self.roller = roller
        self.metadata = metadata
        self.interval_ms = interval_ms

    async def broadcast_at(self, unix_seconds: float, payload: bytes | None = None) -> bytes:
        """(Re)start advertising the beacon of ``unix_seconds``'s interval; returns the payload.

        Each rotation also draws a new non-resolvable random address, so address and RPI
        change together and the advertiser cannot be followed across intervals.
        """
        if payload is None:
            rpi, aem = self.roller.identifiers_at(unix_seconds, self.metadata)
            payload = encode_advert(rpi, aem)
        if self.device.is_advertising:
            await self.device.stop_advertising()
        self.device.random_address = Address.generate_private_address()
        await self.device.start_advertising(
            advertising_type=AdvertisingType.UNDIRECTED,
            own_address_type=OwnAddressType.RANDOM,
            advertising_data=payload,
            advertising_interval_min=self.interval_ms,
            advertising_interval_max=self.interval_ms,
        )
        return payload

    async def stop(self) -> None:
        """Stop advertising."""
        if self.device.is_advertising:
            await self.device.stop_advertising()
