"""Slots: where contributions are summed.

Two kinds share one 8-byte identifier space (domain-separated derivations):

* **pseudonym slots** — ``AES-128(K_round, RPI)[:8]`` with ``K_round =
  HMAC-SHA256(deployment_key, label ‖ round)[:16]``: a keyed pseudorandom function of the RPI,
  computed for a whole batch in one AES call. The
  beacon's owner and everyone who heard the beacon derive the same slot; a server sees only the
  slot. A key per round makes a day's slots unlinkable to another day's. The 32-byte deployment
  key is secret (enrolled devices and C hold it) and required: without it the derivation fails
  closed, since slots computed from a public constant would let anyone map a slot to a beacon.
* **named aggregate slots** — ``SHA-256(label ‖ name)[:8]`` for canonical names matching one of
  :data:`AGGREGATE_PATTERNS` (``global/day/17``, ``grad/epoch/3``, ``region/BK/day/17``).

Why 8 bytes: a registration holds one slot per beacon (144 a device-day), so slot ids are most
of what devices send and what the servers record for their auditors; 16-byte ids doubled both.
64 pseudorandom bits keep accidental collisions negligible — among the ``n`` slots of one round,
a collision has probability below ``n² / 2^65`` (Astoria's 5.4 million slots a day: 8 × 10⁻⁷; a
million devices: 6 × 10⁻⁴ a day) — and a collision fails closed: the second registration is
refused (``SlotAlreadyRegistered``) and that participant sits the round out; nothing is summed
into a wrong slot. Guessing a slot that another device will register needs its RPI, which is
broadcast only after registration closes, or 2^64 tries.

:class:`SlotTable` maps identifiers to dense indices through a vectorized hash table of the ids
as 64-bit integers, so accumulation needs no Python loop over items. :class:`Registry`
records which participant owns each pseudonym slot and enforces "register once per round" and
"only the registrant fetches, once per phase per server" (an identical retry of either gets the
stored reply again).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import (
    AlreadyFetched,
    AlreadyRegistered,
    InvalidSlotName,
    MessageError,
    NotRegistrant,
    PartialGroup,
    SlotAlreadyRegistered,
    SlotError,
    UnknownSlot,
    WrongLength,
)

SLOT_ID_BYTES = 8
RPI_BYTES = 16
DEVICE_ID_BYTES = 16
_PSEUDONYM_LABEL = b"decentsim/pseudonym-slot/v1"
_AGGREGATE_LABEL = b"decentsim/aggregate-slot/v1\x00"
#: bytes of the secret deployment key of pseudonym slots
DEPLOYMENT_KEY_BYTES = 32
_NUM = r"(0|[1-9][0-9]{0,8})"  # canonical decimal: one spelling per number
#: allowed named aggregate slots; canonical spellings only
AGGREGATE_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(rf"global/day/{_NUM}"),
    re.compile(rf"grad/epoch/{_NUM}"),
    re.compile(rf"region/[A-Za-z0-9_-]{{1,32}}/day/{_NUM}"),
)


def round_slot_key(round_id: int, deployment_key: bytes) -> bytes:
    """The round's 16-byte AES key of pseudonym slots: HMAC-SHA256(deployment key, label ‖
    round)[:16]. A fresh key per round makes one beacon's slots of two rounds unlinkable.

    Raises:
        SlotError: the round id does not fit in 64 bits, or the deployment key is missing or
            not :data:`DEPLOYMENT_KEY_BYTES` bytes (fails closed: never a public derivation).
    """
    if not 0 <= round_id < 2**64:
        raise SlotError(f"round_id must fit in 64 unsigned bits, got {round_id}")
    if len(deployment_key) != DEPLOYMENT_KEY_BYTES:
        raise SlotError(
            f"pseudonym slots need the deployment's secret {DEPLOYMENT_KEY_BYTES}-byte key, got "
            f"{len(deployment_key)} bytes: refusing to derive slots anyone could compute"
        )
    msg = _PSEUDONYM_LABEL + round_id.to_bytes(8, "big")
    return hmac.new(deployment_key, msg, hashlib.sha256).digest()[:16]


def pseudonym_slots(rpis: bytes, round_id: int, deployment_key: bytes) -> bytes:
    """The pseudonym slots of many RPIs (concatenated 16-byte RPIs; n × 8 bytes out) for one
    round.

    ``slot = AES-128(round_slot_key(round), RPI)[:8]``: a keyed pseudorandom function of the
    16-byte RPI, so distinct beacons get distinct slots (but for a 2^-64 chance a pair, see the
    module docstring) and, without the deployment key (held by enrolled devices only), a slot
    says nothing about the RPI. One AES-ECB call serves the whole batch (a pool computes
    hundreds of thousands per day).

    Raises:
        WrongLength: the input is not a whole number of 16-byte RPIs.
        SlotError: no valid deployment key (:func:`round_slot_key`).
    """
    if len(rpis) % RPI_BYTES:
        raise WrongLength(f"RPI must be {RPI_BYTES} bytes, got {len(rpis)} bytes of RPIs")
    key = round_slot_key(round_id, deployment_key)
    blocks = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(rpis)
    return np.frombuffer(blocks, np.uint8).reshape(-1, RPI_BYTES)[:, :SLOT_ID_BYTES].tobytes()


def pseudonym_slot(rpi: bytes, round_id: int, deployment_key: bytes) -> bytes:
    """The pseudonym slot of one beacon identifier (RPI) for one round (see
    :func:`pseudonym_slots`).

    Raises:
        WrongLength: ``rpi`` is not 16 bytes.
    """
    if len(rpi) != RPI_BYTES:
        raise WrongLength(f"RPI must be {RPI_BYTES} bytes, got {len(rpi)}")
    return pseudonym_slots(rpi, round_id, deployment_key)


def validate_aggregate_name(name: str) -> str:
    """Return ``name`` if it is a canonical aggregate slot name.

    Raises:
        InvalidSlotName: it matches none of :data:`AGGREGATE_PATTERNS`.
    """
    if not any(p.fullmatch(name) for p in AGGREGATE_PATTERNS):
        allowed = ", ".join(p.pattern for p in AGGREGATE_PATTERNS)
        raise InvalidSlotName(f"invalid aggregate slot name {name!r}; allowed: {allowed}")
    return name


def aggregate_slot(name: str) -> bytes:
    """The identifier of a named aggregate slot (validated first)."""
    validate_aggregate_name(name)
    return hashlib.sha256(_AGGREGATE_LABEL + name.encode()).digest()[:SLOT_ID_BYTES]


def as_id_matrix(slot_ids: bytes | Sequence[bytes], what: str = "slot id") -> npt.NDArray[np.uint8]:
    """Slot ids as an ``(n, 8)`` uint8 matrix from concatenated bytes or a sequence."""
    raw = slot_ids if isinstance(slot_ids, bytes) else b"".join(slot_ids)
    if not isinstance(slot_ids, bytes):
        bad = next((s for s in slot_ids if len(s) != SLOT_ID_BYTES), None)
        if bad is not None:
            raise WrongLength(f"every {what} must be {SLOT_ID_BYTES} bytes, got {len(bad)}")
    if len(raw) % SLOT_ID_BYTES:
        raise WrongLength(f"{what}s: {len(raw)} bytes is not a multiple of {SLOT_ID_BYTES}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, SLOT_ID_BYTES)


def _as_u64(ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    return np.ascontiguousarray(ids).view(">u8").ravel().astype(np.uint64)


def slot_ints(slot_ids: bytes | Sequence[bytes]) -> npt.NDArray[np.uint64]:
    """Slot ids as 64-bit integers (big endian), from concatenated bytes or a sequence.

    Raises:
        WrongLength: an id of another length, or bytes that are not whole ids.
    """
    return _as_u64(as_id_matrix(slot_ids))


def _hex(value: np.uint64) -> str:
    return int(value).to_bytes(SLOT_ID_BYTES, "big").hex()


class SlotTable:
    """A set of slot ids with dense indices ``0..n-1`` in insertion order.

    Ids are 64-bit integers in numpy arrays, never one Python object per slot (a day of a
    37,518-device population registers 5.4 million), held in an open-addressing hash table
    (linear probing, at most half full) that is built, grown and searched with whole-array
    operations: one probe round is one vectorized step over every query still looking, and
    a lookup of a million ids costs milliseconds. The position of an id is its top bits after
    multiplying by a random odd 64-bit number drawn per table (multiply-shift hashing), so
    ids a device chose to collide do not lengthen probe chains predictably.
    """

    def __init__(self, slot_ids: bytes | Sequence[bytes] = b"") -> None:
        self._chunks: list[npt.NDArray[np.uint64]] = []
        self._n = 0
        self._values: npt.NDArray[np.uint64] | None = None
        self._matrix: npt.NDArray[np.uint8] | None = None
        self._multiplier = np.uint64(int.from_bytes(os.urandom(8), "big") | 1)
        self._resize(16)
        self.add_many(slot_ids)

    def __len__(self) -> int:
        return self._n

    def values(self) -> npt.NDArray[np.uint64]:
        """Every id as an integer, in index order."""
        if self._values is None or len(self._values) != self._n:
            self._values = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.uint64)
            self._chunks = [self._values] if self._n else []
        return self._values

    def id_bytes(self) -> bytes:
        """Every id, concatenated in index order (the slot directory)."""
        return self.values().astype(">u8").tobytes()

    def id_matrix(self) -> npt.NDArray[np.uint8]:
        """Every id as an ``(n, 8)`` uint8 matrix in index order (kept until the next add:
        every post draws its padding from it)."""
        if self._matrix is None or len(self._matrix) != self._n:
            self._matrix = np.frombuffer(self.id_bytes(), np.uint8).reshape(-1, SLOT_ID_BYTES)
        return self._matrix

    def check_new(self, slot_ids: bytes | Sequence[bytes]) -> npt.NDArray[np.uint64]:
        """The ids as integers; raises unless every one is well-formed, new here and unique
        within ``slot_ids``.

        Raises:
            WrongLength: a malformed id.
            SlotAlreadyRegistered: an id is in the table or repeated (the first one is named).
        """
        q = slot_ints(slot_ids)
        ordered = np.sort(q)
        if (ordered[1:] == ordered[:-1]).any():
            repeated = ordered[1:][ordered[1:] == ordered[:-1]]
            at = int(np.argmax(np.isin(q, repeated)))
            raise SlotAlreadyRegistered(f"slot {_hex(q[at])} is already registered")
        _, present = self._find(q)
        if present.any():
            at = int(np.argmax(present))
            raise SlotAlreadyRegistered(f"slot {_hex(q[at])} is already registered")
        return q

    def add_many(self, slot_ids: bytes | Sequence[bytes]) -> None:
        """Add new slot ids (all or nothing)."""
        q = self.check_new(slot_ids)
        if not len(q):
            return
        self._chunks.append(q)
        self._n += len(q)
        if 2 * self._n > len(self._keys):
            self._resize(2 * self._n)  # re-inserts everything, the new ids included
        else:
            self._insert(q, np.arange(self._n - len(q), self._n, dtype=np.int64))

    def lookup(self, ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
        """Indices of an ``(n, 8)`` id matrix, vectorized.

        Raises:
            UnknownSlot: some id is not in the table (the first one is named).
        """
        idx, ok = self.find(ids)
        if not ok.all():
            bad = bytes(ids[int(np.argmin(ok))])
            raise UnknownSlot(f"unknown slot {bad.hex()} (not registered or declared)")
        return idx

    def find(
        self, ids: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Indices of an ``(n, 8)`` id matrix and a mask of ids present (vectorized)."""
        return self._find(_as_u64(ids) if len(ids) else np.zeros(0, np.uint64))

    # -- the hash table -------------------------------------------------------------------
    def _home(self, q: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
        with np.errstate(over="ignore"):  # the product is meant to wrap modulo 2^64
            return ((q * self._multiplier) >> self._shift).astype(np.int64)

    def _resize(self, capacity: int) -> None:
        bits = max(4, (capacity - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        self._keys = np.zeros(1 << bits, dtype=np.uint64)
        self._index = np.full(1 << bits, -1, dtype=np.int64)  # -1: an empty cell
        if self._n:
            self._insert(self.values(), np.arange(self._n, dtype=np.int64))

    def _insert(self, q: npt.NDArray[np.uint64], idx: npt.NDArray[np.int64]) -> None:
        """Place new, distinct ids: each round, every id still waiting writes itself into its
        cell if the cell is empty; where several wrote the same cell one of them is there
        afterwards and the others move one cell on (no sort per round)."""
        mask = len(self._keys) - 1
        pos = self._home(q)
        waiting = np.arange(len(q))
        while len(waiting):
            cell = pos[waiting]
            free = np.flatnonzero(self._index[cell] < 0)
            claim, claimed = waiting[free], cell[free]
            self._index[claimed] = idx[claim]
            won = self._index[claimed] == idx[claim]
            self._keys[claimed[won]] = q[claim[won]]
            done = np.zeros(len(waiting), dtype=bool)
            done[free[won]] = True
            waiting = waiting[~done]
            pos[waiting] = (pos[waiting] + 1) & mask

    def _find(
        self, q: npt.NDArray[np.uint64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        mask = len(self._keys) - 1
        idx = np.zeros(len(q), dtype=np.int64)
        ok = np.zeros(len(q), dtype=bool)
        pos = self._home(q)
        looking = np.arange(len(q))
        while len(looking):
            cell = pos[looking]
            at = self._index[cell]
            hit = (at >= 0) & (self._keys[cell] == q[looking])
            idx[looking[hit]] = at[hit]
            ok[looking[hit]] = True
            # an occupied cell holding another id: look on; an empty cell: not present
            looking = looking[(at >= 0) & ~hit]
            pos[looking] = (pos[looking] + 1) & mask
        return idx, ok


@dataclass
class Registration:
    """One participant's registration in one round, as one server holds it.

    ``fetch_secret`` is held by the aggregator only. ``request_digest`` and ``reply`` make
    registration idempotent: the identical request is answered with ``reply`` again.
    ``fetches`` maps a phase to (digest of the fetch request answered, its reply), so a phase is
    fetched once and only an identical retry gets the same reply.
    """

    owner: bytes
    number: int
    request_digest: bytes
    reply: bytes
    fetch_secret: bytes | None = None
    #: its slots' table indices: ``first, first + 1, …`` (registered together, in its order)
    first: int = 0
    count: int = 0
    fetches: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)


class Registry:
    """Pseudonym slot ownership for one round, as held by one server.

    A participant (16-byte id; it may host many devices) registers once per round; the
    identical request may be repeated (it gets the stored reply). Only the registrant fetches
    its slots' sums, with one request per phase (an identical repeat gets the stored reply).
    """

    def __init__(self) -> None:
        self.table = SlotTable()
        self._participants: dict[bytes, Registration] = {}
        #: participant number per slot index, one array per registration
        self._owner: list[npt.NDArray[np.int64]] = []
        self._owner_array: npt.NDArray[np.int64] | None = None

    def registration(self, device_id: bytes) -> Registration | None:
        """The participant's registration this round, if any."""
        return self._participants.get(device_id)

    def replay(self, device_id: bytes, request_digest: bytes) -> bytes | None:
        """The stored reply if ``device_id`` registered exactly this request; None if it has not
        registered this round.

        Raises:
            AlreadyRegistered: it registered a different request this round.
        """
        reg = self._participants.get(device_id)
        if reg is None:
            return None
        if not hmac.compare_digest(reg.request_digest, request_digest):
            raise AlreadyRegistered(
                f"participant {device_id.hex()[:8]}… already registered with a different request "
                "this round (once per participant per round; only the identical request is "
                "answered again)"
            )
        return reg.reply

    def check_new(self, device_id: bytes, slot_ids: bytes | Sequence[bytes]) -> None:
        """Raise unless ``device_id`` may register ``slot_ids`` now (changes nothing).

        Raises:
            WrongLength: a malformed id.
            AlreadyRegistered: the participant registered already this round.
            SlotAlreadyRegistered: a slot is taken (or repeated in the request).
        """
        self._check_participant(device_id)
        self.table.check_new(slot_ids)

    def _check_participant(self, device_id: bytes) -> None:
        if len(device_id) != DEVICE_ID_BYTES:
            raise WrongLength(f"device id must be {DEVICE_ID_BYTES} bytes, got {len(device_id)}")
        if device_id in self._participants:
            raise AlreadyRegistered(
                f"participant {device_id.hex()[:8]}… already registered this round"
            )

    def register(
        self,
        device_id: bytes,
        slot_ids: bytes | Sequence[bytes],
        request_digest: bytes,
        reply: bytes,
        fetch_secret: bytes | None = None,
    ) -> Registration:
        """Register slots for ``device_id`` (all or nothing) with the reply to repeat on replays.

        Raises:
            WrongLength: a malformed id.
            AlreadyRegistered: the participant registered already this round.
            SlotAlreadyRegistered: a slot is taken (or repeated in the request).
        """
        self._check_participant(device_id)
        first = len(self.table)
        self.table.add_many(slot_ids)  # checks the slots (all or nothing)
        count = len(self.table) - first
        reg = Registration(
            device_id,
            len(self._participants),
            request_digest,
            reply,
            fetch_secret,
            first,
            count,
        )
        self._participants[device_id] = reg
        self._owner.append(np.full(count, reg.number, dtype=np.int64))
        self._owner_array = None
        return reg

    def authorize_fetch(
        self, device_id: bytes, ids: npt.NDArray[np.uint8], group_slots: int = 1
    ) -> tuple[Registration, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Check that ``device_id`` registered every slot of an ``(n, 8)`` id matrix (none:
        every slot it registered), and that they make whole groups of ``group_slots``
        (vectorized).

        Returns the registration, the slots' table indices, and each slot's release row: its
        group's rank among the groups named, in order of each group's first slot in ``ids``
        (the reply has one row per group). Marks nothing.

        Raises:
            MessageError: a slot is listed twice.
            UnknownSlot: a slot is not registered.
            NotRegistrant: a slot is registered by another participant.
            PartialGroup: the slots name part of a group (no total is released then).
        """
        reg = self._participants.get(device_id)
        if not len(ids):  # every slot it registered, in its order
            if reg is None:
                raise NotRegistrant("the participant registered no slots this round")
            idx = np.arange(reg.first, reg.first + reg.count, dtype=np.int64)
        else:
            idx, known = self.table.find(ids)
            if not known.all():
                bad = bytes(ids[int(np.argmin(known))])
                raise UnknownSlot(f"slot {bad.hex()} is not registered")
            if len(np.unique(idx)) != len(idx):
                raise MessageError("the fetch lists a slot more than once")
            if self._owner_array is None:
                self._owner_array = np.concatenate([np.zeros(0, np.int64), *self._owner])
                self._owner = [self._owner_array]
            mine = self._owner_array[idx] == (reg.number if reg is not None else -1)
            if reg is None or not mine.all():
                bad = bytes(ids[int(np.argmin(mine))])
                raise NotRegistrant(f"slot {bad.hex()} is registered to another participant")
        # a registration is one block of the table: a slot's place in it is idx − first
        group = (idx - reg.first) // group_slots
        named, first, row = np.unique(group, return_index=True, return_inverse=True)
        if len(idx) != group_slots * len(named):
            raise PartialGroup(
                f"the fetch names {len(idx)} slot(s) of {len(named)} group(s) of {group_slots}: "
                "only whole groups' totals are released"
            )
        # rows in order of each group's first appearance in the request
        rank = np.empty(len(named), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(named))
        return reg, idx, rank[row.reshape(-1)]

    @staticmethod
    def cached_fetch(reg: Registration, phase: str, request_digest: bytes) -> bytes | None:
        """The stored reply if ``reg`` fetched ``phase`` with exactly this request, else None.

        Raises:
            AlreadyFetched: it fetched ``phase`` with a different request.
        """
        done = reg.fetches.get(phase)
        if done is None:
            return None
        if not hmac.compare_digest(done[0], request_digest):
            raise AlreadyFetched(
                f"phase {phase!r} was already fetched by this participant with a different "
                "request (one fetch per participant, round and phase; only an identical retry "
                "is answered again)"
            )
        return done[1]

    @staticmethod
    def record_fetch(reg: Registration, phase: str, request_digest: bytes, reply: bytes) -> None:
        """Remember the reply to the participant's fetch of ``phase``."""
        reg.fetches[phase] = (request_digest, reply)
