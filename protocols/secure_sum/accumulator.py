"""Server-side accumulation of one server's shares for one (round, phase).

Both servers use the same class. Contributions arrive in *units*, each with a 16-byte key:

* mailbox/plaintext: one unit per participant post, key ``H(participant ‖ round ‖ phase)``; its
  rows are the post's items in order (``m × items_per_device`` of them for a participant hosting
  ``m`` devices, so units of one batch may differ in size), which travel together;
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
        sizes: npt.NDArray[np.int64],
    ) -> None:
        """Store whole units; unit ``i`` owns the next ``sizes[i]`` rows."""
        n_units, n = len(keys), len(slot_idx)
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
        self._rowunit[start : start + n] = np.repeat(np.arange(u0, u0 + n_units), sizes)
        self._keys[u0 : u0 + n_units] = keys
        self._ustart[u0 : u0 + n_units] = start + _starts(sizes)
        self._usize[u0 : u0 + n_units] = sizes
        # tolist() of a void array yields bytes objects without a Python-level loop
        self._index.update(zip(keys.tolist(), range(u0, u0 + n_units), strict=True))
        self._rows += n
        # only the slots the batch touches: a phone's post names 32 of a million slots
        np.add.at(self._counts, slot_idx, 1)

    def _stored_equal(
        self,
        units: npt.NDArray[np.int64],
        sizes: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.bool_]:
        """Per ``i``: is stored unit ``units[i]`` equal to the batch unit of ``sizes[i]`` rows
        starting at row ``starts[i]`` of ``slot_idx``/``shares``?"""
        return _segments_equal(
            (self._usize[units], self._ustart[units], self._slot, self._share),
            (sizes, starts, slot_idx, shares),
        )

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
        size = np.array([len(slot_idx)], dtype=np.int64)
        unit = self._index.get(key)
        if unit is not None:
            at = np.zeros(1, dtype=np.int64)
            if self._stored_equal(np.array([unit]), size, at, slot_idx, shares)[0]:
                return False
            raise ConflictingSubmission(
                "a submission with this (device, round, phase) key and different content was "
                "already accepted"
            )
        touched, added = np.unique(slot_idx, return_counts=True)
        over = self._counts[touched] + added > self._max
        if over.any():
            raise OverflowBoundError(
                f"slot #{int(touched[np.argmax(over)])} would exceed max_summands="
                f"{self.codec.max_summands} (its sum could wrap around 2^64)"
            )
        self._append(keys_from_bytes(key), slot_idx, shares, size)
        return True

    @property
    def _max(self) -> int:
        return self.codec.max_summands

    def submit_many(
        self,
        keys: bytes,
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
        sizes: npt.ArrayLike | None = None,
    ) -> BatchResult:
        """Add a relayed batch of units, vectorized; bad units are counted, not raised.

        ``keys`` is the concatenation of the units' 16-byte keys. Unit ``i`` owns the next
        ``sizes[i]`` rows (each at least 1); without ``sizes`` the rows split into equal units.
        A relayed batch must not be lost because one unit in it is bad, so per unit:

        * a key seen before (earlier batch or earlier in this batch) with identical content is a
          replay: ignored, counted in ``replayed``;
        * a key that appears with *different* contents (rows or row count) is refused everywhere
          it appears in this batch (``conflicting``) — keeping "the first" would let the two
          servers, which see different orders, keep different versions of one contribution;
        * units that would push a slot past ``max_summands`` are refused (``over_bound``) and the
          slot is marked overflowed: its sum is never released (:meth:`released_sums` raises).

        Raises:
            WrongLength: malformed keys, sizes or shapes (the whole batch is refused, state
                unchanged).
            PhaseClosed: the phase no longer accepts submissions.
        """
        self._check_rows(slot_idx, shares)
        k = keys_from_bytes(keys)
        n_units = len(k)
        if n_units == 0:
            if len(slot_idx):
                raise WrongLength(f"{len(slot_idx)} rows but no unit keys")
            return BatchResult(0, 0, 0, 0)
        if sizes is None:
            if len(slot_idx) % n_units:
                raise WrongLength(f"{len(slot_idx)} rows do not split into {n_units} equal units")
            size = np.full(n_units, len(slot_idx) // n_units, dtype=np.int64)
        else:
            size = np.asarray(sizes, dtype=np.int64)
            if size.shape != (n_units,) or (size < 1).any() or int(size.sum()) != len(slot_idx):
                raise WrongLength(
                    f"unit sizes must be {n_units} positive counts summing to the "
                    f"{len(slot_idx)} rows"
                )
        start = _starts(size)
        row_unit = np.repeat(np.arange(n_units), size)
        # duplicates inside the batch: compare every unit with the first of its key group
        uniq, first, inverse = np.unique(k, return_index=True, return_inverse=True)
        rep = first[inverse]
        same_as_first = np.ones(n_units, dtype=bool)
        dup = np.flatnonzero(rep != np.arange(n_units))  # units that are not their group's first
        if len(dup):
            batch = (slot_idx, shares)
            same_as_first[dup] = _segments_equal(
                (size[dup], start[dup], *batch), (size[rep[dup]], start[rep[dup]], *batch)
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
            f = first[g]
            differs[g] = ~self._stored_equal(stored[g], size[f], start[f], slot_idx, shares)
        group_conflict |= differs
        candidate = np.zeros(n_units, dtype=bool)  # new keys with one consistent content
        candidate[first[~seen & ~group_conflict]] = True
        # summand bound over everything this batch would add
        cand_rows = candidate[row_unit]
        add = np.bincount(slot_idx[cand_rows], minlength=self.n_slots)
        over_slot = (add > 0) & (self._counts + add > self._max)
        refused = (
            np.bincount(row_unit, weights=cand_rows & over_slot[slot_idx], minlength=n_units) > 0
        )
        self._overflowed |= over_slot
        accept = candidate & ~refused
        if accept.any():
            rows = accept[row_unit]  # batch order is kept
            self._append(k[accept], slot_idx[rows], shares[rows], size[accept])
        group_size = np.bincount(inverse, minlength=len(uniq))
        conflicting = int(group_size[group_conflict].sum())
        replayed = n_units - conflicting - int(candidate.sum())
        return BatchResult(int(accept.sum()), replayed, conflicting, int(refused.sum()))

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
        self._sums, self._surviving_counts = self._surviving_sums(common)
        self._surviving_digest = digest
        self.state = PhaseState.AGREED
        return digest

    def _surviving_sums(
        self, common: npt.NDArray[np.void]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Per-slot sums and counts of the units whose keys are in ``common``."""
        alive = np.isin(self._keys[: len(self._index)], common)[self._rowunit[: self._rows]]
        return group_sum(
            self._slot[: self._rows][alive], self._share[: self._rows][alive], self.n_slots
        )

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


