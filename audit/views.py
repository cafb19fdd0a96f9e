"""The audit's typed model of one server's view and (where present) the ground truth.

:class:`AuditInput` is what every check reads: **one** server's view — its transcript and its
own private keys — never both (the two views together are the coordinator + aggregator
collusion the threat model excludes). It is built either from a federated run's directory
(:func:`audit.load.load_run`: that server's transcript opened with its own auditor's key, ground
truth from the pools' own stores, see :mod:`audit.truth`) or directly by tests from an
in-memory network whose servers' observers recorded the same records (:class:`RecordingObserver`).

:func:`server_shares` turns the server's transcript into its share rows — exactly what that
server could compute from its own view and its own private keys (the audit reads the server's
keys from its state dir to open what was sealed to it, and says so in the report) — and counts,
by reason, every record and item it could not use (:class:`Shares`).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from contract.schedule import NEIGHBOURHOOD
from contract.transcript import (
    TranscriptRecord,
    decode_record,
    encode_record,
)
from contract.views import ELIDED
from protocols.secure_sum import FixedPointCodec, KeyPair, Mode, open_envelope
from protocols.secure_sum.errors import SecureSumError
from protocols.secure_sum.messages import (
    DirectoryRequest,
    DirectoryResponse,
    FetchRequest,
    FetchResponse,
    MailboxPost,
    Message,
    RegisterRequest,
    RelayFetch,
    RelayMailbox,
    RelayRegister,
    RelayShuffled,
    ShuffledForC,
    ShuffledPost,
    decode,
)
from protocols.secure_sum.protocol import (
    CID_BYTES,
    INFO_ITEM_A,
    INFO_ITEM_C,
    INFO_MAILBOX,
    INFO_OUTER,
    SEED_BYTES,
    item_c_bytes,
    phase_aad,
    post_header,
)
from protocols.secure_sum.sharing import expand_seed, expand_seed_runs, expand_seeds
from protocols.secure_sum.slots import DEVICE_ID_BYTES, SLOT_ID_BYTES

#: bytes of a ``round ‖ slot`` key: the round (8 bytes, big endian), then the slot id
RS_BYTES = 8 + SLOT_ID_BYTES
#: bytes of an edge key ``round ‖ participant ‖ slot`` (participant at ``8 : RP_BYTES``)
RP_BYTES = 8 + DEVICE_ID_BYTES
EDGE_BYTES = RP_BYTES + SLOT_ID_BYTES

#: the two servers, in report order
ROLES = ("coordinator", "aggregator")


class AuditInputError(Exception):
    """A run directory cannot be audited; the message names the missing or bad file."""


@dataclass
class ServerView:
    """One server's recorded view: its transcript records and its own private keys.

    Attributes:
        role: ``"coordinator"`` or ``"aggregator"``.
        records: every message it received or sent, in order.
        keys: its own X25519 key pairs by deployment name (to open what was sealed to it).
        events: its JSON-lines view (events and sizes), possibly empty.
        unused: what loading the transcript could not use, by reason (e.g. a record cut short
            by a crash).
    """

    role: str
    records: list[TranscriptRecord]
    keys: dict[str, KeyPair]
    events: list[dict[str, Any]] = field(default_factory=list)
    unused: Counter[str] = field(default_factory=Counter)
    #: what the checks derive from the records, each computed once (not copied by replace())
    derived: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class TrueItem:
    """One real (non-dummy) contribution a participant made: the ground truth.

    Attributes:
        deployment: ``"neighbourhood"`` (messages to pseudonym slots) or ``"aggregates"``.
        round_id: the round it was posted in.
        participant: the 16-byte participant id that posted it.
        slot: the 8-byte slot id it was posted to.
        value: the contributed vector (float64, the deployment's dim).
        devices: distinct devices whose values are summed in it (a pool pre-sums per slot).
    """

    deployment: str
    round_id: int
    participant: bytes
    slot: bytes
    value: npt.NDArray[np.float64]
    devices: int = 1


@dataclass
class TruthTable:
    """The real contributions of one deployment as columns, one row per contribution (a
    demo run has hundreds of thousands: one Python object each would take most of the audit's
    memory)."""

    round_id: npt.NDArray[np.int64]
    participant: npt.NDArray[np.uint8]  # (n, 16)
    slot: npt.NDArray[np.uint8]  # (n, 8)
    value: npt.NDArray[np.float64]  # (n, dim)
    devices: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.round_id)

    @classmethod
    def empty(cls, dim: int = 1) -> TruthTable:
        """A table without rows."""
        return cls(
            np.zeros(0, np.int64),
            np.zeros((0, DEVICE_ID_BYTES), np.uint8),
            np.zeros((0, SLOT_ID_BYTES), np.uint8),
            np.zeros((0, dim)),
            np.zeros(0, np.int64),
        )

    @classmethod
    def concat(cls, parts: list[TruthTable]) -> TruthTable:
        """The rows of ``parts``, in order."""
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


class TruthBuilder:
    """Collects contributions in chunks of rows, per deployment (see :class:`TruthTable`)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[TruthTable]] = {}

    def add(
        self,
        deployment: str,
        round_id: int,
        participant: bytes,
        slots: bytes,
        values: npt.NDArray[np.float64],
        devices: npt.NDArray[np.int64] | int,
    ) -> None:
        """Contributions of one participant in one round: concatenated slot ids, one value row
        and device count per slot."""
        ids = np.frombuffer(slots, np.uint8).reshape(-1, SLOT_ID_BYTES)
        n = len(ids)
        self._parts.setdefault(deployment, []).append(
            TruthTable(
                np.full(n, round_id, np.int64),
                np.broadcast_to(np.frombuffer(participant, np.uint8), (n, len(participant))),
                ids,
                np.asarray(values, np.float64).reshape(n, -1),
                np.broadcast_to(np.asarray(devices, np.int64), (n,)),
            )
        )

    def tables(self) -> dict[str, TruthTable]:
        """One table per deployment."""
        return {dep: TruthTable.concat(parts) for dep, parts in self._parts.items()}


