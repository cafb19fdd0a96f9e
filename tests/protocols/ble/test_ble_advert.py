"""Advertising payload: exact layout, round trip, and each malformation's specific error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.ble.advert import Beacon, decode_advert, decode_service_data, encode_advert
from protocols.ble.errors import (
    AdvertError,
    MissingServiceData,
    TruncatedAdvert,
    WrongLength,
    WrongServiceUUID,
)

RPI = bytes(range(16))
AEM = b"\xaa\xbb\xcc\xdd"


def test_layout_is_exact() -> None:
    payload = encode_advert(RPI, AEM)
    assert len(payload) == 31
    assert payload.hex() == "02011a03036ffd17166ffd" + RPI.hex() + AEM.hex()
    assert decode_advert(payload) == Beacon(RPI, AEM)
    assert decode_service_data(RPI + AEM) == Beacon(RPI, AEM)


@pytest.mark.parametrize(
    ("payload", "error", "message"),
    [
        (encode_advert(RPI, AEM)[:-3], TruncatedAdvert, "declares 23 bytes, only 20 remain"),
        (bytes.fromhex("02011a03036efd17166ffd") + RPI + AEM, WrongServiceUUID, r"\[0xFD6E\]"),
        (bytes.fromhex("02011a03036ffd17166efd") + RPI + AEM, WrongServiceUUID, "UUID 0xFD6E"),
        (bytes.fromhex("02011a03036ffd16166ffd") + RPI + AEM[:3], WrongLength, "got 19"),
        (
            bytes.fromhex("02011a03036ffd") + bytes.fromhex("0aff4c00") + bytes(7),
            MissingServiceData,
            "no 0xFD6F service data",
        ),
        (encode_advert(RPI, AEM) + b"\x00", WrongLength, "at most 31 bytes"),
        (bytes.fromhex("02011a04036ffd00") + bytes(4), WrongLength, "odd length"),
    ],
    ids=["truncated", "uuid-list", "service-data-uuid", "short", "missing", "too-long", "odd"],
)
def test_malformed_adverts_rejected(payload: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        decode_advert(payload)
    assert isinstance(info.value, AdvertError) and isinstance(info.value, ValueError)


def test_service_data_length() -> None:
    with pytest.raises(WrongLength, match=r"must be 20 bytes \(RPI 16 \+ AEM 4\), got 21"):
        decode_service_data(RPI + AEM + b"\x00")
    with pytest.raises(WrongLength, match="RPI must be 16 bytes"):
        encode_advert(RPI[:8], AEM)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 30), st.binary(max_size=4))
def test_any_payload_decodes_or_raises_an_advert_error(noise: bytes, cut: int, tail: bytes) -> None:
    """Fuzz: random bytes and mutated real adverts never escape as anything but AdvertError."""
    mutated = encode_advert(RPI, AEM)[:cut] + tail
    for payload in (noise, mutated):
        try:
            beacon = decode_advert(payload)
        except AdvertError:
            continue
        assert len(beacon.rpi) == 16 and len(beacon.aem) == 4