def _starts(sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """First row of each unit of a batch whose units have ``sizes`` rows (exclusive cumsum)."""
    return np.cumsum(sizes) - sizes


_Segments = tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]
]


def _segments_equal(a: _Segments, b: _Segments) -> npt.NDArray[np.bool_]:
    """Pairwise equality of row segments, vectorized over the pairs.

    Each side is ``(sizes, starts, slot_idx, shares)``: pair ``i`` compares the ``sizes[i]``
    rows from ``starts[i]`` of one side with those of the other. Segments of different sizes
    are unequal; rows are gathered only for pairs of equal size.
    """
    size_a, start_a, slot_a, share_a = a
    size_b, start_b, slot_b, share_b = b
    same = size_a == size_b
    n_rows = np.where(same, size_a, 0)
    pair = np.repeat(np.arange(len(n_rows)), n_rows)
    offset = np.arange(int(n_rows.sum())) - np.repeat(_starts(n_rows), n_rows)
    ra, rb = start_a[pair] + offset, start_b[pair] + offset
    row_eq = (slot_a[ra] == slot_b[rb]) & (share_a[ra] == share_b[rb]).all(axis=1)
    return same & (np.bincount(pair, weights=~row_eq, minlength=len(n_rows)) == 0)


def _grow(a: npt.NDArray[T], cap: int, used: int) -> npt.NDArray[T]:
    """A copy of ``a`` with room for ``cap`` entries along axis 0 (the first ``used`` kept)."""
    out = np.zeros((cap, *a.shape[1:]), dtype=a.dtype)
    out[:used] = a[:used]
    return out


