"""Radios: turn a day of the simulator's contacts into sightings (the scanners' format).

Input (:class:`DayContacts`): directed contacts ``src -> dst`` with a weight, as the simulator's
message flows. A contact ``(src, dst, w)`` means *src hears dst's beacons*: src will post its
message to the slot derived from dst's RPI, and dst (who registered that slot) collects it. A
physical encounter between i and j is listed in both directions; the two directions share the
encounter's physical draws (distance, duration, environment) and differ in body loss and
per-packet noise.

Weight -> physics (both radios): a contact of weight ``w`` lasts ``w * reference_seconds``
(15 min for ``w = 1``) at a distance whose attenuation falls in the closest bucket; a weight-1
contact is "15 minutes at about 1 m". :class:`IdealRadio` realizes that exactly and scoring
returns ``w`` bit for bit; :class:`SimulatedRadio` draws distance, duration, path loss, shadowing,
body loss, noise and duty-cycled scans around it.

Every random draw is ``sim.rng.bits(seed, counter, day, purpose)`` (computed by
:func:`counter_bits`, its numpy twin) with a per-contact counter hashed from (unordered pair,
occurrence): reproducible per contact, independent of the order or batch in which contacts are
processed.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from protocols.ble import gaen
from protocols.ble.errors import RadioInputError
from protocols.ble.scoring import DEFAULT_CONFIG, ScoringConfig
from protocols.ble.sightings import Sightings
from protocols.ble.simkeys import SimulatedKeyring
from sim import rng

#: 2020-04-02T00:00Z, the day of the published test vectors: simulated day 0.
DEFAULT_EPOCH = 1585785600
DAY_SECONDS = 86400
#: Median path loss at 1 m for a 2.4 GHz phone-to-phone link.
PATH_LOSS_1M_DB = 41.0
#: TX power advertised in the metadata of simulated devices (dBm).
NOMINAL_TX_POWER_DBM = -8
_GOLDEN = np.int64(-7046029254386353131)  # 0x9E3779B97F4A7C15 as int64
_U_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U_C1 = np.uint64(0xBF58476D1CE4E5B9)
_U_C2 = np.uint64(0x94D049BB133111EB)


class RadioPurpose(IntEnum):
    """Purposes of the radio's random streams (``sim.rng``: protocols use >= 100).

    Each stream yields two 32-bit uniforms per counter (see ``_uniform_pair``).
    """

    CONTACT_KEY = 100
    START_EXPONENT = 101
    DURATION = 102
    DISTANCE = 103
    SHADOW_SIGMA_BODY = 104
    SHADOWING = 105
    PACKET = 106
    SCAN_PHASE_SKEW = 107


@dataclass(frozen=True)
class DayContacts:
    """One simulated day of directed contacts ``src -> dst`` (src hears dst's beacons)."""

    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    day: int

    def __post_init__(self) -> None:
        for name, dtype in (("src", np.int64), ("dst", np.int64), ("weight", np.float64)):
            col = getattr(self, name)
            if not isinstance(col, np.ndarray) or col.ndim != 1 or col.dtype != dtype:
                raise RadioInputError(f"contacts.{name} must be a 1-D {np.dtype(dtype)} array")
        if not self.src.size == self.dst.size == self.weight.size:
            raise RadioInputError(
                f"contacts.src/dst/weight lengths differ: "
                f"{self.src.size}/{self.dst.size}/{self.weight.size}"
            )
        if isinstance(self.day, bool) or not isinstance(self.day, int) or self.day < 0:
            raise RadioInputError(f"contacts.day must be an int >= 0, got {self.day!r}")
        if self.src.size:
            if (
                min(self.src.min(), self.dst.min()) < 0
                or max(self.src.max(), self.dst.max()) >= 2**31
            ):
                raise RadioInputError("device ids must lie in [0, 2**31)")
            if (self.src == self.dst).any():
                raise RadioInputError("a device cannot be in contact with itself (src == dst)")
            if not np.isfinite(self.weight).all() or (self.weight <= 0).any():
                raise RadioInputError("contact weights must be finite and > 0")

    def __len__(self) -> int:
        return int(self.src.size)


@dataclass(frozen=True)
class RadioDay:
    """What a radio produced for one day: the sightings plus simulation-only ground truth.

    ``beacon_owner[b]`` / ``beacon_enin[b]`` say who broadcast ``sightings.rpis[b]`` and when;
    a real scanner never knows them; tests and plots use them to check the trace.
    """

    sightings: Sightings
    beacon_owner: np.ndarray
    beacon_enin: np.ndarray


def counter_bits(seed: int, ids: np.ndarray, step: int, purpose: int) -> np.ndarray:
    """``sim.rng.bits(seed, ids, step, purpose)`` bit for bit, as uint64, computed with numpy.

    Same SplitMix64 stream (key from :func:`sim.rng.stream_key`, then ``mix64(key + (id + 1) *
    GOLDEN)``; a test pins the equality). The radio's draws run on numpy arrays, and torch's
    int64 version costs a tensor round trip, masks to emulate logical shifts, and intra-op thread
    hand-offs that stall by 10x on a loaded 2-core machine; numpy's uint64 shifts are logical and
    its element-wise loops single-threaded, so this is 2-3x faster and load-independent.
    """
    key = np.uint64(rng.stream_key(seed, step, purpose))
    x = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64) + np.uint64(1)
    x *= _U_GOLDEN
    x += key
    x ^= x >> np.uint64(30)
    x *= _U_C1
    x ^= x >> np.uint64(27)
    x *= _U_C2
    x ^= x >> np.uint64(31)
    return x


