"""Sightings: the one format shared by real scanners, the simulated radio and the ideal radio.

A sighting is one received advertising packet. Columns (numpy arrays of equal length ``n``):

``observer``  int64   the device that heard the packet (a real device has one value)
``beacon``    int64   row of ``rpis`` (the unique RPIs heard), so 16-byte RPIs are stored once
``rssi``      float64 received signal strength, dBm
``tx_power``  float64 the transmitter's calibrated TX power, dBm (attenuation = tx_power - rssi)
``time``      float64 reception time, Unix seconds on the observer's clock
``scan``      int64   scan identifier; unique per observer and increasing with time
``seconds``   float64 seconds credited to that scan (the "seconds since last scan" of GAEN):
                      the duty-cycle period a scan stands for
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocols.ble.errors import SightingsError
from protocols.ble.gaen import RPI_LEN

_COLUMNS = ("observer", "beacon", "rssi", "tx_power", "time", "scan", "seconds")
_INT = ("observer", "beacon", "scan")


@dataclass(frozen=True)
class Sightings:
    """Columnar sightings plus the table of heard RPIs (see the module docstring)."""

    observer: np.ndarray
    beacon: np.ndarray
    rpis: np.ndarray
    rssi: np.ndarray
    tx_power: np.ndarray
    time: np.ndarray
    scan: np.ndarray
    seconds: np.ndarray

    def __post_init__(self) -> None:
        n = None
        for name in _COLUMNS:
            col = getattr(self, name)
            if not isinstance(col, np.ndarray) or col.ndim != 1:
                raise SightingsError(f"sightings.{name} must be a 1-D numpy array")
            want = np.int64 if name in _INT else np.float64
            if col.dtype != want:
                raise SightingsError(f"sightings.{name} must be {np.dtype(want)}, got {col.dtype}")
            if n is None:
                n = col.size
            elif col.size != n:
                raise SightingsError(f"sightings.{name} has {col.size} rows, observer has {n}")
        if (
            not isinstance(self.rpis, np.ndarray)
            or self.rpis.dtype != np.uint8
            or self.rpis.ndim != 2
            or self.rpis.shape[1] != RPI_LEN
        ):
            raise SightingsError("sightings.rpis must be a uint8 array of shape (m, 16)")
        if n:
            if self.beacon.min() < 0 or self.beacon.max() >= self.rpis.shape[0]:
                raise SightingsError(
                    f"sightings.beacon must index rpis (0..{self.rpis.shape[0] - 1})"
                )
            for name in ("rssi", "tx_power", "time", "seconds"):
                if not np.isfinite(getattr(self, name)).all():
                    raise SightingsError(f"sightings.{name} must be finite")
            if (self.seconds < 0).any():
                raise SightingsError("sightings.seconds must be >= 0")
            if (self.time < 0).any():
                raise SightingsError("sightings.time must be >= 0 (Unix seconds)")

    def __len__(self) -> int:
        return int(self.observer.size)

    def for_observer(self, observer: int) -> Sightings:
        """The sightings of one device (the RPI table is shared, not copied)."""
        mask = self.observer == observer
        return Sightings(**{c: getattr(self, c)[mask] for c in _COLUMNS}, rpis=self.rpis)

    def subset(self, rows: np.ndarray, beacon: np.ndarray, rpis: np.ndarray) -> Sightings:
        """The sightings ``rows`` (a mask or indices), their beacons renumbered to ``beacon``
        into the RPI table ``rpis``."""
        return Sightings(
            **{c: getattr(self, c)[rows] for c in _COLUMNS if c != "beacon"},
            beacon=beacon,
            rpis=rpis,
        )

    @staticmethod
    def concat(parts: list[Sightings]) -> Sightings:
        """Several sightings as one (their RPI tables appended; one RPI heard in two parts
        appears twice in the table, which scoring treats as two beacons)."""
        if not parts:
            return Sightings.empty()
        offsets = np.cumsum([0] + [p.rpis.shape[0] for p in parts[:-1]])
        return Sightings(
            **{
                c: np.concatenate([getattr(p, c) for p in parts]) for c in _COLUMNS if c != "beacon"
            },
            beacon=np.concatenate([p.beacon + o for p, o in zip(parts, offsets, strict=True)]),
            rpis=np.concatenate([p.rpis for p in parts]),
        )

    @staticmethod
    def empty() -> Sightings:
        """No sightings."""
        i, f = np.zeros(0, np.int64), np.zeros(0, np.float64)
        return Sightings(i, i, np.zeros((0, RPI_LEN), np.uint8), f, f, f, i, f)


def rpi_keys(rpis: np.ndarray) -> np.ndarray:
    """16-byte rows as one opaque numpy scalar each, so they can be sorted and searched."""
    return np.ascontiguousarray(rpis, dtype=np.uint8).view(np.dtype((np.void, RPI_LEN))).ravel()
