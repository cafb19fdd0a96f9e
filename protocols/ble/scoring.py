"""Exposure scoring: sightings -> attenuation -> exposure windows -> contact weights.

One code path serves real and simulated sightings (:class:`~protocols.ble.sightings.Sightings`):

1. attenuation of each packet = ``tx_power - rssi``, clamped at 0 dB;
2. packets of the same RPI in the same scan are de-duplicated into one *scan instance* whose
   attenuation is the mean of its packets ("typical attenuation") and which credits the scan's
   ``seconds`` once;
3. scan instances of one (observer, RPI) are grouped into exposure windows of at most
   ``window_seconds`` (30 min) measured from the first instance;
4. each instance's attenuation picks a bucket (``thresholds_db``, ascending, bucket ``k`` holds
   ``thresholds[k-1] < a <= thresholds[k]``); its credit is ``(seconds / reference_seconds) *
   bucket_weight``; a window whose credited seconds exceed ``window_seconds`` is scaled down to it;
5. the contact weight of an RPI is the sum of its windows' credits: 1.0 is
   ``reference_seconds`` (15 min) in the closest bucket.

Everything is vectorized with numpy over all sightings of all observers at once.
The output is the observers' private traces: ``(observer, heard RPI, interval, weight)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocols.ble.errors import ScoringConfigError, SightingsError
from protocols.ble.gaen import (
    EN_INTERVAL_SECONDS,
    MAX_CLOCK_SKEW_INTERVALS,
    RPI_LEN,
    TemporaryExposureKey,
)
from protocols.ble.sightings import Sightings, rpi_keys


@dataclass(frozen=True)
class ScoringConfig:
    """Attenuation buckets and durations of the exposure score."""

    thresholds_db: tuple[float, ...] = (55.0, 63.0, 73.0)
    bucket_weights: tuple[float, ...] = (1.0, 0.5, 0.25, 0.0)
    reference_seconds: float = 900.0
    window_seconds: float = 1800.0
    min_weight: float = 0.0

    def __post_init__(self) -> None:
        t = np.asarray(self.thresholds_db, dtype=np.float64)
        w = np.asarray(self.bucket_weights, dtype=np.float64)
        if t.ndim != 1 or t.size == 0 or not np.isfinite(t).all() or (np.diff(t) <= 0).any():
            raise ScoringConfigError(
                f"thresholds_db must be finite and strictly increasing, got {self.thresholds_db}"
            )
        if w.size != t.size + 1:
            raise ScoringConfigError(
                f"need {t.size + 1} bucket_weights for {t.size} thresholds, got {w.size}"
            )
        if not np.isfinite(w).all() or (w < 0).any():
            raise ScoringConfigError(f"bucket_weights must be finite and >= 0, got {w.tolist()}")
        for name in ("reference_seconds", "window_seconds"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ScoringConfigError(f"{name} must be > 0, got {value}")
        if not np.isfinite(self.min_weight) or self.min_weight < 0:
            raise ScoringConfigError(f"min_weight must be >= 0, got {self.min_weight}")

    def bucket_of(self, attenuation_db: np.ndarray) -> np.ndarray:
        """Bucket index of each attenuation (0 = closest)."""
        return np.searchsorted(np.asarray(self.thresholds_db), attenuation_db, side="left")

    def weight_of_bucket(self, bucket: np.ndarray) -> np.ndarray:
        """Weight per minute-equivalent of each bucket index."""
        return np.asarray(self.bucket_weights, dtype=np.float64)[bucket]


DEFAULT_CONFIG = ScoringConfig()


@dataclass(frozen=True)
class Trace:
    """Private traces of observers, one row per heard RPI with a positive weight.

    ``beacon`` indexes the scored sightings' RPI table, ``rpi`` holds the RPI bytes and
    ``interval`` is the observer's ENIntervalNumber when it first heard the RPI.
    """

    observer: np.ndarray
    beacon: np.ndarray
    rpi: np.ndarray
    interval: np.ndarray
    weight: np.ndarray

    def __len__(self) -> int:
        return int(self.observer.size)

    def entries(self, observer: int | None = None) -> list[tuple[bytes, int, float]]:
        """``[(heard_rpi, interval, weight)]``, of one observer or of the only observer."""
        if observer is None:
            present = np.unique(self.observer)
            if present.size > 1:
                raise SightingsError(f"trace holds {present.size} observers; name the one to list")
            mask = np.ones(self.observer.size, dtype=bool)
        else:
            mask = self.observer == observer
        return [
            (bytes(r), int(i), float(w))
            for r, i, w in zip(self.rpi[mask], self.interval[mask], self.weight[mask], strict=True)
        ]


def _segments(*keys: np.ndarray) -> np.ndarray:
    """Start offsets of runs where any of the (already sorted) keys changes."""
    n = keys[0].size
    change = np.zeros(n, dtype=bool)
    if n:
        change[0] = True
        for k in keys:
            change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _sort_order(*keys: np.ndarray) -> np.ndarray:
    """Stable order of rows by ``keys`` (most significant first), like ``np.lexsort(keys[::-1])``.

    When the keys' ranges fit together in 63 bits they are packed into one int64 and sorted once
    (4x faster than a 3-key lexsort on millions of rows); otherwise lexsort. Same order both ways.
    """
    packed = np.zeros(keys[0].size, dtype=np.int64)
    used = 0
    for k in reversed(keys):
        lo = int(k.min())
        width = (int(k.max()) - lo).bit_length()
        if used + width > 63:
            return np.lexsort(keys[::-1])
        packed |= (k - lo) << used
        used += width
    return np.argsort(packed, kind="stable")


def score(sightings: Sightings, config: ScoringConfig = DEFAULT_CONFIG) -> Trace:
    """Contact weights per (observer, heard RPI): the whole pipeline of the module docstring."""
    s = sightings
    if len(s) == 0:
        none = np.zeros(0, np.int64)
        return Trace(none, none, np.zeros((0, RPI_LEN), np.uint8), none, np.zeros(0))
    attenuation = np.maximum(s.tx_power - s.rssi, 0.0)

    # 1-2. de-duplicate packets into scan instances (observer, beacon, scan).
    order = _sort_order(s.observer, s.beacon, s.scan)
    obs, bea, scn = s.observer[order], s.beacon[order], s.scan[order]
    starts = _segments(obs, bea, scn)
    counts = np.diff(np.append(starts, order.size))
    inst_att = np.add.reduceat(attenuation[order], starts) / counts
    inst_time = np.minimum.reduceat(s.time[order], starts)
    inst_sec = s.seconds[order][starts]
    inst_obs, inst_bea = obs[starts], bea[starts]

    # 3. exposure windows of <= window_seconds per (observer, beacon).
    gstarts = _segments(inst_obs, inst_bea)
    gid = np.repeat(np.arange(gstarts.size), np.diff(np.append(gstarts, inst_obs.size)))
    first = np.minimum.reduceat(inst_time, gstarts)
    widx = np.floor((inst_time - first[gid]) / config.window_seconds).astype(np.int64)
    wkey = gid * (int(widx.max()) + 1) + widx
    if (np.diff(wkey) < 0).any():  # scan ids out of time order: regroup windows
        reorder = np.argsort(wkey, kind="stable")
        wkey, inst_att, inst_sec, gid = (
            wkey[reorder],
            inst_att[reorder],
            inst_sec[reorder],
            gid[reorder],
        )
    wstarts = _segments(wkey)

    # 4. bucket credits, capped per window.
    credit = (inst_sec / config.reference_seconds) * config.weight_of_bucket(
        config.bucket_of(inst_att)
    )
    w_credit = np.add.reduceat(credit, wstarts)
    w_seconds = np.add.reduceat(inst_sec, wstarts)
    over = w_seconds > config.window_seconds
    w_credit = np.where(
        over, w_credit * (config.window_seconds / np.where(over, w_seconds, 1.0)), w_credit
    )

    # 5. contact weight per (observer, beacon).
    weight = np.bincount(gid[wstarts], weights=w_credit, minlength=gstarts.size)
    keep = weight > config.min_weight
    beacon = inst_bea[gstarts][keep]
    return Trace(
        observer=inst_obs[gstarts][keep],
        beacon=beacon,
        rpi=s.rpis[beacon],
        interval=np.floor(first[keep] / EN_INTERVAL_SECONDS).astype(np.int64),
        weight=weight[keep],
    )


def match_keys(
    rpis: np.ndarray,
    intervals: np.ndarray,
    keys: Sequence[TemporaryExposureKey],
    tolerance_intervals: int = MAX_CLOCK_SKEW_INTERVALS,
) -> np.ndarray:
    """Which key (index into ``keys``, or -1) produced each heard RPI.

    An RPI matches when it equals a key's RPI for some interval ``e`` of its validity with
    ``|e - heard interval| <= tolerance_intervals`` (default 12 = 2 h): clocks of advertiser and
    scanner may disagree by up to 2 h, and an RPI replayed later than that is rejected.
    """
    heard = np.ascontiguousarray(rpis, dtype=np.uint8)
    if heard.ndim != 2 or heard.shape[1] != RPI_LEN:
        raise SightingsError(f"rpis must have shape (n, 16), got {heard.shape}")
    intervals = np.asarray(intervals, dtype=np.int64)
    if intervals.shape != (heard.shape[0],):
        raise SightingsError("intervals must have one entry per RPI")
    if tolerance_intervals < 0:
        raise SightingsError(f"tolerance_intervals must be >= 0, got {tolerance_intervals}")
    result = np.full(heard.shape[0], -1, dtype=np.int64)
    if not keys or heard.shape[0] == 0:
        return result
    table = np.concatenate([k.all_rpis() for k in keys])
    key_idx = np.concatenate([np.full(k.rolling_period, i) for i, k in enumerate(keys)])
    enin = np.concatenate(
        [np.arange(k.rolling_period) + k.rolling_start_interval_number for k in keys]
    )
    tkeys = rpi_keys(table)
    order = np.argsort(tkeys)
    sorted_keys = tkeys[order]
    hkeys = rpi_keys(heard)
    pos = np.minimum(np.searchsorted(sorted_keys, hkeys), sorted_keys.size - 1)
    hit = sorted_keys[pos] == hkeys
    row = order[pos]
    ok = hit & (np.abs(enin[row] - intervals) <= tolerance_intervals)
    result[ok] = key_idx[row[ok]]
    return result
