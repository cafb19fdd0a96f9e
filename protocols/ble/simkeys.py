"""Deterministic TEKs for *simulated* devices, and RPIs for many (device, interval) pairs.

A real device draws its TEKs with :func:`protocols.ble.gaen.new_tek` (``os.urandom``). A simulated
population instead derives them from one 16-byte run secret so runs are reproducible and a
device pool can recompute the same identifiers the simulated radio broadcast::

    TEK(device, rolling_start) = AES-128(run_secret, device (uint64 BE) || rolling_start (uint32 BE)
                                         || "TEK" || 0x00)

AES is a pseudorandom permutation, so distinct (device, day) blocks give independent-looking
TEKs to anyone without the run secret; all TEKs of a batch come from one AES-ECB call. Everything
downstream (RPIK, AEMK, RPI, AEM) is the unmodified v1.2 schedule of :mod:`protocols.ble.gaen`.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from protocols.ble import gaen
from protocols.ble.errors import CryptoInputError

_TAG = b"TEK\x00"


class SimulatedKeyring:
    """TEKs and RPIs of a simulated population, derived from a per-run secret."""

    #: most RPIs remembered (16 bytes each): a day of 37,518 devices × 144 intervals fits
    CACHE_ROWS = 8_000_000

    def __init__(self, run_secret: bytes) -> None:
        if not isinstance(run_secret, bytes) or len(run_secret) != 16:
            raise CryptoInputError("run_secret must be 16 bytes")
        self._secret = run_secret
        # the latest day's RPIs by (device × 144 + interval of the day), sorted: a pool asks
        # for its own devices' beacons to register them, then its radio for every beacon
        # heard, and each key schedule costs microseconds per device
        self._day: int | None = None
        self._codes = np.zeros(0, np.int64)
        self._rows = np.zeros((0, gaen.RPI_LEN), np.uint8)
        # a day's RPIs being derived ahead (prefetch): (day, their codes, the rows to come)
        self._pending: tuple[int, np.ndarray, Future[np.ndarray]] | None = None
        self._worker: ThreadPoolExecutor | None = None

    def teks(self, devices: np.ndarray, rolling_starts: np.ndarray) -> np.ndarray:
        """TEKs (shape ``(n, 16)``) of ``devices`` for the days starting at ``rolling_starts``."""
        dev = np.asarray(devices, dtype=np.int64)
        start = np.broadcast_to(np.asarray(rolling_starts, dtype=np.int64), dev.shape)
        if dev.ndim != 1:
            raise CryptoInputError(f"devices must be 1-D, got shape {dev.shape}")
        if dev.size and (dev.min() < 0 or start.min() < 0 or start.max() >= 2**32):
            raise CryptoInputError("devices must be >= 0 and rolling starts in [0, 2**32)")
        if dev.size and (start % gaen.TEK_ROLLING_PERIOD != 0).any():
            raise CryptoInputError("rolling starts must be multiples of 144")
        blocks = np.empty((dev.size, 16), dtype=np.uint8)
        blocks[:, :8] = dev.astype(">u8").view(np.uint8).reshape(-1, 8)
        blocks[:, 8:12] = start.astype(">u4").view(np.uint8).reshape(-1, 4)
        blocks[:, 12:] = np.frombuffer(_TAG, dtype=np.uint8)
        out = gaen.aes_ecb(self._secret, blocks.tobytes())
        return np.frombuffer(out, dtype=np.uint8).reshape(-1, 16).copy()

    def key(self, device: int, enin: int) -> gaen.TemporaryExposureKey:
        """The :class:`~protocols.ble.gaen.TemporaryExposureKey` of ``device`` covering ``enin``."""
        start = (enin // gaen.TEK_ROLLING_PERIOD) * gaen.TEK_ROLLING_PERIOD
        tek = bytes(self.teks(np.array([device]), np.array([start]))[0])
        return gaen.TemporaryExposureKey(tek, start)

    def rpis(self, devices: np.ndarray, enins: np.ndarray) -> np.ndarray:
        """RPIs broadcast by ``devices[i]`` during ``enins[i]``, shape ``(n, 16)``.

        The TEKs come from one AES call; then each distinct (device, day) key needs its own
        HKDF and AES key schedule, because ``cryptography`` has no multi-key batch API. That is
        the one loop here: one iteration per distinct key (not per pair), a few microseconds each.
        RPIs of the latest day asked are remembered (up to :attr:`CACHE_ROWS`), so asking
        again for the same beacons costs a lookup.
        """
        dev = np.asarray(devices, dtype=np.int64)
        enin = np.asarray(enins, dtype=np.int64)
        if dev.shape != enin.shape or dev.ndim != 1:
            raise CryptoInputError("devices and enins must be 1-D arrays of equal length")
        if dev.size and (enin.min() < 0 or enin.max() >= 2**32):
            raise CryptoInputError("enins must lie in [0, 2**32)")
        if dev.size and dev.min() >= 0:
            day = enin // gaen.TEK_ROLLING_PERIOD
            if (day == day[0]).all():
                return self._cached(dev, enin, int(day[0]))
        return self._compute(dev, enin)

    def prefetch(self, devices: np.ndarray, enins: np.ndarray) -> None:
        """Start deriving these RPIs (all of one day) on a worker thread; the first :meth:`rpis`
        call for that day starts from them (waiting if they are not done). A pool asks for
        tomorrow's own beacons while it waits for the servers, so that registering them does
        not wait for their key schedules. Anything else is ignored: it only saves time."""
        dev = np.asarray(devices, dtype=np.int64)
        enin = np.asarray(enins, dtype=np.int64)
        if dev.shape != enin.shape or dev.ndim != 1 or not dev.size or dev.min() < 0:
            return
        day = enin // gaen.TEK_ROLLING_PERIOD
        if enin.min() < 0 or enin.max() >= 2**32 or not (day == day[0]).all():
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keyring")
        codes = dev * gaen.TEK_ROLLING_PERIOD + enin % gaen.TEK_ROLLING_PERIOD
        self._pending = (int(day[0]), codes, self._worker.submit(self._compute, dev, enin))

    def _cached(self, dev: np.ndarray, enin: np.ndarray, day: int) -> np.ndarray:
        if day != self._day:
            self._day, self._codes = day, np.zeros(0, np.int64)
            self._rows = np.zeros((0, gaen.RPI_LEN), np.uint8)
            pending, self._pending = self._pending, None
            if pending is not None and pending[0] == day:
                known, first = np.unique(pending[1], return_index=True)
                self._codes, self._rows = known, pending[2].result()[first]
        codes = dev * gaen.TEK_ROLLING_PERIOD + enin % gaen.TEK_ROLLING_PERIOD
        out = np.empty((dev.size, gaen.RPI_LEN), dtype=np.uint8)
        pos = np.minimum(np.searchsorted(self._codes, codes), max(self._codes.size - 1, 0))
        hit = (self._codes[pos] == codes) if self._codes.size else np.zeros(dev.size, bool)
        out[hit] = self._rows[pos[hit]]
        miss = np.flatnonzero(~hit)
        if miss.size:
            out[miss] = self._compute(dev[miss], enin[miss])
            if self._codes.size + miss.size <= self.CACHE_ROWS:
                new, first = np.unique(codes[miss], return_index=True)
                codes_all = np.concatenate([self._codes, new])
                order = np.argsort(codes_all, kind="stable")
                self._codes = codes_all[order]
                self._rows = np.concatenate([self._rows, out[miss[first]]])[order]
        return out

    def _compute(self, dev: np.ndarray, enin: np.ndarray) -> np.ndarray:
        out = np.empty((dev.size, gaen.RPI_LEN), dtype=np.uint8)
        if dev.size == 0:
            return out
        start = (enin // gaen.TEK_ROLLING_PERIOD) * gaen.TEK_ROLLING_PERIOD
        order = np.lexsort((enin, dev))  # by device, then interval: each key's rows contiguous
        d_sorted, s_sorted = dev[order], start[order]
        change = np.ones(order.size, dtype=bool)
        change[1:] = (d_sorted[1:] != d_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
        key_starts = np.flatnonzero(change)
        tek_buf = self.teks(d_sorted[key_starts], s_sorted[key_starts]).tobytes()
        bounds = (np.append(key_starts, order.size) * 16).tolist()
        blocks = gaen.padded_blocks(enin[order])
        chunks = [
            gaen.aes_ecb(gaen.rpik(tek_buf[16 * k : 16 * k + 16]), blocks[lo:hi])
            for k, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ]
        rows = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(-1, gaen.RPI_LEN)
        out[order] = rows
        return out
