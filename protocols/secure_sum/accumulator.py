"""Server-side accumulation of one server's shares for one (round, phase).

Both servers use the same class. Contributions arrive in *units*, each with a 16-byte key:

* mailbox/plaintext: one unit per device post, key ``H(device ‖ round ‖ phase)``; its rows are
  the post's items ``(device, round, phase, item)`` in order, which travel together;
* shuffled: one unit per item, key = the item's random contribution id (the servers never learn
  the device, so the id stands in for ``(device, round, phase, item)``).

A unit resubmitted with identical content is a replay (ignored, never double-counted); with
different content it is a :class:`ConflictingSubmission` (rejected, state unchanged). In a
relayed batch a key seen with two different contents is refused everywhere it appears.

Overflow bound: no slot ever holds more than ``codec.max_summands`` summands. A direct
submission past it raises :class:`OverflowBoundError` (state unchanged); in a relayed batch the
units past it are refused and the slot is marked overflowed, and its sum is withheld
(:meth:`ShareAccumulator.released_sums` raises) rather than released without them.

Lifecycle: ``OPEN`` (submissions) → ``CLOSED`` (key set frozen; digests exchanged) →
``AGREED`` (surviving set fixed; sums released). Slot sums are computed once, at agreement,
by one vectorized group-sum (stable sort + ``np.add.reduceat``, int64 wrap-around) over the
surviving rows. Nothing here loops in Python over units or rows.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .errors import (
    AgreementError,
    ConflictingSubmission,
    OverflowBoundError,
    PhaseClosed,
    PhaseError,
    PhaseNotReleased,
    WrongLength,
)
from .fixed_point import FixedPointCodec

KEY_BYTES = 16
KEY_DTYPE = np.dtype((np.void, KEY_BYTES))
T = TypeVar("T", bound=np.generic)


class PhaseState(enum.Enum):
    """Accumulator lifecycle."""

    OPEN = "open"
    CLOSED = "closed"
    AGREED = "agreed"


@dataclass(frozen=True)
class BatchResult:
    """Outcome of a relayed batch: counts of accepted, replayed and rejected units."""

    accepted: int
    replayed: int
    conflicting: int
    over_bound: int


def key_set_digest(sorted_keys: npt.NDArray[np.void]) -> bytes:
    """SHA-256 over a sorted key array, prefixed by its count."""
    h = hashlib.sha256(b"decentsim/keyset/v1" + len(sorted_keys).to_bytes(8, "big"))
    h.update(np.ascontiguousarray(sorted_keys).tobytes())
    return h.digest()


def keys_from_bytes(raw: bytes) -> npt.NDArray[np.void]:
    """A key array from concatenated 16-byte keys."""
    if len(raw) % KEY_BYTES:
        raise WrongLength(f"key list of {len(raw)} bytes is not a multiple of {KEY_BYTES}")
    return np.frombuffer(raw, dtype=KEY_DTYPE)


class ShareAccumulator:
    """One server's shares for one (round, phase), summed per slot after agreement."""

    def __init__(self, n_slots: int, dim: int, codec: FixedPointCodec) -> None:
        self.n_slots = n_slots
        self.dim = dim
        self.codec = codec
        self.state = PhaseState.OPEN
        self._index: dict[bytes, int] = {}  # unit key -> unit number (insertion order)
        self._keys = np.zeros(0, dtype=KEY_DTYPE)  # unit keys, by unit number
        self._ustart = np.zeros(0, dtype=np.int64)  # first row of each unit
        self._usize = np.zeros(0, dtype=np.int64)  # rows of each unit
        self._slot = np.zeros(0, dtype=np.int64)
        self._share = np.zeros((0, dim), dtype=np.int64)
        self._rowunit = np.zeros(0, dtype=np.int64)  # unit number of every row
        self._rows = 0
        self._counts = np.zeros(n_slots, dtype=np.int64)
        self._overflowed = np.zeros(n_slots, dtype=bool)
        self._sums: npt.NDArray[np.int64] | None = None
        self._surviving_counts: npt.NDArray[np.int64] | None = None
        self._surviving_digest: bytes | None = None

    # -- submission -------------------------------------------------------------------------
    def _check_rows(self, slot_idx: npt.NDArray[np.int64], shares: npt.NDArray[np.int64]) -> None:
        if shares.ndim != 2 or shares.shape[1] != self.dim or shares.shape[0] != len(slot_idx):
            raise WrongLength(
                f"shares of shape {shares.shape} do not match {len(slot_idx)} items × dim "
                f"{self.dim}"
            )
        if len(slot_idx) and (int(slot_idx.min()) < 0 or int(slot_idx.max()) >= self.n_slots):
            raise WrongLength(f"slot index outside 0..{self.n_slots - 1}")
        if self.state is not PhaseState.OPEN:
            raise PhaseClosed(f"phase is {self.state.value}; submissions are closed")

    def _append(
        self,
        keys: npt.NDArray[np.void],
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
    ) -> None:
        """Store whole units of equal size (``len(slot_idx) // len(keys)`` rows each)."""
        n_units, n = len(keys), len(slot_idx)
        size = n // max(n_units, 1)
        u0, start = len(self._index), self._rows
        if start + n > len(self._slot):
            # amortized doubling: appending a batch copies only the batch
            cap = max(2 * len(self._slot), start + n, 1024)
            self._slot = _grow(self._slot, cap, start)
            self._share = _grow(self._share, cap, start)
            self._rowunit = _grow(self._rowunit, cap, start)
        if u0 + n_units > len(self._keys):
            cap = max(2 * len(self._keys), u0 + n_units, 256)
            self._keys = _grow(self._keys, cap, u0)
            self._ustart = _grow(self._ustart, cap, u0)
            self._usize = _grow(self._usize, cap, u0)
        self._slot[start : start + n] = slot_idx
        self._share[start : start + n] = shares
        self._rowunit[start : start + n] = np.repeat(np.arange(u0, u0 + n_units), size)
        self._keys[u0 : u0 + n_units] = keys
        self._ustart[u0 : u0 + n_units] = start + size * np.arange(n_units)
        self._usize[u0 : u0 + n_units] = size
        # tolist() of a void array yields bytes objects without a Python-level loop
        self._index.update(zip(keys.tolist(), range(u0, u0 + n_units), strict=True))
        self._rows += n
        self._counts += np.bincount(slot_idx, minlength=self.n_slots)

    def _stored_equal(
        self,
        units: npt.NDArray[np.int64],
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.bool_]:
        """Per unit: is the stored content of ``units[i]`` equal to batch unit ``i``?

        ``slot_idx`` is ``(len(units), size)`` and ``shares`` ``(len(units), size, dim)``.
        """
        size = slot_idx.shape[1]
        same = self._usize[units] == size
        rows = self._ustart[units][:, None] + np.arange(size)
        rows = np.where(same[:, None], rows, 0)  # a unit of another size never compares equal
        same &= (self._slot[rows] == slot_idx).all(axis=1)
        same &= (self._share[rows] == shares).all(axis=(1, 2))
        return same

    def submit(
        self, key: bytes, slot_idx: npt.NDArray[np.int64], shares: npt.NDArray[np.int64]
    ) -> bool:
        """Add one unit (its rows together). Returns False for an identical replay.

        Every refusal leaves the accumulator unchanged.

        Raises:
            WrongLength: shapes do not match the phase's dim, or a malformed key.
            PhaseClosed: the phase no longer accepts submissions.
            ConflictingSubmission: the key was used with different content.
            OverflowBoundError: a slot would exceed the codec's ``max_summands``.
        """
        self._check_rows(slot_idx, shares)
        if len(key) != KEY_BYTES:
            raise WrongLength(f"unit key must be {KEY_BYTES} bytes, got {len(key)}")
        unit = self._index.get(key)
        if unit is not None:
            if self._stored_equal(np.array([unit]), slot_idx[None], shares[None])[0]:
                return False
            raise ConflictingSubmission(
                "a submission with this (device, round, phase) key and different content was "
                "already accepted"
            )
        over = self._counts + np.bincount(slot_idx, minlength=self.n_slots) > self._max
        if over.any():
            raise OverflowBoundError(
                f"slot #{int(np.argmax(over))} would exceed max_summands="
                f"{self.codec.max_summands} (its sum could wrap around 2^64)"
            )
        self._append(keys_from_bytes(key), slot_idx, shares)
        return True

    @property
    def _max(self) -> int:
        return self.codec.max_summands

    def submit_many(
        self,
        keys: bytes,
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
    ) -> BatchResult:
        """Add a relayed batch of equal-sized units, vectorized; bad units are counted, not raised.

        ``keys`` is the concatenation of the units' 16-byte keys; unit ``i`` owns rows
        ``i·size … (i+1)·size − 1``. A relayed batch must not be lost because one unit in it is
        bad, so per unit:

        * a key seen before (earlier batch or earlier in this batch) with identical content is a
          replay: ignored, counted in ``replayed``;
        * a key that appears with *different* contents is refused everywhere it appears in this
          batch (``conflicting``) — keeping "the first" would let the two servers, which see
          different orders, keep different versions of one contribution;
        * units that would push a slot past ``max_summands`` are refused (``over_bound``) and the
          slot is marked overflowed: its sum is never released (:meth:`released_sums` raises).

        Raises:
            WrongLength: malformed keys or shapes (the whole batch is refused, state unchanged).
            PhaseClosed: the phase no longer accepts submissions.
        """
        self._check_rows(slot_idx, shares)
        k = keys_from_bytes(keys)
        n_units = len(k)
        if n_units == 0:
            if len(slot_idx):
                raise WrongLength(f"{len(slot_idx)} rows but no unit keys")
            return BatchResult(0, 0, 0, 0)
        if len(slot_idx) % n_units:
            raise WrongLength(f"{len(slot_idx)} rows do not split into {n_units} equal units")
        size = len(slot_idx) // n_units
        u_slot = slot_idx.reshape(n_units, size)
        u_share = shares.reshape(n_units, size, self.dim)
        # duplicates inside the batch: compare every unit with the first of its key group
        uniq, first, inverse = np.unique(k, return_index=True, return_inverse=True)
        rep = first[inverse]
        same_as_first = (u_slot == u_slot[rep]).all(axis=1) & (u_share == u_share[rep]).all(
            axis=(1, 2)
        )
        group_conflict = np.bincount(inverse, weights=~same_as_first, minlength=len(uniq)) > 0
        # keys accepted before: compare with the stored content
        stored = np.fromiter(
            map(self._index.get, uniq.tolist(), itertools.repeat(-1)), np.int64, len(uniq)
        )
        seen = stored >= 0
        differs = np.zeros(len(uniq), dtype=bool)
        if seen.any():
            g = np.flatnonzero(seen)
            differs[g] = ~self._stored_equal(stored[g], u_slot[first[g]], u_share[first[g]])
        group_conflict |= differs
        candidate = ~seen & ~group_conflict  # new keys with one consistent content
        # summand bound over everything this batch would add
        cand_units = np.sort(first[candidate])  # keep batch order
        add = np.bincount(u_slot[cand_units].ravel(), minlength=self.n_slots)
        over_slot = (add > 0) & (self._counts + add > self._max)
        refused = over_slot[u_slot[cand_units]].any(axis=1)
        self._overflowed |= over_slot
        accept = cand_units[~refused]
        if len(accept):
            self._append(k[accept], u_slot[accept].ravel(), u_share[accept].reshape(-1, self.dim))
        group_size = np.bincount(inverse, minlength=len(uniq))
        conflicting = int(group_size[group_conflict].sum())
        replayed = n_units - conflicting - len(cand_units)
        return BatchResult(len(accept), replayed, conflicting, int(refused.sum()))

    def rows(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Copies of every stored (slot index, share) row: this server's whole view of shares."""
        return self._slot[: self._rows].copy(), self._share[: self._rows].copy()

    @property
    def overflowed(self) -> npt.NDArray[np.bool_]:
        """Slots that were offered more than ``max_summands`` summands (never released)."""
        return self._overflowed.copy()

    # -- agreement --------------------------------------------------------------------------
    @property
    def unit_count(self) -> int:
        """Number of accepted units."""
        return len(self._index)

    def close(self) -> None:
        """Stop accepting submissions (idempotent)."""
        if self.state is PhaseState.OPEN:
            self.state = PhaseState.CLOSED

    def sorted_keys(self) -> npt.NDArray[np.void]:
        """This server's accepted unit keys, sorted (to send to the other server)."""
        if self.state is PhaseState.OPEN:
            raise PhaseError("close the phase before exchanging key sets")
        return np.sort(self._keys[: len(self._index)])

    def key_digest(self) -> bytes:
        """Digest of this server's accepted key set."""
        return key_set_digest(self.sorted_keys())

    def agree(self, surviving: npt.NDArray[np.void], expected: bytes | None = None) -> bytes:
        """Fix the surviving set to ``own keys ∩ surviving``; compute sums; return its digest.

        With ``expected``, the digest must match it first (else :class:`AgreementError`, state
        unchanged). Idempotent for the same set; a different set after agreement is refused.
        """
        own = self.sorted_keys()
        common = np.intersect1d(own, surviving)
        digest = key_set_digest(common)
        if expected is not None and digest != expected:
            raise AgreementError(
                "surviving-set digests differ: the servers hold different contributions"
            )
        if self.state is PhaseState.AGREED:
            if digest != self._surviving_digest:
                raise PhaseError("surviving set already agreed; a different set is refused")
            return digest
        alive = np.isin(self._keys[: len(self._index)], common)[self._rowunit[: self._rows]]
        self._sums, self._surviving_counts = group_sum(
            self._slot[: self._rows][alive], self._share[: self._rows][alive], self.n_slots
        )
        self._surviving_digest = digest
        self.state = PhaseState.AGREED
        return digest

    @property
    def surviving_digest(self) -> bytes | None:
        """Digest of the agreed surviving set (None before agreement)."""
        return self._surviving_digest

    def sums(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per-slot share sums ``(n_slots, dim)`` and summand counts, after agreement."""
        if self._sums is None or self._surviving_counts is None:
            raise PhaseNotReleased("sums are released only after the surviving set is agreed")
        return self._sums, self._surviving_counts

    def released_sums(
        self, slots: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Share sums and counts of ``slots`` for release, refusing overflowed slots.

        Raises:
            PhaseNotReleased: before agreement.
            OverflowBoundError: a slot was offered more than ``max_summands`` summands; its
                sum is withheld rather than released incomplete.
        """
        sums, counts = self.sums()
        bad = self._overflowed[slots]
        if bad.any():
            raise OverflowBoundError(
                f"{int(bad.sum())} slot(s) were offered more than max_summands="
                f"{self.codec.max_summands} summands; their sums are withheld"
            )
        return sums[slots], counts[slots]


def _grow(a: npt.NDArray[T], cap: int, used: int) -> npt.NDArray[T]:
    """A copy of ``a`` with room for ``cap`` entries along axis 0 (the first ``used`` kept)."""
    out = np.zeros((cap, *a.shape[1:]), dtype=a.dtype)
    out[:used] = a[:used]
    return out


def group_sum(
    slot_idx: npt.NDArray[np.int64], rows: npt.NDArray[np.int64], n_slots: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sum rows by slot (int64 wrap-around): ``(n_slots, dim)`` sums and per-slot counts."""
    sums = np.zeros((n_slots, rows.shape[1]), dtype=np.int64)
    counts = np.zeros(n_slots, dtype=np.int64)
    if len(slot_idx) == 0:
        return sums, counts
    order = np.argsort(slot_idx, kind="stable")
    s = slot_idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]
    sums[s[starts]] = np.add.reduceat(rows[order], starts, axis=0)
    counts[s[starts]] = np.diff(np.r_[starts, len(s)])
    return sums, counts