def group_sum(
    slot_idx: npt.NDArray[np.int64], rows: npt.NDArray[np.int64], n_slots: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Sum rows by slot (int64 wrap-around): ``(n_slots, dim)`` sums and per-slot counts."""
    # one unbuffered scatter-add per coordinate, no sort: a million items of a day take
    # milliseconds (a stable argsort of them took 0.17 s); int64 additions wrap modulo 2^64
    columns = np.zeros((rows.shape[1], n_slots), dtype=np.int64)
    for j in range(rows.shape[1]):
        np.add.at(columns[j], slot_idx, rows[:, j])
    return np.ascontiguousarray(columns.T), np.bincount(slot_idx, minlength=n_slots).astype(
        np.int64
    )


class DenseAccumulator(ShareAccumulator):
    """One server's shares of a dense-mode phase: every unit (a participant's post) is one share
    of *every* slot, in the slot table's order, kept as one ``(n_slots, dim)`` block.

    Nothing is stored per row or per slot index: a block is kept as it arrived, and the sums at
    agreement add the surviving blocks (a few dozen passes over ``n_slots × dim`` words). Per-slot
    counts are the number of surviving units: all of them cover every slot.
    """

    def __init__(self, n_slots: int, dim: int, codec: FixedPointCodec) -> None:
        super().__init__(n_slots, dim, codec)
        self._blocks: dict[bytes, npt.NDArray[np.int64]] = {}

    def _check_blocks(self, blocks: npt.NDArray[np.int64]) -> None:
        if blocks.shape[1:] != (self.n_slots, self.dim):
            raise WrongLength(
                f"dense blocks of shape {blocks.shape[1:]} do not cover the {self.n_slots} slots "
                f"× dim {self.dim}"
            )
        if self.state is not PhaseState.OPEN:
            raise PhaseClosed(f"phase is {self.state.value}; submissions are closed")

    def submit(
        self, key: bytes, slot_idx: npt.NDArray[np.int64], shares: npt.NDArray[np.int64]
    ) -> bool:
        """Refused: a dense phase takes whole blocks (:meth:`submit_block`)."""
        raise PhaseError("a dense phase takes whole blocks (submit_block), not slot rows")

    def submit_many(
        self,
        keys: bytes,
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
        sizes: npt.ArrayLike | None = None,
    ) -> BatchResult:
        """Refused: a dense phase takes whole blocks (:meth:`submit_blocks`)."""
        raise PhaseError("a dense phase takes whole blocks (submit_blocks), not slot rows")

    def submit_block(self, key: bytes, block: npt.NDArray[np.int64]) -> bool:
        """Add one unit's block; False for an identical replay.

        Raises:
            WrongLength: a block not of ``(n_slots, dim)``, or a malformed key.
            PhaseClosed: the phase no longer accepts submissions.
            ConflictingSubmission: the key was used with a different block.
            OverflowBoundError: one unit more would exceed ``max_summands`` per slot.
        """
        self._check_blocks(block[None])
        if len(key) != KEY_BYTES:
            raise WrongLength(f"unit key must be {KEY_BYTES} bytes, got {len(key)}")
        stored = self._blocks.get(key)
        if stored is not None:
            if np.array_equal(stored, block):
                return False
            raise ConflictingSubmission(
                "a submission with this (device, round, phase) key and different content was "
                "already accepted"
            )
        if len(self._blocks) + 1 > self._max:
            raise OverflowBoundError(
                f"one more post would exceed max_summands={self.codec.max_summands} per slot"
            )
        self._blocks[key] = block
        return True

    def submit_blocks(self, keys: bytes, blocks: npt.NDArray[np.int64]) -> BatchResult:
        """Add a relayed batch of blocks (``(units, n_slots, dim)``); bad units are counted,
        as in :meth:`ShareAccumulator.submit_many`: a key seen with two different blocks in the
        batch, or with a block other than the stored one, is refused everywhere it appears.

        The loop is over units (participants' posts), each a vectorized block comparison.
        """
        k = keys_from_bytes(keys)
        if len(k) != len(blocks):
            raise WrongLength(f"{len(k)} unit keys for {len(blocks)} blocks")
        if not len(k):
            return BatchResult(0, 0, 0, 0)
        self._check_blocks(blocks)
        first: dict[bytes, int] = {}
        conflict: set[bytes] = set()
        for i, key in enumerate(k.tolist()):
            j = first.setdefault(key, i)
            stored = self._blocks.get(key)
            other = blocks[j] if j != i else stored
            if other is not None and not np.array_equal(other, blocks[i]):
                conflict.add(key)
        accepted = replayed = conflicting = over = 0
        for i, key in enumerate(k.tolist()):
            if key in conflict:
                conflicting += 1
            elif first[key] != i or key in self._blocks:
                replayed += 1
            elif len(self._blocks) + 1 > self._max:
                over += 1
            else:
                self._blocks[key] = blocks[i]
                accepted += 1
        return BatchResult(accepted, replayed, conflicting, over)

    @property
    def unit_count(self) -> int:
        """Number of accepted units."""
        return len(self._blocks)

    def sorted_keys(self) -> npt.NDArray[np.void]:
        """This server's accepted unit keys, sorted (to send to the other server)."""
        if self.state is PhaseState.OPEN:
            raise PhaseError("close the phase before exchanging key sets")
        return np.sort(np.frombuffer(b"".join(self._blocks), dtype=KEY_DTYPE))

    def rows(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Every stored (slot index, share) row: each block covers every slot, in order."""
        blocks = list(self._blocks.values())
        slots = np.tile(np.arange(self.n_slots, dtype=np.int64), len(blocks))
        if not blocks:
            return slots, np.zeros((0, self.dim), dtype=np.int64)
        return slots, np.concatenate(blocks)

    def _surviving_sums(
        self, common: npt.NDArray[np.void]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The surviving blocks added up; every slot counts each surviving unit."""
        total = np.zeros((self.n_slots, self.dim), dtype=np.int64)
        for key in common.tolist():
            total += self._blocks[key]  # int64 additions wrap modulo 2^64: the ring's sum
        return total, np.full(self.n_slots, len(common), dtype=np.int64)
