"""The Exposure Notification advertising payload (legacy advertising, 31 bytes).

Layout, as a sequence of AD structures ``[length][type][value...]``::

    02 01 1A                  Flags: LE General Discoverable, BR/EDR not supported
    03 03 6F FD               Complete list of 16-bit service UUIDs: [0xFD6F]
    17 16 6F FD <RPI 16> <AEM 4>   Service data, 16-bit UUID 0xFD6F: RPI || AEM

UUIDs are little-endian on the air. The metadata version (byte 0 of the 4 metadata bytes) sits
inside the *encrypted* AEM, so a scanner cannot check it; it is checked when the AEM is decrypted
(:func:`protocols.ble.gaen.parse_metadata`, :class:`~protocols.ble.errors.BadVersion`).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.ble.errors import (
    MissingServiceData,
    TruncatedAdvert,
    WrongLength,
    WrongServiceUUID,
)
from protocols.ble.gaen import AEM_LEN, RPI_LEN

#: The Exposure Notification service UUID (16-bit, assigned to the GAEN framework).
EN_SERVICE_UUID16 = 0xFD6F
#: The same UUID in the 128-bit form that bleak uses for ``service_data`` keys.
EN_SERVICE_UUID128 = "0000fd6f-0000-1000-8000-00805f9b34fb"
AD_FLAGS = 0x01
AD_COMPLETE_UUID16 = 0x03
AD_INCOMPLETE_UUID16 = 0x02
AD_SERVICE_DATA16 = 0x16
#: LE General Discoverable Mode | BR/EDR Not Supported | simultaneous LE+BR/EDR bits as in GAEN.
FLAGS_VALUE = 0x1A
SERVICE_DATA_LEN = RPI_LEN + AEM_LEN
MAX_LEGACY_ADV_LEN = 31


@dataclass(frozen=True)
class Beacon:
    """What one Exposure Notification advert carries: the RPI and its encrypted metadata."""

    rpi: bytes
    aem: bytes


def encode_service_data(rpi: bytes, aem: bytes) -> bytes:
    """The 20-byte 0xFD6F service-data value: RPI || AEM."""
    if len(rpi) != RPI_LEN:
        raise WrongLength(f"RPI must be {RPI_LEN} bytes, got {len(rpi)}")
    if len(aem) != AEM_LEN:
        raise WrongLength(f"AEM must be {AEM_LEN} bytes, got {len(aem)}")
    return bytes(rpi) + bytes(aem)


def encode_advert(rpi: bytes, aem: bytes) -> bytes:
    """The full 31-byte advertising payload for one (RPI, AEM)."""
    value = encode_service_data(rpi, aem)
    uuid_le = EN_SERVICE_UUID16.to_bytes(2, "little")
    return (
        bytes([2, AD_FLAGS, FLAGS_VALUE])
        + bytes([3, AD_COMPLETE_UUID16])
        + uuid_le
        + bytes([1 + 2 + len(value), AD_SERVICE_DATA16])
        + uuid_le
        + value
    )


def decode_service_data(value: bytes) -> Beacon:
    """Decode the 0xFD6F service-data value (RPI || AEM); :class:`WrongLength` otherwise."""
    if len(value) != SERVICE_DATA_LEN:
        raise WrongLength(
            f"0xFD6F service data must be {SERVICE_DATA_LEN} bytes (RPI 16 + AEM 4), "
            f"got {len(value)}"
        )
    return Beacon(rpi=bytes(value[:RPI_LEN]), aem=bytes(value[RPI_LEN:]))


def ad_structures(payload: bytes) -> list[tuple[int, bytes]]:
    """Split an advertising payload into ``(ad_type, value)`` pairs.

    A zero length byte ends the significant part (the rest is padding, per the Core spec).
    """
    if len(payload) > MAX_LEGACY_ADV_LEN:
        raise WrongLength(
            f"legacy advertising payload is at most {MAX_LEGACY_ADV_LEN} bytes, got {len(payload)}"
        )
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(payload):
        length = payload[pos]
        if length == 0:
            break
        end = pos + 1 + length
        if end > len(payload):
            raise TruncatedAdvert(
                f"AD structure at offset {pos} declares {length} bytes, only "
                f"{len(payload) - pos - 1} remain"
            )
        out.append((payload[pos + 1], bytes(payload[pos + 2 : end])))
        pos = end
    return out


def decode_advert(payload: bytes) -> Beacon:
    """Decode a full advertising payload into a :class:`Beacon`.

    Raises a specific :class:`~protocols.ble.errors.AdvertError`: :class:`TruncatedAdvert`,
    :class:`WrongServiceUUID` (the UUID list or service data names another service),
    :class:`MissingServiceData`, :class:`WrongLength`.
    """
    found: Beacon | None = None
    for ad_type, value in ad_structures(payload):
        if ad_type in (AD_COMPLETE_UUID16, AD_INCOMPLETE_UUID16):
            if len(value) % 2:
                raise WrongLength(f"16-bit UUID list has odd length {len(value)}")
            uuids = [int.from_bytes(value[i : i + 2], "little") for i in range(0, len(value), 2)]
            if EN_SERVICE_UUID16 not in uuids:
                listed = ", ".join(f"0x{u:04X}" for u in uuids)
                raise WrongServiceUUID(f"service UUID list [{listed}] lacks 0xFD6F")
        elif ad_type == AD_SERVICE_DATA16:
            if len(value) < 2:
                raise WrongLength(f"service data needs a 2-byte UUID, got {len(value)} bytes")
            uuid = int.from_bytes(value[:2], "little")
            if uuid != EN_SERVICE_UUID16:
                raise WrongServiceUUID(f"service data for UUID 0x{uuid:04X}, expected 0xFD6F")
            found = decode_service_data(value[2:])
    if found is None:
        raise MissingServiceData("advert has no 0xFD6F service data")
    return found
