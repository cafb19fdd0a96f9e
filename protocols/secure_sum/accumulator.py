"""Server-side accumulation of one server's shares for one (round, phase).

Both servers use the same class. Contributions arrive in *units*, each with a 16-byte key:

* mailbox/plaintext: one unit per device post, key ``H(device ‖ round ‖ phase)``; its rows are
  the post's items ``(device, round, phase, item)``, which travel together;
* shuffled: one unit per item, key = the item's random contribution id.

A unit resubmitted with identical content is a replay (ignored, never double-counted); with
different content it is a :class:`ConflictingSubmission` (rejected, state unchanged).

Lifecycle: ``OPEN`` (submissions) → ``CLOSED`` (key set frozen; digests exchanged) →
``AGREED`` (surviving set fixed; sums released). Slot sums are computed once, at agreement,
by one vectorized group-sum (stable sort + ``np.add.reduceat``, int64 wrap-around) over the
surviving rows.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

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
        self._units: dict[bytes, tuple[int, int]] = {}  # key -> (row start, row count)
        self._slot = np.zeros(0, dtype=np.int64)
        self._share = np.zeros((0, dim), dtype=np.int64)
        self._rowunit = np.zeros(0, dtype=np.int64)  # unit number (insertion order) of every row
        self._rows = 0
        self._counts = np.zeros(n_slots, dtype=np.int64)
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
        if self.state is not PhaseState.OPEN:
            raise PhaseClosed(f"phase is {self.state.value}; submissions are closed")

    def _append(
        self,
        row_units: npt.NDArray[np.int64] | int,
        slot_idx: npt.NDArray[np.int64],
        shares: npt.NDArray[np.int64],
    ) -> int:
        n = len(slot_idx)
        start = self._rows
        if start + n > len(self._slot):
            # amortized doubling: appending a batch copies only the batch
            cap = max(2 * len(self._slot), start + n, 1024)
            slot = np.zeros(cap, dtype=np.int64)
            share = np.zeros((cap, self.dim), dtype=np.int64)
            rowunit = np.zeros(cap, dtype=np.int64)
            slot[:start] = self._slot[:start]
            share[:start] = self._share[:start]
            rowunit[:start] = self._rowunit[:start]
            self._slot, self._share, self._rowunit = slot, share, rowunit
        self._slot[start : start + n] = slot_idx
        self._share[start : start + n] = shares
        self._rowunit[start : start + n] = row_units
        self._rows += n
        return start

    def _same(
        self, key: bytes, slot_idx: npt.NDArray[np.int64], shares: npt.NDArray[np.int64]
    ) -> bool:
        start, n = self._units[key]
        return (
            n == len(slot_idx)
            and bool(np.array_equal(self._slot[start : start + n], slot_idx))
            and bool(np.array_equal(self._share[start : start + n], shares))
        )

    def submit(
        self, key: bytes, slot_idx: npt.NDArray[np.int64], shares: npt.NDArray[np.int64]
    ) -> bool:
        """Add one unit (its rows together). Returns False for an identical replay.

        Raises:
            WrongLength: shapes do not match the phase's dim.
            PhaseClosed: the phase no longer accepts submissions.
            ConflictingSubmission: the key was used with different content.
            OverflowBoundError: a slot would exceed the codec's ``max_summands``.
        """
        self._check_rows(slot_idx, shares)
        if key in self._units:
            if self._same(key, slot_idx, shares):
                return False
            raise ConflictingSubmission(
                "a submission with this (device, round, phase) key and different content was "
                "already accepted"
            )
        u, c = _counts(slot_idx)
        over = self._counts[u] + c > self.codec.max_summands
        if over.any():
            raise OverflowBoundError(
                f"slot #{int(u[np.argmax(over)])} would exceed max_summands="
                f"{self.codec.max_summands} (its sum could wrap around 2^64)"
            )
        if len(key) != KEY_BYTES:
            raise WrongLength(f"unit key must be {KEY_BYTES} bytes, got {len(key)}")
        self._counts[u] += c
        self._units[key] = (self._append(len(self._units), slot_idx, shares), len(slot_idx))
        return True

    def submit_many(
        self, keys: list[bytes], slot_idx: npt.NDArray[np.int64], shares: npt.NDArray[np.int64]
    ) -> BatchResult:
        """Add single-row units (shuffled mode); bad units are counted, not raised.

        A relayed batch must not be lost because one item in it is bad, so replays, conflicts
        and items over the summand bound are skipped and reported.
        """
        self._check_rows(slot_idx, shares)
        if len(keys) != len(slot_idx):
            raise WrongLength(f"{len(keys)} keys for {len(slot_idx)} rows")
        fresh = np.zeros(len(keys), dtype=bool)
        replayed = conflicting = over_bound = 0
        batch_first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if len(k) != KEY_BYTES:
                raise WrongLength(f"contribution id must be {KEY_BYTES} bytes, got {len(k)}")
            if k in self._units:
                if self._same(k, slot_idx[i : i + 1], shares[i : i + 1]):
                    replayed += 1
                else:
                    conflicting += 1
            elif k in batch_first:
                j = batch_first[k]
                same = slot_idx[j] == slot_idx[i] and np.array_equal(shares[j], shares[i])
                replayed += int(same)
                conflicting += int(not same)
            else:
                batch_first[k] = i
                fresh[i] = True
        # summand bound, in batch order: the k-th item to a slot is refused past the bound
        idx = np.flatnonzero(fresh)
        order = np.argsort(slot_idx[idx], kind="stable")
        s = slot_idx[idx][order]
        starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1] if len(s) else np.zeros(0, np.int64)
        rank = np.arange(len(s)) - np.repeat(starts, np.diff(np.r_[starts, len(s)]))
        ok_sorted = self._counts[s] + rank + 1 <= self.codec.max_summands
        keep = np.zeros(len(keys), dtype=bool)
        keep[idx[order[ok_sorted]]] = True
        over_bound = int((~ok_sorted).sum())
        kept = np.flatnonzero(keep)
        first_unit = len(self._units)
        start = self._append(
            np.arange(first_unit, first_unit + len(kept)), slot_idx[kept], shares[kept]
        )
        self._counts += np.bincount(slot_idx[kept], minlength=self.n_slots)
        for r, i in enumerate(kept.tolist()):
            self._units[keys[i]] = (start + r, 1)
        return BatchResult(len(kept), replayed, conflicting, over_bound)

    def rows(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Copies of every stored (slot index, share) row: this server's whole view of shares."""
        return self._slot[: self._rows].copy(), self._share[: self._rows].copy()

    # -- agreement --------------------------------------------------------------------------
    @property
    def unit_count(self) -> int:
        """Number of accepted units."""
        return len(self._units)

    def close(self) -> None:
        """Stop accepting submissions (idempotent)."""
        if self.state is PhaseState.OPEN:
            self.state = PhaseState.CLOSED

    def sorted_keys(self) -> npt.NDArray[np.void]:
        """This server's accepted unit keys, sorted (to send to the other server)."""
        if self.state is PhaseState.OPEN:
            raise PhaseError("close the phase before exchanging key sets")
        raw = b"".join(self._units)
        return np.sort(keys_from_bytes(raw))

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
        unit_keys = keys_from_bytes(b"".join(self._units))  # dict order = unit numbers
        alive = np.isin(unit_keys, common)[self._rowunit[: self._rows]]
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


def _counts(idx: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Distinct values and their multiplicities (a lean ``np.unique`` for short arrays)."""
    s = np.sort(idx)
    first = np.empty(len(s), dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return s[starts], np.diff(np.append(starts, len(s)))


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
