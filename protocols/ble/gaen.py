"""Exposure Notification beacon cryptography, version 1.2 (Google/Apple).

Key schedule (all from the *Exposure Notification Cryptography Specification* v1.2):

* ``ENIntervalNumber(t) = floor(t / 600)``: time in 10-minute intervals since the Unix epoch.
* A Temporary Exposure Key (TEK, 16 random bytes) is valid for ``TEKRollingPeriod = 144``
  intervals (one day); a device rolls to a fresh TEK every day.
* ``RPIK = HKDF-SHA256(TEK, salt=None, info="EN-RPIK", 16)`` and
  ``AEMK = HKDF-SHA256(TEK, salt=None, info="EN-AEMK", 16)``.
* ``RPI_j = AES-128(RPIK, "EN-RPI" || 0x000000000000 || ENIN_j)`` with ``ENIN_j`` as a
  little-endian uint32: one Rolling Proximity Identifier per interval, so the broadcast
  identifier changes every 10 minutes.
* ``AEM = AES-128-CTR(AEMK, IV=RPI, metadata)``: 4 bytes of encrypted metadata (version, TX
  power) that only someone who later learns the TEK can read.

All primitives come from ``cryptography``; TEKs come from ``os.urandom``.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.ble.errors import BadVersion, CryptoInputError

#: Seconds per ENIntervalNumber.
EN_INTERVAL_SECONDS = 600
#: Intervals a TEK is valid for (one day).
TEK_ROLLING_PERIOD = 144
#: Matching accepts an RPI up to this many intervals (2 h) away from when it was heard.
MAX_CLOCK_SKEW_INTERVALS = 12
TEK_LEN = 16
RPI_LEN = 16
AEM_LEN = 4
METADATA_LEN = 4
#: Metadata byte 0 for protocol version 1.0: major in bits 7:6, minor in bits 5:4.
VERSION_1_0 = 0x40
SUPPORTED_MAJOR = 1

_RPI_PREFIX = b"EN-RPI" + bytes(6)
_MAX_ENIN = 2**32 - 1
# Stateless algorithm descriptors, built once: the simulated keyring derives ~10^5 keys a day.
_SHA256 = hashes.SHA256()
_ECB = modes.ECB()


def _check_bytes(name: str, value: object, length: int) -> bytes:
    if type(value) is bytes and len(value) == length:  # fast path for the hot key loop
        return value
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CryptoInputError(f"{name} must be bytes, got {type(value).__name__}")
    value = bytes(value)
    if len(value) != length:
        raise CryptoInputError(f"{name} must be {length} bytes, got {len(value)}")
    return value


def _check_enin(name: str, enin: object) -> int:
    if isinstance(enin, bool) or not isinstance(enin, int | np.integer):
        raise CryptoInputError(f"{name} must be an int, got {type(enin).__name__}")
    enin = int(enin)
    if not 0 <= enin <= _MAX_ENIN:
        raise CryptoInputError(f"{name} must be in [0, 2**32), got {enin}")
    return enin


def en_interval_number(unix_seconds: float) -> int:
    """The ENIntervalNumber (10-minute interval since the epoch) containing ``unix_seconds``."""
    if isinstance(unix_seconds, bool) or not isinstance(
        unix_seconds, int | float | np.integer | np.floating
    ):
        raise CryptoInputError(f"unix_seconds must be a number, got {type(unix_seconds).__name__}")
    if not math.isfinite(unix_seconds) or unix_seconds < 0:
        raise CryptoInputError(f"unix_seconds must be finite and >= 0, got {unix_seconds}")
    return _check_enin("ENIntervalNumber", int(unix_seconds // EN_INTERVAL_SECONDS))


def new_tek() -> bytes:
    """A fresh Temporary Exposure Key: 16 bytes from the operating system's CSPRNG."""
    return os.urandom(TEK_LEN)


def _hkdf(tek: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=_SHA256, length=16, salt=None, info=info).derive(tek)


def rpik(tek: bytes) -> bytes:
    """Rolling Proximity Identifier Key = HKDF-SHA256(TEK, salt=None, "EN-RPIK", 16)."""
    return _hkdf(_check_bytes("TEK", tek, TEK_LEN), b"EN-RPIK")


def aemk(tek: bytes) -> bytes:
    """Associated Encrypted Metadata Key = HKDF-SHA256(TEK, salt=None, "EN-AEMK", 16)."""
    return _hkdf(_check_bytes("TEK", tek, TEK_LEN), b"EN-AEMK")


