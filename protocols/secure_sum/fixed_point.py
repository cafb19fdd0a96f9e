"""Fixed-point codec over the ring Z_2^64 (numpy int64 with wrap-around).

A real value ``v`` is encoded as ``round(v · 2^f)`` and held as a signed int64, i.e. the
ring element's representative in ``[-2^63, 2^63)``. Shares and sums wrap modulo 2^64, which is
exactly ring arithmetic; numpy int64 array arithmetic wraps silently, so no big-int code runs.

Overflow bound (enforced, never a silent wrap)::

    ceil(max_abs · 2^f) · max_summands  ≤  2^63 − 1

where ``max_abs`` bounds every coordinate of one contribution and ``max_summands`` bounds how
many contributions one slot may receive. Then every true slot sum lies in the representable
signed range, so decoding the ring element gives the exact fixed-point sum. It is enforced at
three points: ``encode`` rejects values above ``max_abs`` (and the constructor rejects a codec
that breaks the inequality); the accumulator never lets a slot take more than ``max_summands``
summands; and ``check_sum``/``decode_sum`` refuse a released sum outside
``±count · ceil(max_abs · 2^f)`` — the servers only see uniform shares and cannot range-check a
contribution, so a device that skipped ``encode``'s check is caught there (as long as its
value pushes the sum past the bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import EncodingError, OverflowBoundError

_INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class FixedPointCodec:
    """Encodes floats as int64 ring elements with scale ``2^frac_bits``.

    Args:
        frac_bits: fractional bits ``f``; the resolution is ``2^-f``.
        max_abs: largest absolute value of one coordinate of one contribution.
        max_summands: largest number of contributions one slot may sum.

    Raises:
        OverflowBoundError: if ``ceil(max_abs · 2^f) · max_summands`` exceeds ``2^63 − 1``.
    """

    frac_bits: int = 24
    max_abs: float = float(2**20)
    max_summands: int = 2**16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 62:
            raise EncodingError(f"frac_bits must be in [0, 62], got {self.frac_bits}")
        if not (math.isfinite(self.max_abs) and self.max_abs > 0):
            raise EncodingError(f"max_abs must be finite and > 0, got {self.max_abs}")
        if self.max_summands < 1:
            raise EncodingError(f"max_summands must be >= 1, got {self.max_summands}")
        bound = self.max_encoded * self.max_summands
        if bound > _INT64_MAX:
            raise OverflowBoundError(
                f"overflow bound violated: ceil(max_abs·2^f)·max_summands = "
                f"{self.max_encoded}·{self.max_summands} = {bound} > 2^63-1; lower frac_bits "
                f"({self.frac_bits}), max_abs ({self.max_abs}) or max_summands "
                f"({self.max_summands})"
            )

    @property
    def scale(self) -> float:
        """The scale ``2^frac_bits`` (a power of two, so scaling is exact in float64)."""
        return float(1 << self.frac_bits)

    @property
    def max_encoded(self) -> int:
        """Largest absolute encoded value of one coordinate, ``ceil(max_abs · 2^f)``."""
        return math.ceil(self.max_abs * (1 << self.frac_bits))

    def encode(self, values: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """Encode an array of reals; rounds half to even.

        Raises:
            EncodingError: a value is NaN/inf or its magnitude exceeds ``max_abs``.
        """
        x = np.asarray(values, dtype=np.float64)
        if not np.isfinite(x).all():
            raise EncodingError("cannot encode a non-finite value (NaN or inf)")
        if x.size and float(np.abs(x).max()) > self.max_abs:
            raise EncodingError(
                f"value magnitude {float(np.abs(x).max())!r} exceeds max_abs={self.max_abs}; "
                "a larger max_abs needs a smaller frac_bits or max_summands"
            )
        return np.rint(x * self.scale).astype(np.int64)

    def decode(self, ring: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Decode ring elements (int64, signed representative) to floats.

        The result is exact when ``|ring| < 2^53``; beyond that float64 rounds.
        """
        r = np.asarray(ring)
        if r.dtype != np.int64:
            raise EncodingError(f"ring elements must be int64, got dtype {r.dtype}")
        return r.astype(np.float64) / self.scale

    def check_sum(
        self, ring: npt.ArrayLike, counts: npt.ArrayLike | None = None
    ) -> npt.NDArray[np.int64]:
        """Return ``ring`` (int64 slot sums) after checking it against the overflow bound.

        An honest sum of ``c`` contributions satisfies ``|sum| ≤ c · max_encoded``; with no
        ``counts`` (a device is not told them), ``c = max_summands``. A sum outside that range
        can only come from a contribution that skipped :meth:`encode`'s range check, or from a
        wrap-around — it is refused instead of decoded to a wrong number.

        Raises:
            EncodingError: ``ring`` is not int64.
            OverflowBoundError: some entry is outside the bound.
        """
        r = np.asarray(ring)
        if r.dtype != np.int64:
            raise EncodingError(f"ring elements must be int64, got dtype {r.dtype}")
        c = np.full(r.shape[:1], self.max_summands) if counts is None else np.asarray(counts)
        # ≤ max_summands · max_encoded ≤ 2^63 − 1, so the bound itself cannot overflow int64
        bound = np.minimum(c, self.max_summands).astype(np.int64) * np.int64(self.max_encoded)
        bound = bound.reshape(bound.shape + (1,) * (r.ndim - bound.ndim))
        bad = (r > bound) | (r < -bound)
        if bad.any():
            raise OverflowBoundError(
                f"{int(bad.sum())} sum entr(y/ies) outside ±count·max_encoded: a contribution "
                "exceeded max_abs or the sum wrapped around 2^64; refusing to decode it"
            )
        return r

    def decode_sum(
        self, ring: npt.ArrayLike, counts: npt.ArrayLike | None = None
    ) -> npt.NDArray[np.float64]:
        """:meth:`check_sum`, then :meth:`decode`."""
        return self.decode(self.check_sum(ring, counts))

    def check_summands(self, count: int) -> None:
        """Raise :class:`OverflowBoundError` if ``count`` summands could overflow a slot."""
        if count > self.max_summands:
            raise OverflowBoundError(
                f"{count} summands exceed max_summands={self.max_summands} "
                "(the slot sum could wrap around 2^64)"
            )
