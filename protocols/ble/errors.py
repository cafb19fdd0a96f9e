"""Exceptions of the BLE contact-tracing protocol.

Every error raised on bad input is a subclass of :class:`BleError` *and* of ``ValueError``, so
callers can catch the whole family or one precise case; the message always names the field.
"""

from __future__ import annotations


class BleError(ValueError):
    """Base class of every error raised by ``protocols.ble``."""


class CryptoInputError(BleError):
    """A key, identifier, interval number or metadata block has the wrong type, size or range."""


class AdvertError(BleError):
    """An advertising payload is malformed; the subclass says how (the scanner counts these)."""


class TruncatedAdvert(AdvertError):
    """An AD structure's length byte runs past the end of the payload."""


class MissingServiceData(AdvertError):
    """The payload carries no 16-bit service data for UUID 0xFD6F."""


class WrongServiceUUID(AdvertError):
    """The 16-bit service UUID list or the service data names a UUID other than 0xFD6F."""


class WrongLength(AdvertError):
    """The 0xFD6F service data is not exactly RPI (16 bytes) + AEM (4 bytes)."""


class BadVersion(AdvertError):
    """Decrypted metadata announces a protocol major version this code does not speak."""


class SightingsError(BleError):
    """Sightings arrays are inconsistent (lengths, dtypes, ranges)."""


class ScoringConfigError(BleError):
    """A scoring configuration is invalid (thresholds, weights, durations)."""


class RadioInputError(BleError):
    """Day contacts or radio parameters are invalid."""


class ScannerConfigError(BleError):
    """Scanner settings are invalid (scan window/interval, timeouts, scanning mode)."""