@dataclass
class Truth:
    """What only the devices know, for the checks to score attacks against.

    Attributes:
        tables: every real contribution, per deployment (:class:`TruthTable`).
        domains: participant id → trust domain (pool) index; a pool's participants collude by
            construction (one process), so "t colluding devices" means t pools.
        needles: planted secrets by label, each in the encodings it could leak in (raw, hex,
            decimal); no server file may contain any of them.
        notes: what the truth covers (e.g. contact-log retention), for the report.
        unused: rows of the pools' stores that no contribution could be derived from, by
            reason.
    """

    tables: dict[str, TruthTable]
    domains: dict[bytes, int]
    needles: dict[str, list[bytes]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    unused: Counter[str] = field(default_factory=Counter)

    @classmethod
    def from_items(cls, items: Iterable[TrueItem], domains: dict[bytes, int]) -> Truth:
        """A truth of the given contributions (small hand-built truths: tests)."""
        builder = TruthBuilder()
        for it in items:
            builder.add(it.deployment, it.round_id, it.participant, it.slot, it.value, it.devices)
        return cls(builder.tables(), domains)

    def table(self, deployment: str) -> TruthTable:
        """The contributions to ``deployment`` (an empty table if none)."""
        return self.tables.get(deployment, TruthTable.empty())

    def __len__(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def items(self) -> Iterator[TrueItem]:
        """Every contribution as an object (one per row: for small truths)."""
        for dep, t in self.tables.items():
            for i in range(len(t)):
                yield TrueItem(
                    dep,
                    int(t.round_id[i]),
                    t.participant[i].tobytes(),
                    t.slot[i].tobytes(),
                    t.value[i].copy(),
                    int(t.devices[i]),
                )


@dataclass
class BehaviourRecord:
    """What the coordinator kept of a run's behaviour, from its own state dir.

    Attributes:
        rows: (epoch, period) → the row sent to the devices, (cells, behaviours) float64.
        sources: (epoch, period) → what filled the row (``table:PATH``, ``llm:MODEL@URL``).
        daily_cases: epoch → the opened daily new infections of its committed days, in order.
        cache: the files of the coordinator's language-model answer cache.
    """

    rows: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    sources: dict[tuple[int, int], str] = field(default_factory=dict)
    daily_cases: dict[int, np.ndarray] = field(default_factory=dict)
    cache: list[Path] = field(default_factory=list)


@dataclass
class AuditInput:
    """Everything the checks read: one server's view.

    Attributes:
        mode: the run's posting mode.
        codecs: fixed-point codec by deployment name.
        view: the audited server's view (its transcript and its own keys).
        truth: ground truth, or ``None`` when the run dir has none.
        scan_files: the audited server's files (databases, logs, views, keys) and the run's
            public outputs, for the secrets scan.
        config: the run's public configuration (the run spec as a dict) for the profile.
        min_cohort: the minimum cohort the servers enforced (0: off).
        source: where this came from (a run dir, or a description of the crafted input).
        dims: each deployment's vector length from the run's public schedule (empty: taken
            from the view's posts or the truth).
        behaviour: the coordinator's record of a table/llm run's behaviour rows and their
            inputs (:class:`audit.behaviour.BehaviourRecord`); None for the aggregator, a
            heuristic run, or a crafted input.
        group_slots: the neighbourhood phase's slot group (the beacons a device registers a
            day, ``advertising_intervals``): a fetch releases one total per group.
    """

    mode: Mode
    codecs: dict[str, FixedPointCodec]
    view: ServerView
    truth: Truth | None = None
    scan_files: list[Path] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    min_cohort: int = 0
    source: str = ""
    dims: dict[str, int] = field(default_factory=dict)
    behaviour: BehaviourRecord | None = None
    group_slots: int = 1

    @property
    def role(self) -> str:
        """The audited server: ``"coordinator"`` or ``"aggregator"``."""
        return self.view.role


class RecordingObserver:
    """An in-memory transcript: set ``server.observer = RecordingObserver(...).bind(name)``.

    Records exactly what the sealed file would hold (the same record encoding, the same elided
    messages: ``contract.views.ELIDED``), for tests and in-process audits.
    """

    def __init__(self, role: str) -> None:
        self.role = role
        self.records: list[TranscriptRecord] = []
        self.elide = ELIDED.get(role, frozenset())

    def bind(self, deployment: str) -> Any:
        """The observer callable for the server of ``deployment``."""

        def observe(direction: str, peer: str, raw: bytes) -> None:
            plain = encode_record(direction, time.time(), deployment, peer, raw, self.elide)
            self.records.append(decode_record(len(self.records), plain))

        return observe


# -- share rows ---------------------------------------------------------------------------------
@dataclass
class Rows:
    """Share rows of one server, one deployment: one row per item it holds a share of.

    Attributes:
        round_id, phase: per row (the phase names are shared str objects: 8 bytes a row, not
            a fixed-width copy of the name).
        participant: ``(n, 16)`` uint8 poster ids; all-zero where this server cannot tell
            (shuffled items) — ``known`` says which.
        slot: ``(n, 8)`` uint8 slot ids.
        share: ``(n, dim)`` int64 ring shares.
        cid: ``(n, 16)`` uint8 contribution ids (shuffled), zeros otherwise.
        position: index of the item in the batch the server received it in (arrival or relay
            order), for order-based linkage.
        batch: ``(round, phase)`` key → the ordered posters of that batch and their item
            counts, as the server saw them (the sender side of a linkage attack).
        sampled: ``(round, phase)`` → (items opened, items received) of each batch of which
            only a fixed-seed sample was opened (``max_open``).
    """

    round_id: npt.NDArray[np.int64]
    phase: npt.NDArray[np.object_]
    participant: npt.NDArray[np.uint8]
    known: npt.NDArray[np.bool_]
    slot: npt.NDArray[np.uint8]
    share: npt.NDArray[np.int64]
    cid: npt.NDArray[np.uint8]
    position: npt.NDArray[np.int64]
    batch: dict[tuple[int, str], list[tuple[bytes, int]]] = field(default_factory=dict)
    sampled: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.round_id.size)

    @property
    def unopened(self) -> int:
        """Items this server received but the audit did not open (the sampling cap)."""
        return sum(received - opened for opened, received in self.sampled.values())

    def take(self, idx: npt.NDArray[np.int64] | slice) -> Rows:
        """The rows at ``idx`` (in that order; a slice gives views), with the whole view's
        batches and samples."""
        return Rows(
            self.round_id[idx],
            self.phase[idx],
            self.participant[idx],
            self.known[idx],
            self.slot[idx],
            self.share[idx],
            self.cid[idx],
            self.position[idx],
            self.batch,
            self.sampled,
        )


@dataclass
class _RowBuilder:
    """Rows gathered one post (or one relay's items) at a time, as arrays: a sampled Astoria
    view has millions of rows, and a Python object per row would outweigh the shares."""

    dim: int
    round_id: list[npt.NDArray[np.int64]] = field(default_factory=list)
    phase: list[npt.NDArray[np.object_]] = field(default_factory=list)
    participant: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    known: list[npt.NDArray[np.bool_]] = field(default_factory=list)
    slot: list[bytes] = field(default_factory=list)
    share: list[npt.NDArray[np.int64]] = field(default_factory=list)
    cid: list[bytes] = field(default_factory=list)
    position: list[npt.NDArray[np.int64]] = field(default_factory=list)
    batch: dict[tuple[int, str], list[tuple[bytes, int]]] = field(default_factory=dict)
    sampled: dict[tuple[int, str], tuple[int, int]] = field(default_factory=dict)

    def add(
        self,
        round_id: int,
        phase: str,
        participant: bytes,
        slots: bytes,
        shares: npt.NDArray[np.int64],
        cids: bytes = b"",
        positions: Iterable[int] | None = None,
    ) -> None:
        """``n`` rows of one poster (``participant``; ``b""``: unknown to this server)."""
        n = len(slots) // SLOT_ID_BYTES
        self.round_id.append(np.full(n, round_id, dtype=np.int64))
        self.phase.append(np.array([phase], dtype=object).repeat(n))  # one str, n refs
        poster = np.frombuffer(participant or bytes(DEVICE_ID_BYTES), dtype=np.uint8)
        self.participant.append(np.broadcast_to(poster, (n, DEVICE_ID_BYTES)))
        self.known.append(np.full(n, bool(participant)))
        self.slot.append(slots)
        self.share.append(np.asarray(shares, dtype=np.int64).reshape(n, self.dim))
        self.cid.append(cids)  # b"": a poster's rows carry no contribution id
        self.position.append(
            np.arange(n, dtype=np.int64)
            if positions is None
            else np.fromiter(positions, dtype=np.int64, count=n)
        )

    def build(self) -> Rows:
        def joined(parts: list[Any], empty: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return np.concatenate(parts) if parts else empty

        slot = np.frombuffer(b"".join(self.slot), dtype=np.uint8).reshape(-1, SLOT_ID_BYTES)
        n = len(slot)
        if any(self.cid):  # shuffled items carry their cids (a poster's rows, zeros)
            ids = [
                c or bytes(CID_BYTES * len(r)) for c, r in zip(self.cid, self.round_id, strict=True)
            ]
            cid = np.frombuffer(b"".join(ids), dtype=np.uint8).reshape(-1, CID_BYTES)
        else:  # none (a read-only view of zeros: no memory for millions of rows)
            cid = np.broadcast_to(np.zeros(CID_BYTES, np.uint8), (n, CID_BYTES))
        return Rows(
            joined(self.round_id, np.zeros(0, np.int64)),
            joined(self.phase, np.zeros(0, object)),
            joined(self.participant, np.zeros((0, DEVICE_ID_BYTES), np.uint8)),
            joined(self.known, np.zeros(0, bool)),
            slot,
            joined(self.share, np.zeros((0, self.dim), np.int64)),
            cid,
            joined(self.position, np.zeros(0, np.int64)),
            self.batch,
            self.sampled,
        )


# reasons a record or item is not used (the keys of the ``unused`` counters; the report lists them)
REPLAYED = "replayed message (its first copy is used)"
MALFORMED_POST = "post whose share length is not items × dim"
SEED_NOT_OPENED = "sealed seed that did not open (the aggregator holds no share of that post)"
OUTER_NOT_OPENED = "outer envelope that did not open (its poster's item count is unknown)"
ITEM_NOT_OPENED = "item envelope that did not open"
ITEM_WRONG_SIZE = "opened item of the wrong size"
NOT_SAMPLED = "item not opened (beyond --max-open: a fixed-seed sample of its batch was opened)"
UNANSWERED_FETCH = "fetch request without a released reply (refused, or no reply recorded)"


def transcript_unused(view: ServerView, deployments: Iterable[str]) -> Counter[str]:
    """Records of ``view`` that no check can use, by reason: what loading it could not use
    (``view.unused``), protocol messages that do not decode (by direction), and messages of a
    deployment the audit has no codec for. Each record is counted once."""
    out = Counter(view.unused)
    known = set(deployments)
    for r in view.records:
        if r.kind == "?":  # the writer could not decode it either (see contract.transcript)
            out[f"undecodable protocol message ({r.direction})"] += 1
        elif r.deployment not in known:
            out[f"message of a deployment the audit has no codec for ({r.deployment!r})"] += 1
    return out


def accepted_registrations(
    view: ServerView, deployment: str = NEIGHBOURHOOD
) -> dict[tuple[int, bytes], bytes]:
    """(round, participant) → its slot list, for every registration the server accepted (a
    request answered by a RegisterResponse), in the order accepted — the order of the round's
    slot directory. Computed once per view.

    A device request and its reply are consecutive for that device in the transcript (the
    coordinator serves devices one at a time, its relay to the aggregator in between)."""
    cached = view.derived.get(("accepted", deployment))
    if cached is not None:
        return cached
    accepted: dict[tuple[int, bytes], bytes] = {}
    asked: dict[str, RegisterRequest | RelayRegister] = {}
    # C hears registrations from devices; A hears them relayed by C, one at a time
    from_devices = view.role == "coordinator"
    for r in view.records:
        if (r.peer not in ROLES) != from_devices or r.elided or r.deployment != deployment:
            continue
        if r.direction == "in":
            asked.pop(r.peer, None)
            if r.kind in ("RegisterRequest", "RelayRegister"):
                try:
                    msg = decode(r.payload)
                except SecureSumError:
                    continue
                assert isinstance(msg, RegisterRequest | RelayRegister)
                asked[r.peer] = msg
        elif r.kind == "RegisterResponse" and r.peer in asked:
            req = asked.pop(r.peer)
            accepted.setdefault((req.round_id, req.device_id), req.slot_ids)
    view.derived[("accepted", deployment)] = accepted
    return accepted


def verify_elided(view: ServerView) -> tuple[int, list[str]]:
    """Rebuild every elided record of the view (``contract.views.ELIDED``) from the records it
    derives from, and compare digests: (records checked, what did not match).

    A device request and its reply are consecutive in the transcript (the coordinator serves
    devices one at a time, its relay to the aggregator in between), so each elided relay is the
    copy of the device request before it, and each directory reply (served once registration
    closed) is the round's accepted registrations, in order."""
    checked, bad = 0, []
    registered: dict[int, list[bytes]] = {}
    for (round_id, _), slot_ids in accepted_registrations(view).items():
        registered.setdefault(round_id, []).append(slot_ids)
    pending: dict[str, Message | None] = {}  # the device request being served, by peer
    current: Message | None = None
    needed = ("RegisterRequest", "FetchRequest", "DirectoryRequest")
    for r in view.records:
        if r.peer not in ROLES and not r.elided:
            if r.direction == "in":
                # only the requests an elided record derives from are decoded (posts are not)
                msg: Message | None = None
                if r.kind in needed:
                    try:
                        msg = decode(r.payload)
                    except SecureSumError:
                        msg = None
                pending[r.peer] = current = msg
                continue
            pending.pop(r.peer, None)
            continue
        if not r.elided:
            continue
        checked += 1
        want: Message | None = None
        if r.kind == "DirectoryResponse":
            req = pending.get(r.peer)
            if isinstance(req, DirectoryRequest):
                want = DirectoryResponse(b"".join(registered.get(req.round_id, [])))
        elif r.kind == "RelayRegister" and isinstance(current, RegisterRequest):
            m = current
            want = RelayRegister(m.device_id, m.round_id, m.slot_ids, m.sealed_for_a)
        elif r.kind == "RelayFetch" and isinstance(current, FetchRequest):
            m = current
            want = RelayFetch(m.device_id, m.round_id, m.phase, m.slot_ids, m.sealed_for_a)
        digest, length = r.elided_digest()
        raw = want.to_bytes() if want is not None else b""
        if want is None or len(raw) != length or hashlib.sha256(raw).digest() != digest:
            bad.append(
                f"record {r.seq} ({r.direction} {r.kind}) is not what the transcript determines"
            )
    return checked, bad


def _decoded(records: Iterable[TranscriptRecord], direction: str, peer_is_device: bool | None):
    """(record, message) pairs of one direction; undecodable payloads and elided records are
    skipped (the former counted once, by :func:`transcript_unused`)."""
    for r in records:
        if r.direction != direction or r.elided:
            continue
        is_device = r.peer not in ROLES
        if peer_is_device is not None and is_device != peer_is_device:
            continue
        try:
            yield r, decode(r.payload)
        except SecureSumError:
            continue


def _sample(n: int, cap: int, salt: int) -> npt.NDArray[np.int64]:
    """Positions to open of a batch of ``n`` items, at most ``cap`` (a fixed-seed sample: the
    analysis must be reproducible; nothing secret is drawn)."""
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(0xA0D17 + salt)
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


@dataclass
class Shares:
    """One server's share rows by deployment, and what extracting them could not use.

    Attributes:
        rows: deployment → the server's share rows.
        unused: reason → records or items of the view that were not turned into rows.
    """

    rows: dict[str, Rows]
    unused: Counter[str] = field(default_factory=Counter)


def server_shares(
    view: ServerView, mode: Mode, dims: dict[str, int], max_open: int = 200_000
) -> Shares:
    """The share rows each deployment's server holds, computed from its own view and keys.

    Coordinator: the C-shares of mailbox/plaintext posts (with their poster), or in shuffled mode
    the C-items A returned (opened with C's key; poster unknown). Aggregator: the seeds sealed
    to it (mailbox, with the poster from the relay) expanded to its shares, zeros in plaintext,
    or the shuffled A-items (opened with A's key; poster unknown). Replays are used once.
    Shuffled batches larger than ``max_open`` items are sampled (fixed seed) — one public-key
    open per item is the cost. Every record or item not turned into rows (replays, envelopes
    that do not open, items not sampled, malformed posts) is counted in ``Shares.unused``.
    """
    out = {name: _RowBuilder(dim) for name, dim in dims.items()}
    unused: Counter[str] = Counter()
    seen: set[tuple[str, int, str, bytes]] = set()
    if mode is Mode.DENSE:
        return _dense_shares(view, out, unused, max_open)
    if view.role == "coordinator":
        posters: dict[tuple[str, int, str], list[tuple[bytes, int]]] = {}
        for r, msg in _decoded(view.records, "in", True):
            if r.deployment not in out or not isinstance(msg, MailboxPost | ShuffledPost):
                continue
            key = (r.deployment, msg.round_id, msg.phase)
            if (*key, msg.device_id) in seen:
                unused[REPLAYED] += 1
                continue
            seen.add((*key, msg.device_id))
            if isinstance(msg, ShuffledPost):
                posters.setdefault(key, []).append((msg.device_id, len(msg.items_for_a)))
                continue
            b = out[r.deployment]
            n = len(msg.slot_ids) // SLOT_ID_BYTES
            if len(msg.share_c) != 8 * n * b.dim or len(msg.slot_ids) != n * SLOT_ID_BYTES:
                unused[MALFORMED_POST] += 1
                continue
            share = np.frombuffer(msg.share_c, dtype="<i8").astype(np.int64)
            b.add(msg.round_id, msg.phase, msg.device_id, msg.slot_ids, share)
            posters.setdefault(key, []).append((msg.device_id, n))
        # the relay order of posters (what C sent to A) is the batch order
        for r, msg in _decoded(view.records, "out", False):
            if isinstance(msg, RelayShuffled | RelayMailbox) and r.deployment in out:
                key = (r.deployment, msg.round_id, msg.phase)
                counts = dict(posters.get(key, []))
                out[r.deployment].batch.setdefault(
                    (msg.round_id, msg.phase), [(d, counts.get(d, 0)) for d in msg.device_ids]
                )
        for r, msg in _decoded(view.records, "in", False):
            if not isinstance(msg, ShuffledForC) or r.deployment not in out:
                continue
            if (r.deployment, msg.round_id, msg.phase, b"C") in seen:
                unused[REPLAYED] += 1
                continue
            seen.add((r.deployment, msg.round_id, msg.phase, b"C"))
            b = out[r.deployment]
            pos = _sample_batch(
                b, unused, len(msg.items_for_c), max_open, (msg.round_id, msg.phase), msg.round_id
            )
            _open_items(
                b,
                unused,
                view.keys[r.deployment],
                [msg.items_for_c[i] for i in pos.tolist()],
                pos,
                INFO_ITEM_C,
                msg.round_id,
                msg.phase,
                8 * b.dim,
                lambda payload, d=b.dim: (
                    np.frombuffer(payload, "<i8").astype(np.int64).reshape(-1, d)
                ),
            )
        return Shares({k: v.build() for k, v in out.items()}, unused)
    for r, msg in _decoded(view.records, "in", False):
        if r.deployment not in out or not isinstance(msg, RelayMailbox | RelayShuffled):
            continue
        if (r.deployment, msg.round_id, msg.phase, b"") in seen:
            unused[REPLAYED] += 1
            continue
        seen.add((r.deployment, msg.round_id, msg.phase, b""))
        b = out[r.deployment]
        if isinstance(msg, RelayMailbox):
            b.batch[(msg.round_id, msg.phase)] = [
                (d, len(s) // SLOT_ID_BYTES)
                for d, s in zip(msg.device_ids, msg.slot_ids, strict=True)
            ]
            _mailbox_a(b, unused, view.keys[r.deployment], msg, mode)
            continue
        size_c = item_c_bytes(b.dim)
        keys = view.keys[r.deployment]
        counts = []
        for device, outer in zip(msg.device_ids, msg.outers, strict=True):
            try:
                blob = open_envelope(
                    keys, outer, INFO_OUTER, post_header(device, msg.round_id, msg.phase)
                )
                counts.append((device, len(blob) // size_c))
            except SecureSumError:
                unused[OUTER_NOT_OPENED] += 1
                counts.append((device, 0))
        b.batch[(msg.round_id, msg.phase)] = counts
        pos = _sample_batch(
            b, unused, len(msg.items_for_a), max_open, (msg.round_id, msg.phase), msg.round_id + 1
        )
        _open_items(
            b,
            unused,
            keys,
            [msg.items_for_a[i] for i in pos.tolist()],
            pos,
            INFO_ITEM_A,
            msg.round_id,
            msg.phase,
            SEED_BYTES,
            lambda seeds, d=b.dim: expand_seeds(seeds, d),
        )
    return Shares({k: v.build() for k, v in out.items()}, unused)


def dense_directory(view: ServerView, deployment: str, round_id: int) -> bytes:
    """The slot directory a dense pseudonym post of ``round_id`` follows by position: the round's
    accepted registrations, in the order accepted (the servers' agreed table)."""
    cached = view.derived.get(("directory", deployment))
    if cached is None:
        cached = {}
        for (rnd, _), slot_ids in accepted_registrations(view, deployment).items():
            cached.setdefault(rnd, []).append(slot_ids)
        cached = {rnd: b"".join(parts) for rnd, parts in cached.items()}
        view.derived[("directory", deployment)] = cached
    return cached.get(round_id, b"")


def _dense_shares(
    view: ServerView, out: dict[str, _RowBuilder], unused: Counter[str], max_open: int
) -> Shares:
    """Dense mode: every post is one share of every slot of its phase's table (named in an
    aggregate phase, the round's directory by position in a pseudonym phase). C's rows are the
    posted C-shares; A's the relayed seeds expanded. A batch of ``P`` posts over ``D`` slots
    larger than ``max_open`` rows keeps the same fixed-seed sample of slot positions in every
    post (so the posts stay comparable slot by slot); the rest is counted as not sampled. Two
    passes over the records: the first counts each batch's posts, the second turns one post at
    a time into its sampled rows (a post's megabytes are never all held at once)."""
    coordinator = view.role == "coordinator"
    posts_in: Counter[tuple[str, int, str]] = Counter()
    for post in _dense_posts(view, out, unused, coordinator, count_replays=True):
        posts_in[post[:3]] += 1
    for dep, round_id, phase, device, slot_ids, part in _dense_posts(
        view, out, unused, coordinator, count_replays=False
    ):
        b = out[dep]
        ids = slot_ids or dense_directory(view, dep, round_id)
        n = len(ids) // SLOT_ID_BYTES
        if coordinator:
            if len(part) != 8 * n * b.dim:
                unused[MALFORMED_POST] += 1
                continue
            share = np.frombuffer(part, dtype="<i8").reshape(n, b.dim)
        else:
            header = post_header(device, round_id, phase)
            try:
                inner = open_envelope(view.keys[dep], part, INFO_MAILBOX, header)
            except SecureSumError:
                unused[SEED_NOT_OPENED] += 1
                continue
            share = expand_seed(inner[:SEED_BYTES], n * b.dim).reshape(n, b.dim)
        keep = _sample(n, max(1, max_open // posts_in[(dep, round_id, phase)]), round_id)
        if len(keep) < n:
            b.sampled[(round_id, phase)] = (
                len(keep) * posts_in[(dep, round_id, phase)],
                n * posts_in[(dep, round_id, phase)],
            )
            unused[NOT_SAMPLED] += n - len(keep)
        slots = np.frombuffer(ids, np.uint8).reshape(n, SLOT_ID_BYTES)[keep].tobytes()
        b.add(round_id, phase, device, slots, share[keep].astype(np.int64), positions=keep)
        b.batch.setdefault((round_id, phase), []).append((device, len(keep)))
    return Shares({k: v.build() for k, v in out.items()}, unused)


def _dense_posts(
    view: ServerView,
    out: dict[str, _RowBuilder],
    unused: Counter[str],
    coordinator: bool,
    count_replays: bool,
) -> Iterator[tuple[str, int, str, bytes, bytes, bytes]]:
    """Each distinct dense post of the view, as (deployment, round, phase, participant, slot ids,
    C-share bytes at C | sealed seed at A); replays (a post again, a relay again) are skipped,
    and counted once when ``count_replays``."""
    seen: set[tuple[str, int, str, bytes]] = set()
    for r, msg in _decoded(view.records, "in", coordinator):
        if r.deployment not in out:
            continue
        if coordinator and isinstance(msg, MailboxPost):
            key = (r.deployment, msg.round_id, msg.phase, msg.device_id)
            if key in seen:
                unused[REPLAYED] += count_replays
                continue
            seen.add(key)
            yield (*key, msg.slot_ids, msg.share_c)
        elif not coordinator and isinstance(msg, RelayMailbox):
            key = (r.deployment, msg.round_id, msg.phase, b"")
            if key in seen:
                unused[REPLAYED] += count_replays
                continue
            seen.add(key)
            for entry in zip(msg.device_ids, msg.slot_ids, msg.sealed_for_a, strict=True):
                yield (*key[:3], *entry)


def _sample_batch(
    b: _RowBuilder,
    unused: Counter[str],
    n: int,
    cap: int,
    batch: tuple[int, str],
    salt: int,
) -> npt.NDArray[np.int64]:
    """The positions to open of ``batch`` (round, phase) of ``n`` items (see :func:`_sample`);
    a sampled batch is recorded in ``b.sampled`` and its items not opened are counted."""
    pos = _sample(n, cap, salt)
    if len(pos) < n:
        b.sampled[batch] = (len(pos), n)
        unused[NOT_SAMPLED] += n - len(pos)
    return pos


def _mailbox_a(
    b: _RowBuilder, unused: Counter[str], keys: KeyPair, msg: RelayMailbox, mode: Mode
) -> None:
    """A's shares of a mailbox relay: each post's sealed seed expanded (zeros in plaintext)."""
    for device, slots, sealed in zip(msg.device_ids, msg.slot_ids, msg.sealed_for_a, strict=True):
        n = len(slots) // SLOT_ID_BYTES
        if mode is Mode.PLAINTEXT:
            b.add(msg.round_id, msg.phase, device, slots, np.zeros((n, b.dim), dtype=np.int64))
            continue
        header = post_header(device, msg.round_id, msg.phase)
        try:
            inner = open_envelope(keys, sealed, INFO_MAILBOX, header)
        except SecureSumError:
            unused[SEED_NOT_OPENED] += 1
            continue
        shares = expand_seed_runs([inner[:SEED_BYTES]], [n * b.dim])
        b.add(msg.round_id, msg.phase, device, slots, shares)


def _open_items(
    b: _RowBuilder,
    unused: Counter[str],
    keys: KeyPair,
    envelopes: list[bytes],
    positions: npt.NDArray[np.int64],
    info: bytes,
    round_id: int,
    phase: str,
    payload_bytes: int,
    to_shares: Any,
) -> None:
    """Open shuffled items (cid ‖ slot ‖ payload) sealed to this server and add them."""
    want = CID_BYTES + SLOT_ID_BYTES + payload_bytes
    plains, kept = [], []
    aad = phase_aad(round_id, phase)
    for env, p in zip(envelopes, positions.tolist(), strict=True):
        try:
            plain = open_envelope(keys, env, info, aad)
        except SecureSumError:
            unused[ITEM_NOT_OPENED] += 1
            continue
        if len(plain) != want:
            unused[ITEM_WRONG_SIZE] += 1
            continue
        plains.append(plain)
        kept.append(p)
    if not plains:
        return
    mat = np.frombuffer(b"".join(plains), dtype=np.uint8).reshape(-1, want)
    cids = mat[:, :CID_BYTES].tobytes()
    slots = mat[:, CID_BYTES : CID_BYTES + SLOT_ID_BYTES].tobytes()
    shares = to_shares(mat[:, CID_BYTES + SLOT_ID_BYTES :].tobytes())
    b.add(round_id, phase, b"", slots, shares, cids, kept)


@dataclass(frozen=True)
class Registrations:
    """Every pseudonym slot registered in a view, as arrays (millions of slots: no dicts).

    ``keys`` are ``round ‖ slot`` (sorted, unique); aligned with them, ``owner`` indexes the
    registrant in ``participants`` and ``group`` indexes (in ``keys``) the first slot of the
    slot's group — a registrant's slots, in the order it registered them, in consecutive groups
    of ``group_slots``; the servers release only a group's total. Indices, not 16-byte keys:
    Astoria registers millions of slots."""

    keys: npt.NDArray[np.void]
    owner: npt.NDArray[np.int32]
    participants: npt.NDArray[np.uint8]
    group: npt.NDArray[np.int32]
    group_slots: int = 1

    def __len__(self) -> int:
        return len(self.keys)

    def rounds(self) -> set[int]:
        """The rounds with a registration."""
        raw = self.keys.view(np.uint8).reshape(-1, RS_BYTES)[:, :8].copy().view(">i8").ravel()
        return {int(r) for r in np.unique(raw)}

    def registered(self, keys: npt.NDArray[np.void]) -> npt.NDArray[np.bool_]:
        """Which ``round ‖ slot`` keys some participant registered."""
        if not len(self.keys):
            return np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[pos] == keys

    def owned_groups(self, ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.void]:
        """The group keys (sorted; the slot keys when a group is one slot) of the slots any of
        the ``(m, 16)`` participant ids registered."""
        if not len(ids) or not len(self.keys):
            return np.zeros(0, dtype=f"V{RS_BYTES}")
        known = np.ascontiguousarray(self.participants).view("V16").ravel()
        wanted = np.ascontiguousarray(ids).view("V16").ravel()
        # a mask per participant, then one lookup per slot: no sort of millions of owners
        mine = np.isin(known, wanted)[self.owner]
        return self.keys[np.unique(self.group[mine])]

    def group_of(self, keys: npt.NDArray[np.void]) -> npt.NDArray[np.void]:
        """The group key of each ``round ‖ slot`` key; a slot nobody registered is its own."""
        if not len(self.keys) or self.group_slots == 1:
            return keys.copy()
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, self.keys[self.group[pos]], keys)


def registrations(
    view: ServerView, group_slots: int = 1, deployment: str = NEIGHBOURHOOD
) -> Registrations:
    """Every slot registered in C's RegisterRequests (or A's RelayRegisters), its registrant and
    its group of ``group_slots`` (a resent registration counts once). Computed once per view."""
    cached = view.derived.get(("registrations", group_slots, deployment))
    if cached is not None:
        return cached
    # one pass finds the distinct registrations, a second fills preallocated arrays (Astoria
    # registers millions of slots: no per-slot Python objects, no list of partial arrays)
    peer_is_device = view.role == "coordinator"
    chosen: list[RegisterRequest | RelayRegister] = []
    seen: set[tuple[int, bytes, bytes]] = set()
    participants: dict[bytes, int] = {}
    total = 0
    for r in view.records:
        if r.direction != "in" or r.elided or r.deployment != deployment:
            continue
        if r.kind not in ("RegisterRequest", "RelayRegister") or (r.peer not in ROLES) != (
            peer_is_device
        ):
            continue
        try:
            msg = decode(r.payload)
        except SecureSumError:
            continue
        assert isinstance(msg, RegisterRequest | RelayRegister)
        # a resent registration is identical: count it once
        key = (msg.round_id, msg.device_id, hashlib.sha256(msg.slot_ids).digest())
        if key in seen:
            continue
        seen.add(key)
        chosen.append(msg)
        participants.setdefault(msg.device_id, len(participants))
        total += len(msg.slot_ids) // SLOT_ID_BYTES
    raw_keys = np.empty(total, dtype=f"V{RS_BYTES}")
    owner = np.empty(total, dtype=np.int32)
    first = np.empty(total, dtype=np.int32)  # where each slot's group starts
    at = 0
    for msg in chosen:
        ids = np.frombuffer(msg.slot_ids, np.uint8).reshape(-1, SLOT_ID_BYTES)
        n = len(ids)
        raw_keys[at : at + n] = round_slot_keys(msg.round_id, ids)
        owner[at : at + n] = participants[msg.device_id]
        first[at : at + n] = at + (np.arange(n, dtype=np.int32) // group_slots) * group_slots
        at += n
    del chosen
    order = np.argsort(raw_keys, kind="stable")
    keys = raw_keys[order]
    del raw_keys
    rank = np.empty(total, dtype=np.int32)
    rank[order] = np.arange(total, dtype=np.int32)
    group = np.empty(total, dtype=np.int32)
    group[rank] = rank[first]
    del rank, first
    out = Registrations(
        keys,
        owner[order],
        np.frombuffer(b"".join(participants), np.uint8).reshape(-1, 16),
        group,
        group_slots,
    )
    view.derived[("registrations", group_slots, deployment)] = out
    return out


def round_slot_keys(round_id: int, ids: npt.NDArray[np.uint8]) -> npt.NDArray[np.void]:
    """``round (8 bytes, big endian) ‖ slot id`` of each row of an ``(n, 8)`` id matrix."""
    rnd = np.broadcast_to(np.frombuffer(round_id.to_bytes(8, "big"), np.uint8), (len(ids), 8))
    return np.ascontiguousarray(np.concatenate([rnd, ids], axis=1)).view(f"V{RS_BYTES}").ravel()


def fetch_releases(
    view: ServerView, groups: Registrations | None = None, deployment: str = NEIGHBOURHOOD
) -> tuple[list[tuple[int, bytes, bytes, npt.NDArray[np.int64]]], int]:
    """(round, participant, group ids, C's released share-sum rows) of every answered fetch at C
    (each request paired with the next reply to the same participant), and the number of
    fetch requests left without a reply. A reply has one row per slot group named (``groups``;
    ``None``: every slot its own group), in order of each group's first slot in the request;
    a group's id is its first registered slot. A request naming no slot asks for every slot
    its registrant registered, in order."""
    pending: dict[str, FetchRequest] = {}
    unanswered = 0
    out = []
    registered = accepted_registrations(view, deployment)
    for r in view.records:
        if r.deployment != deployment or r.peer in ROLES or r.elided:
            continue
        if r.kind not in ("FetchRequest", "FetchResponse"):
            continue
        try:
            msg: Message = decode(r.payload)
        except SecureSumError:
            continue
        if r.direction == "in" and isinstance(msg, FetchRequest):
            unanswered += int(r.peer in pending)  # a request superseded before its reply
            pending[r.peer] = msg
        elif r.direction == "out" and isinstance(msg, FetchResponse) and r.peer in pending:
            req = pending.pop(r.peer)
            # a fetch naming no slot asks for every slot its registrant registered, in order
            raw = req.slot_ids or registered.get((req.round_id, req.device_id), b"")
            ids = np.frombuffer(raw, np.uint8).reshape(-1, SLOT_ID_BYTES)
            named = round_slot_keys(req.round_id, ids)
            if groups is not None:
                named = groups.group_of(named)
            _, first = np.unique(named, return_index=True)
            group_ids = (
                ids[np.sort(first)]
                if groups is None
                else (named[np.sort(first)].view(np.uint8).reshape(-1, RS_BYTES)[:, 8:])
            )
            rows = np.frombuffer(msg.share_sum_c, dtype="<i8").astype(np.int64)
            out.append(
                (req.round_id, req.device_id, group_ids.tobytes(), rows.reshape(len(group_ids), -1))
            )
    return out, unanswered + len(pending)