def aes_ecb(key: bytes, blocks: bytes) -> bytes:
    """AES-128-ECB of whole 16-byte blocks under one key (the RPI and batch-AEM primitive)."""
    enc = Cipher(algorithms.AES(key), _ECB).encryptor()
    return enc.update(blocks) + enc.finalize()


def padded_blocks(enins: np.ndarray) -> bytes:
    """The AES inputs "EN-RPI" || 0^6 || ENIN (uint32 LE) for many intervals, as one buffer."""
    blocks = np.empty((enins.size, 16), dtype=np.uint8)
    blocks[:, :12] = np.frombuffer(_RPI_PREFIX, dtype=np.uint8)
    blocks[:, 12:] = enins.astype("<u4").view(np.uint8).reshape(-1, 4)
    return blocks.tobytes()


def rpi(rpik: bytes, enin: int) -> bytes:
    """The Rolling Proximity Identifier broadcast during interval ``enin``."""
    key = _check_bytes("RPIK", rpik, 16)
    return aes_ecb(key, _RPI_PREFIX + struct.pack("<I", _check_enin("ENIN", enin)))


def rpi_batch(rpik: bytes, enins: Iterable[int] | np.ndarray) -> np.ndarray:
    """RPIs of one key for many intervals, shape ``(n, 16)`` uint8, in one AES-ECB call."""
    key = _check_bytes("RPIK", rpik, 16)
    arr = np.asarray(enins if isinstance(enins, np.ndarray) else list(enins), dtype=np.int64)
    if arr.ndim != 1:
        raise CryptoInputError(f"enins must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > _MAX_ENIN):
        raise CryptoInputError("enins must lie in [0, 2**32)")
    out = aes_ecb(key, padded_blocks(arr))
    return np.frombuffer(out, dtype=np.uint8).reshape(-1, RPI_LEN).copy()


def aem(aemk: bytes, rpi: bytes, metadata: bytes) -> bytes:
    """Associated Encrypted Metadata = AES-128-CTR(AEMK, IV=RPI, metadata)."""
    key = _check_bytes("AEMK", aemk, 16)
    iv = _check_bytes("RPI", rpi, RPI_LEN)
    data = _check_bytes("metadata", metadata, METADATA_LEN)
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return enc.update(data) + enc.finalize()


def aem_decrypt(aemk: bytes, rpi: bytes, aem: bytes) -> bytes:
    """Inverse of :func:`aem`: the 4 metadata bytes (CTR decryption)."""
    key = _check_bytes("AEMK", aemk, 16)
    iv = _check_bytes("RPI", rpi, RPI_LEN)
    data = _check_bytes("AEM", aem, AEM_LEN)
    dec = Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor()
    return dec.update(data) + dec.finalize()


def aem_batch(aemk: bytes, rpis: np.ndarray, metadata: bytes) -> np.ndarray:
    """AEMs of many RPIs under one key, shape ``(n, 4)``.

    The CTR keystream for a 4-byte message is the first 4 bytes of ``AES(AEMK, IV)`` with
    ``IV = RPI``, so one ECB call over all RPIs replaces n CTR contexts (same result as
    :func:`aem`, which the tests check).
    """
    key = _check_bytes("AEMK", aemk, 16)
    meta = _check_bytes("metadata", metadata, METADATA_LEN)
    arr = np.ascontiguousarray(rpis, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != RPI_LEN:
        raise CryptoInputError(f"rpis must have shape (n, 16), got {arr.shape}")
    stream = np.frombuffer(aes_ecb(key, arr.tobytes()), dtype=np.uint8).reshape(-1, 16)
    return stream[:, :AEM_LEN] ^ np.frombuffer(meta, dtype=np.uint8)


@dataclass(frozen=True)
class Metadata:
    """Decrypted associated metadata: protocol version and transmit power."""

    major: int
    minor: int
    tx_power_dbm: int


def encode_metadata(tx_power_dbm: int, major: int = 1, minor: int = 0) -> bytes:
    """Metadata bytes: [version (major<<6 | minor<<4), TX power (int8 dBm), 0, 0]."""
    if not (0 <= major <= 3 and 0 <= minor <= 3):
        raise CryptoInputError(f"version must be 2-bit major/minor, got {major}.{minor}")
    if isinstance(tx_power_dbm, bool) or not isinstance(tx_power_dbm, int):
        raise CryptoInputError(f"tx_power_dbm must be an int, got {type(tx_power_dbm).__name__}")
    if not -128 <= tx_power_dbm <= 127:
        raise CryptoInputError(f"tx_power_dbm must fit in int8, got {tx_power_dbm}")
    return bytes([(major << 6) | (minor << 4), tx_power_dbm & 0xFF, 0, 0])


def parse_metadata(metadata: bytes) -> Metadata:
    """Parse decrypted metadata; :class:`BadVersion` unless the major version is 1."""
    data = _check_bytes("metadata", metadata, METADATA_LEN)
    major, minor = data[0] >> 6, (data[0] >> 4) & 0x3
    if major != SUPPORTED_MAJOR:
        raise BadVersion(f"metadata version {major}.{minor} unsupported (need major 1)")
    tx = data[1] - 256 if data[1] >= 128 else data[1]
    return Metadata(major=major, minor=minor, tx_power_dbm=tx)


@dataclass(frozen=True)
class TemporaryExposureKey:
    """A TEK with its validity: intervals ``[rolling_start, rolling_start + rolling_period)``."""

    key: bytes = field(repr=False)
    rolling_start_interval_number: int
    rolling_period: int = TEK_ROLLING_PERIOD

    def __post_init__(self) -> None:
        _check_bytes("TEK", self.key, TEK_LEN)
        _check_enin("rolling_start_interval_number", self.rolling_start_interval_number)
        if not 1 <= self.rolling_period <= TEK_ROLLING_PERIOD:
            raise CryptoInputError(f"rolling_period must be in [1, 144], got {self.rolling_period}")

    @cached_property
    def rpik(self) -> bytes:
        """This key's RPIK."""
        return rpik(self.key)

    @cached_property
    def aemk(self) -> bytes:
        """This key's AEMK."""
        return aemk(self.key)

    def covers(self, enin: int) -> bool:
        """Whether interval ``enin`` lies in this key's validity."""
        start = self.rolling_start_interval_number
        return start <= enin < start + self.rolling_period

    def identifiers(self, enin: int, metadata: bytes) -> tuple[bytes, bytes]:
        """(RPI, AEM) to broadcast during interval ``enin``; it must be covered by the key."""
        if not self.covers(_check_enin("ENIN", enin)):
            raise CryptoInputError(
                f"interval {enin} outside key validity [{self.rolling_start_interval_number}, "
                f"{self.rolling_start_interval_number + self.rolling_period})"
            )
        r = rpi(self.rpik, enin)
        return r, aem(self.aemk, r, metadata)

    def all_rpis(self) -> np.ndarray:
        """All ``rolling_period`` RPIs of the key, shape ``(rolling_period, 16)``."""
        start = self.rolling_start_interval_number
        return rpi_batch(self.rpik, np.arange(start, start + self.rolling_period))


class KeyRoller:
    """A device's key schedule: one TEK per 144-interval day, identifiers rotating every interval.

    ``tek_source`` defaults to :func:`new_tek` (a real device); simulations pass a deterministic
    source. Past keys are kept for ``retention_days`` so the device can register/publish them.
    """

    def __init__(
        self,
        tek_source: Callable[[int], bytes] | None = None,
        retention_days: int = 14,
    ) -> None:
        if retention_days < 1:
            raise CryptoInputError(f"retention_days must be >= 1, got {retention_days}")
        self._source = tek_source or (lambda _start: new_tek())
        self._retention = retention_days
        self._keys: dict[int, TemporaryExposureKey] = {}

    def key_for(self, enin: int) -> TemporaryExposureKey:
        """The TEK valid at ``enin``, created when the device enters a new day."""
        start = (_check_enin("ENIN", enin) // TEK_ROLLING_PERIOD) * TEK_ROLLING_PERIOD
        key = self._keys.get(start)
        if key is None:
            key = TemporaryExposureKey(self._source(start), start)
            self._keys[start] = key
            oldest = start - self._retention * TEK_ROLLING_PERIOD
            for old in [s for s in self._keys if s <= oldest]:
                del self._keys[old]
        return key

    def identifiers_at(self, unix_seconds: float, metadata: bytes) -> tuple[bytes, bytes]:
        """(RPI, AEM) broadcast at wall-clock time ``unix_seconds``."""
        enin = en_interval_number(unix_seconds)
        return self.key_for(enin).identifiers(enin, metadata)

    def retained_keys(self) -> list[TemporaryExposureKey]:
        """Retained keys, oldest first."""
        return [self._keys[s] for s in sorted(self._keys)]