def _uniform_pair(
    seed: int, ids: np.ndarray, day: int, purpose: RadioPurpose
) -> tuple[np.ndarray, np.ndarray]:
    """Two independent uniforms in [0, 1) with 32-bit resolution from one 64-bit draw.

    Physical draws need no more resolution, and one hash per pair halves the cost of the
    counter-based generator on millions of packets.
    """
    b = counter_bits(seed, ids, day, int(purpose))
    return (b >> np.uint64(32)).astype(np.float64) * 2.0**-32, (b & np.uint64(0xFFFFFFFF)).astype(
        np.float64
    ) * 2.0**-32


def _box_muller(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normal draws from two independent uniforms."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)


def occurrence_rank(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """For each contact, how many earlier contacts (in input order) have the same src and dst.

    Ids must lie in ``[0, 2**31)`` (as :class:`DayContacts` checks), so ``(src, dst)`` packs into
    one int64 and a stable argsort keeps input order among equal pairs.
    """
    order = np.argsort((src << 31) | dst, kind="stable")
    s, d = src[order], dst[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (s[1:] != s[:-1]) | (d[1:] != d[:-1])
    group_start = np.maximum.accumulate(np.where(new, np.arange(order.size), 0))
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size) - group_start
    return rank


def _beacon_table(
    keyring: SimulatedKeyring, owner: np.ndarray, enin: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unique (owner, interval) beacons: (beacon index per row, rpis, owners, enins)."""
    key = (owner << 32) | enin
    # The packets of one scan are adjacent and almost always share their beacon: collapsing
    # runs first lets the sort see about one row per scan instead of one per packet.
    run_start = np.ones(key.size, dtype=bool)
    run_start[1:] = key[1:] != key[:-1]
    uniq, inverse = np.unique(key[run_start], return_inverse=True)
    beacon = inverse.astype(np.int64)[np.cumsum(run_start) - 1]
    b_owner = uniq >> 32
    b_enin = uniq & 0xFFFFFFFF
    return beacon, keyring.rpis(b_owner, b_enin), b_owner, b_enin


class Radio(abc.ABC):
    """Turns a day of contacts into sightings, in the format real scanners produce."""

    def __init__(self, keyring: SimulatedKeyring, config: ScoringConfig, epoch: int) -> None:
        if epoch < 0 or epoch % (gaen.EN_INTERVAL_SECONDS * gaen.TEK_ROLLING_PERIOD):
            raise RadioInputError(f"epoch must be a UTC midnight (multiple of 86400), got {epoch}")
        self.keyring = keyring
        self.config = config
        self.epoch = epoch

    def day_start(self, day: int) -> int:
        """Unix time of the start of simulated ``day``."""
        return self.epoch + day * DAY_SECONDS

    @abc.abstractmethod
    def transmit(self, contacts: DayContacts) -> RadioDay:
        """The sightings every observer records during the day."""


class IdealRadio(Radio):
    """A noise-free radio: contact (duration, distance) -> an exact, deterministic weight.

    A contact of weight ``w`` is placed at ``reference_distance_m`` (1 m, attenuation 41 dB, the
    closest bucket whose weight must be exactly 1.0) for ``w * reference_seconds``. It is
    emitted as ``floor(w)`` beacons credited ``reference_seconds`` each (weight exactly 1.0) plus
    one beacon for the fraction ``r = w - floor(w)``. Because ``s / R`` cannot hit every float
    ``r`` for a non-power-of-two ``R`` (about 10% miss by one ulp), the fraction's beacon is heard
    in two scans: ``s1`` with ``s1 / R <= r`` and a second scan crediting the exact remainder
    ``r - s1 / R`` (a power-of-two multiple of an ulp, so it round-trips). Scoring then sums to
    ``r`` exactly, and the beacons of one contact sum to ``w`` exactly.
    """

    def __init__(
        self,
        keyring: SimulatedKeyring,
        config: ScoringConfig = DEFAULT_CONFIG,
        epoch: int = DEFAULT_EPOCH,
        reference_distance_m: float = 1.0,
        tx_power_dbm: int = NOMINAL_TX_POWER_DBM,
    ) -> None:
        super().__init__(keyring, config, epoch)
        if config.reference_seconds > config.window_seconds:
            raise RadioInputError("IdealRadio needs reference_seconds <= window_seconds")
        self.reference_distance_m = reference_distance_m
        self.tx_power_dbm = tx_power_dbm
        att = self.attenuation_db(np.array([reference_distance_m]))
        if config.weight_of_bucket(config.bucket_of(att))[0] != 1.0:
            raise RadioInputError(
                f"IdealRadio: attenuation {att[0]:.1f} dB at {reference_distance_m} m must fall "
                "in a bucket of weight exactly 1.0"
            )

    @staticmethod
    def attenuation_db(distance_m: np.ndarray) -> np.ndarray:
        """Free-space-like attenuation (exponent 2, no losses): 41 dB + 20 log10(d / 1 m)."""
        return PATH_LOSS_1M_DB + 20.0 * np.log10(np.asarray(distance_m, dtype=np.float64))

    def weight(self, duration_s: np.ndarray, distance_m: np.ndarray) -> np.ndarray:
        """Exact weight of contacts of given durations and distances (one scan credit each)."""
        cfg = self.config
        bw = cfg.weight_of_bucket(cfg.bucket_of(self.attenuation_db(distance_m)))
        return (np.asarray(duration_s, dtype=np.float64) / cfg.reference_seconds) * bw

    def transmit(self, contacts: DayContacts) -> RadioDay:
        """Sightings that score to exactly the simulator's weights (see the class docstring)."""
        R = self.config.reference_seconds
        w = contacts.weight
        full = np.floor(w).astype(np.int64)
        frac = w - full  # exact: w and full share w's float grid
        s1 = frac * R
        for _ in range(3):  # step s1 down until s1 / R <= frac (at most a couple of ulps)
            s1 = np.where(s1 / R > frac, np.nextafter(s1, 0.0), s1)
        a1 = s1 / R
        rem = frac - a1  # exact (Sterbenz: a1 is within a few ulps below frac)
        s2 = rem * R
        if not np.array_equal(s2 / R, rem) or (a1 > frac).any():
            raise RadioInputError("IdealRadio: weight not representable as scan credits")
        has_frac = frac > 0
        pieces = full + has_frac
        # Pieces of one directed pair occupy consecutive intervals, after those of its earlier
        # contacts, so no two pieces share an RPI.
        order = np.lexsort(
            (occurrence_rank(contacts.src, contacts.dst), contacts.dst, contacts.src)
        )
        src_o, dst_o, pieces_o = contacts.src[order], contacts.dst[order], pieces[order]
        new = np.ones(order.size, dtype=bool)
        new[1:] = (src_o[1:] != src_o[:-1]) | (dst_o[1:] != dst_o[:-1])
        csum = np.cumsum(pieces_o) - pieces_o
        first_of_group = np.maximum.accumulate(np.where(new, csum, 0))
        offset = np.empty_like(pieces)
        offset[order] = csum - first_of_group
        if (offset + pieces).max(initial=0) > gaen.TEK_ROLLING_PERIOD:
            raise RadioInputError(
                "IdealRadio: the contacts of one directed pair need more than 144 intervals "
                "(total weight above 144 per pair and day)"
            )
        # One row per piece; a fractional piece gets a second scan when rem > 0.
        contact = np.repeat(np.arange(w.size), pieces)
        piece = np.arange(contact.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        is_frac = has_frac[contact] & (piece == pieces[contact] - 1)
        second = is_frac & (rem[contact] > 0)
        row = np.concatenate([np.arange(contact.size), np.flatnonzero(second)])
        sub = np.concatenate(
            [np.zeros(contact.size, np.int64), np.ones(int(second.sum()), np.int64)]
        )
        c = contact[row]
        interval_in_day = offset[c] + piece[row]
        seconds = np.where(is_frac[row], np.where(sub == 1, s2[c], s1[c]), R)
        day_enin0 = self.day_start(contacts.day) // gaen.EN_INTERVAL_SECONDS
        enin = day_enin0 + interval_in_day
        beacon, rpis, b_owner, b_enin = _beacon_table(self.keyring, contacts.dst[c], enin)
        rssi = np.full(
            row.size,
            self.tx_power_dbm
            - float(self.attenuation_db(np.array([self.reference_distance_m]))[0]),
        )
        sightings = Sightings(
            observer=contacts.src[c].copy(),
            beacon=beacon,
            rpis=rpis,
            rssi=rssi,
            tx_power=np.full(row.size, float(self.tx_power_dbm)),
            time=(enin * gaen.EN_INTERVAL_SECONDS + 1 + sub).astype(np.float64),
            scan=interval_in_day * 2 + sub,
            seconds=seconds,
        )
        return RadioDay(sightings, b_owner, b_enin)


@dataclass(frozen=True)
class RadioModel:
    """Parameters of :class:`SimulatedRadio` (defaults: a phone-to-phone link indoors)."""

    tx_power_dbm: int = NOMINAL_TX_POWER_DBM
    path_loss_1m_db: float = PATH_LOSS_1M_DB
    exponent_range: tuple[float, float] = (2.0, 4.0)
    distance_median_m: float = 1.5
    distance_sigma: float = 0.6
    distance_range_m: tuple[float, float] = (0.3, 20.0)
    duration_sigma: float = 0.5
    body_loss_max_db: float = 10.0
    shadowing_sigma_range_db: tuple[float, float] = (4.0, 8.0)
    packet_noise_db: float = 3.0
    packet_loss: float = 0.2
    sensitivity_dbm: float = -100.0
    scan_interval_s: float = 240.0
    scan_window_s: float = 4.0
    packets_per_scan: int = 3
    max_clock_skew_s: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.exponent_range
        if not 1.0 <= lo <= hi <= 6.0:
            raise RadioInputError(f"exponent_range must satisfy 1 <= lo <= hi <= 6, got {lo, hi}")
        if not 0 < self.distance_range_m[0] < self.distance_range_m[1]:
            raise RadioInputError(f"distance_range_m invalid: {self.distance_range_m}")
        if not 0 <= self.shadowing_sigma_range_db[0] <= self.shadowing_sigma_range_db[1]:
            raise RadioInputError(
                f"shadowing_sigma_range_db invalid: {self.shadowing_sigma_range_db}"
            )
        if not 0 <= self.packet_loss < 1:
            raise RadioInputError(f"packet_loss must be in [0, 1), got {self.packet_loss}")
        if not 0 < self.scan_window_s <= self.scan_interval_s:
            raise RadioInputError("need 0 < scan_window_s <= scan_interval_s")
        if self.packets_per_scan < 1:
            raise RadioInputError(f"packets_per_scan must be >= 1, got {self.packets_per_scan}")
        if not 0 <= self.max_clock_skew_s <= 6 * 3600:
            raise RadioInputError(
                f"max_clock_skew_s must be in [0, 6 h], got {self.max_clock_skew_s}"
            )
        for name in (
            "distance_median_m",
            "distance_sigma",
            "duration_sigma",
            "body_loss_max_db",
            "packet_noise_db",
        ):
            if not getattr(self, name) >= 0:
                raise RadioInputError(f"{name} must be >= 0")


@dataclass(frozen=True)
class ContactDraws:
    """The physical realization of each contact (one row per directed contact)."""

    start: np.ndarray
    duration: np.ndarray
    distance: np.ndarray
    exponent: np.ndarray
    shadowing_db: np.ndarray
    body_loss_db: np.ndarray
    mean_rssi_dbm: np.ndarray
    key: np.ndarray


class SimulatedRadio(Radio):
    """A noisy radio: log-distance path loss, shadowing, body loss, noise and duty-cycled scans.

    Per contact: duration ~ lognormal with mean ``w * reference_seconds``; start uniform in the
    day; distance ~ lognormal (median 1.5 m); path-loss exponent ~ U(2, 4); shadowing ~ N(0,
    sigma) with sigma ~ U(4, 8) dB, shared by both directions; body/pocket loss ~ U(0, 10) dB per
    direction. Each observer scans ``scan_window_s`` every ``scan_interval_s`` with its own phase;
    every scan falling inside the contact receives ``packets_per_scan`` adverts, each with
    N(0, 3 dB) noise, lost with probability ``packet_loss`` or below the sensitivity.
    """

    def __init__(
        self,
        keyring: SimulatedKeyring,
        seed: int,
        model: RadioModel | None = None,
        config: ScoringConfig = DEFAULT_CONFIG,
        epoch: int = DEFAULT_EPOCH,
    ) -> None:
        super().__init__(keyring, config, epoch)
        if seed < 0:
            raise RadioInputError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self.model = model or RadioModel()

    def contact_keys(self, contacts: DayContacts) -> np.ndarray:
        """Per-contact counters: hash of (unordered pair, occurrence), shared by both directions."""
        lo = np.minimum(contacts.src, contacts.dst)
        hi = np.maximum(contacts.src, contacts.dst)
        pair = counter_bits(
            self.seed, (lo << 31) | hi, contacts.day, int(RadioPurpose.CONTACT_KEY)
        ).view(np.int64)
        return pair ^ (occurrence_rank(contacts.src, contacts.dst) * _GOLDEN)

    def draw(self, contacts: DayContacts) -> ContactDraws:
        """Physical draws of every contact (deterministic in seed, day and contact identity)."""
        m, seed, day = self.model, self.seed, contacts.day
        key = self.contact_keys(contacts)
        direction = (contacts.src > contacts.dst).astype(np.int64)
        mean = contacts.weight * self.config.reference_seconds
        z = _box_muller(*_uniform_pair(seed, key, day, RadioPurpose.DURATION))
        duration = np.clip(
            mean * np.exp(m.duration_sigma * z - 0.5 * m.duration_sigma**2), 1.0, DAY_SECONDS - 1.0
        )
        u_start, u_exp = _uniform_pair(seed, key, day, RadioPurpose.START_EXPONENT)
        start = u_start * (DAY_SECONDS - duration)
        lo, hi = m.exponent_range
        exponent = lo + (hi - lo) * u_exp
        zd = _box_muller(*_uniform_pair(seed, key, day, RadioPurpose.DISTANCE))
        distance = np.clip(m.distance_median_m * np.exp(m.distance_sigma * zd), *m.distance_range_m)
        u_sigma, _ = _uniform_pair(seed, key, day, RadioPurpose.SHADOW_SIGMA_BODY)
        slo, shi = m.shadowing_sigma_range_db
        shadow = (slo + (shi - slo) * u_sigma) * _box_muller(
            *_uniform_pair(seed, key, day, RadioPurpose.SHADOWING)
        )
        # Body loss belongs to one direction (receiver's pocket, sender's body): keyed on both.
        _, u_body = _uniform_pair(seed, key ^ direction, day, RadioPurpose.SHADOW_SIGMA_BODY)
        body = m.body_loss_max_db * u_body
        path_loss = m.path_loss_1m_db + 10.0 * exponent * np.log10(distance)
        mean_rssi = m.tx_power_dbm - path_loss - shadow - body
        return ContactDraws(
            start, duration, distance, exponent, shadow, body, mean_rssi, key ^ direction
        )

    def transmit(self, contacts: DayContacts) -> RadioDay:
        """Duty-cycled scans during each contact -> per-packet sightings."""
        m, seed, day = self.model, self.seed, contacts.day
        d = self.draw(contacts)
        devices = np.union1d(contacts.src, contacts.dst)
        src_dev = np.searchsorted(devices, contacts.src)
        dst_dev = np.searchsorted(devices, contacts.dst)
        interval = m.scan_interval_s
        u_phase, _ = _uniform_pair(seed, devices, day, RadioPurpose.SCAN_PHASE_SKEW)
        _, u_skew = _uniform_pair(seed, devices, 0, RadioPurpose.SCAN_PHASE_SKEW)
        skew = (2.0 * u_skew - 1.0) * m.max_clock_skew_s  # a device's clock offset: fixed
        obs_phase = u_phase[src_dev] * interval
        # Scans k with start phase + k * interval in [start, start + duration).
        k_first = np.ceil((d.start - obs_phase) / interval).astype(np.int64)
        k_end = np.ceil((d.start + d.duration - obs_phase) / interval).astype(np.int64)
        n_scans = np.maximum(k_end - k_first, 0)
        c = np.repeat(np.arange(len(contacts)), n_scans)
        k = k_first[c] + np.arange(c.size) - np.repeat(np.cumsum(n_scans) - n_scans, n_scans)
        # Packets within each scan.
        P = m.packets_per_scan
        c = np.repeat(c, P)
        k = np.repeat(k, P)
        p = np.tile(np.arange(P), c.size // P)
        pkt_id = d.key[c] + (k * P + p + 1) * _GOLDEN
        u1, u2 = _uniform_pair(seed, pkt_id, day, RadioPurpose.PACKET)
        # One 64-bit draw per packet: noise from u1 and the top of u2, loss from u2's low bits.
        u2_hi = np.floor(u2 * 2.0**20) * 2.0**-20
        u2_lo = u2 * 2.0**20 - np.floor(u2 * 2.0**20)
        noise = m.packet_noise_db * _box_muller(u1, u2_hi)
        rssi = np.round(d.mean_rssi_dbm[c] + noise)  # scanners report integer dBm
        keep = (u2_lo >= m.packet_loss) & (rssi >= m.sensitivity_dbm)
        c, k, p, rssi = c[keep], k[keep], p[keep], rssi[keep]
        t_true = (
            self.day_start(day) + obs_phase[c] + k * interval + (p + 0.5) * (m.scan_window_s / P)
        )
        src, dst = contacts.src[c], contacts.dst[c]
        # Per-contact clock offsets first, then one gather per packet (no per-packet search).
        owner_clock = t_true + skew[dst_dev][c]
        observer_clock = t_true + skew[src_dev][c]
        enin = np.floor(owner_clock / gaen.EN_INTERVAL_SECONDS).astype(np.int64)
        beacon, rpis, b_owner, b_enin = _beacon_table(self.keyring, dst, enin)
        sightings = Sightings(
            observer=src,
            beacon=beacon,
            rpis=rpis,
            rssi=rssi,
            tx_power=np.full(rssi.size, float(m.tx_power_dbm)),
            time=observer_clock,
            # Scan ids are global per observer: day-major, increasing with time.
            scan=day * (math.ceil(DAY_SECONDS / interval) + 2) + k,
            seconds=np.full(rssi.size, float(interval)),
        )
        return RadioDay(sightings, b_owner, b_enin)
