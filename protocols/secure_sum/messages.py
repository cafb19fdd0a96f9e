"""Wire messages: frozen dataclasses with an explicit binary layout.

Every message is ``b"DS" ‖ version (u8) ‖ type (u8) ‖ fields`` with big-endian integers;
``bytes`` fields are u32-length-prefixed, ``str`` fields u16-length-prefixed UTF-8, and
``list[bytes]`` fields a u32 count followed by length-prefixed items. The same classes travel
over the in-memory transport and over any later transport (gRPC carries the bytes).

Counts are per *participant*: a participant (one 16-byte id) hosts ``m ≥ 1`` devices and its
post carries ``m × items_per_device`` items; a fetch names ``n ≥ 1`` of its registered slots.
Version 2 (this one) introduced both, with the slot-list-bound fetch proof; version 1 peers are
refused at the header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, TypeVar

from .errors import MessageError

MAGIC = b"DS"
WIRE_VERSION = 2
_INT = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q"}
#: most bytes (or list items) in one field: a large pool's post or fetch reply is one field, and
#: no transport carries a message above 2 GiB − 1 (protobuf's ceiling). A declared length is
#: checked against the bytes actually present before anything is copied, so this bounds work,
#: not allocation.
MAX_FIELD = (1 << 31) - 1

M = TypeVar("M", bound="Message")
_REGISTRY: dict[int, type[Message]] = {}
_LAYOUTS: dict[type, list[tuple[str, str]]] = {}


def _layout(cls: type[Message]) -> list[tuple[str, str]]:
    """(field name, wire kind) pairs of a message class, computed once."""
    out = _LAYOUTS.get(cls)
    if out is None:
        out = [(f.name, k) for f, k in zip(fields(cls), cls.LAYOUT, strict=True)]
        _LAYOUTS[cls] = out
    return out


class _Reader:
    def __init__(self, raw: bytes) -> None:
        self.raw = memoryview(raw)
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n > MAX_FIELD:
            raise MessageError(f"field {what} declares {n} bytes, above the {MAX_FIELD}-byte limit")
        if self.pos + n > len(self.raw):
            raise MessageError(f"message truncated while reading {what} ({n} bytes)")
        out = bytes(self.raw[self.pos : self.pos + n])
        self.pos += n
        return out

    def int(self, kind: str, what: str) -> int:
        fmt = _INT[kind]
        return int(struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0])


@dataclass(frozen=True)
class Message:
    """Base class: subclasses set ``TYPE`` and ``LAYOUT`` (field name → wire kind)."""

    TYPE: ClassVar[int] = 0
    LAYOUT: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE in _REGISTRY:
            raise TypeError(f"message type {cls.TYPE} defined twice")
        _REGISTRY[cls.TYPE] = cls

    def to_bytes(self) -> bytes:
        """Serialize to the binary layout."""
        out = [MAGIC, bytes([WIRE_VERSION, self.TYPE])]
        for name, kind in _layout(type(self)):
            v = getattr(self, name)
            if kind in _INT:
                out.append(struct.pack(_INT[kind], v))
            elif kind == "bytes":
                out += [struct.pack(">I", len(v)), v]
            elif kind == "str":
                b = v.encode()
                out += [struct.pack(">H", len(b)), b]
            elif kind == "blist":
                out.append(struct.pack(">I", len(v)))
                for item in v:
                    out += [struct.pack(">I", len(item)), item]
        return b"".join(out)

    @classmethod
    def from_bytes(cls: type[M], raw: bytes) -> M:
        """Parse bytes of exactly this message type.

        Raises:
            MessageError: wrong magic/version/type, truncation or trailing bytes.
        """
        msg = decode(raw)
        if not isinstance(msg, cls):
            raise MessageError(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg


def decode(raw: bytes) -> Message:
    """Parse any registered message.

    Raises:
        MessageError: wrong magic/version, unknown type, truncation or trailing bytes.
    """
    if len(raw) < 4 or raw[:2] != MAGIC:
        raise MessageError("not a decentsim secure-sum message (bad magic)")
    if raw[2] != WIRE_VERSION:
        raise MessageError(f"unsupported wire version {raw[2]} (expected {WIRE_VERSION})")
    cls = _REGISTRY.get(raw[3])
    if cls is None:
        raise MessageError(f"unknown message type {raw[3]}")
    r = _Reader(raw)
    r.pos = 4
    values: list[object] = []
    for name, kind in _layout(cls):
        if kind in _INT:
            values.append(r.int(kind, name))
        elif kind == "bytes":
            values.append(r.take(r.int("u32", name), name))
        elif kind == "str":
            try:
                values.append(r.take(r.int("u16", name), name).decode())
            except UnicodeDecodeError as err:
                raise MessageError(f"field {name} is not UTF-8") from err
        else:
            n = r.int("u32", name)
            if n > MAX_FIELD:
                raise MessageError(f"field {name}: list of {n} items is too long")
            values.append(tuple(r.take(r.int("u32", name), name) for _ in range(n)))
    if r.pos != len(raw):
        raise MessageError(f"{len(raw) - r.pos} trailing bytes after {cls.__name__}")
    return cls(*values)


# -- device → coordinator --------------------------------------------------------------------
@dataclass(frozen=True)
class RegisterRequest(Message):
    """Register a participant's pseudonym slots (all its devices' beacons, once per round).

    ``sealed_for_a`` carries the fetch secret to A. Resending the identical request is answered
    with the stored reply; a different one from the same participant in the round is refused.
    """

    TYPE: ClassVar[int] = 1
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "u64", "bytes", "bytes")
    device_id: bytes
    round_id: int
    slot_ids: bytes  # concatenated 8-byte ids
    sealed_for_a: bytes


@dataclass(frozen=True)
class RegisterResponse(Message):
    """A's acknowledgement, boxed under the device's fetch secret (C cannot forge it)."""

    TYPE: ClassVar[int] = 2
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes",)
    ack_from_a: bytes


@dataclass(frozen=True)
class DirectoryRequest(Message):
    """Ask for the round's registered pseudonym slots (the pool for dummy items)."""

    TYPE: ClassVar[int] = 3
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64",)
    round_id: int


@dataclass(frozen=True)
class DirectoryResponse(Message):
    """The registered pseudonym slots of a round (registration closed)."""

    TYPE: ClassVar[int] = 4
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes",)
    slot_ids: bytes


@dataclass(frozen=True)
class MailboxPost(Message):
    """Mailbox/plaintext post: slots and C-shares in the clear (to C), the A-share's seed sealed.

    ``slot_ids`` holds ``n = m × items_per_device`` ids (``m`` = devices the participant hosts),
    ``share_c`` ``n × dim`` int64 words masked by one PRG stream. In plaintext mode ``share_c``
    holds the raw encoded values and ``sealed_for_a`` is empty.
    """

    TYPE: ClassVar[int] = 5
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "u64", "str", "u32", "bytes", "bytes", "bytes")
    device_id: bytes
    round_id: int
    phase: str
    dim: int
    slot_ids: bytes
    share_c: bytes  # items × dim little-endian int64
    sealed_for_a: bytes


@dataclass(frozen=True)
class ShuffledPost(Message):
    """Shuffled post: the C-bound items inside one envelope to A, the A-bound items sealed.

    ``n = m × items_per_device`` items: ``outer_for_a`` seals the ``n`` C-items, ``items_for_a``
    lists the ``n`` A-items.
    """

    TYPE: ClassVar[int] = 6
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "u64", "str", "bytes", "blist")
    device_id: bytes
    round_id: int
    phase: str
    outer_for_a: bytes
    items_for_a: tuple[bytes, ...]


@dataclass(frozen=True)
class PostReceipt(Message):
    """C accepted a post (``fresh`` = 0 for an identical replay)."""

    TYPE: ClassVar[int] = 7
    LAYOUT: ClassVar[tuple[str, ...]] = ("u8",)
    fresh: int


@dataclass(frozen=True)
class FetchRequest(Message):
    """Fetch the sums of ``n`` of the participant's registered slots in one phase.

    ``slot_ids`` is ``n × 8`` bytes (``1 ≤ n ≤ MAX_SLOTS_PER_FETCH``); ``sealed_for_a`` carries
    the proof of the fetch secret, bound to the whole list. One fetch per (participant, round,
    phase): the identical request is answered again, any other is refused.
    """

    TYPE: ClassVar[int] = 8
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "u64", "str", "bytes", "bytes")
    device_id: bytes
    round_id: int
    phase: str
    slot_ids: bytes  # concatenated 8-byte ids
    sealed_for_a: bytes


@dataclass(frozen=True)
class FetchResponse(Message):
    """C's share sums in the clear (to the registrant) and A's boxed under the fetch secret.

    ``share_sum_c`` is ``n × dim`` little-endian int64 (slots in request order); the box holds
    A's ``n × dim`` sums in the same layout.
    """

    TYPE: ClassVar[int] = 9
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "bytes")
    share_sum_c: bytes
    box_from_a: bytes


# -- coordinator ↔ aggregator ----------------------------------------------------------------
@dataclass(frozen=True)
class OpenRound(Message):
    """C tells A which round spec to open (A checks it against its own copy)."""

    TYPE: ClassVar[int] = 20
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "bytes")
    round_id: int
    spec_digest: bytes


@dataclass(frozen=True)
class RelayRegister(Message):
    """A device's registration relayed to A."""

    TYPE: ClassVar[int] = 21
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "u64", "bytes", "bytes")
    device_id: bytes
    round_id: int
    slot_ids: bytes
    sealed_for_a: bytes


@dataclass(frozen=True)
class CloseRegistration(Message):
    """Registration for a round is over; A freezes its slot table."""

    TYPE: ClassVar[int] = 22
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "bytes")
    round_id: int
    directory_digest: bytes


@dataclass(frozen=True)
class RelayMailbox(Message):
    """All A-parts of a mailbox/plaintext phase, one entry per participant post (lengths vary)."""

    TYPE: ClassVar[int] = 23
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "str", "blist", "blist", "blist")
    round_id: int
    phase: str
    device_ids: tuple[bytes, ...]
    slot_ids: tuple[bytes, ...]
    sealed_for_a: tuple[bytes, ...]


@dataclass(frozen=True)
class RelayShuffled(Message):
    """Shuffled phase, C → A: outer envelopes by device, and all A-items shuffled by C."""

    TYPE: ClassVar[int] = 24
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "str", "blist", "blist", "blist")
    round_id: int
    phase: str
    device_ids: tuple[bytes, ...]
    outers: tuple[bytes, ...]
    items_for_a: tuple[bytes, ...]


@dataclass(frozen=True)
class ShuffledForC(Message):
    """Shuffled phase, A → C: every C-item shuffled by A, and A's receipt for its A-items."""

    TYPE: ClassVar[int] = 25
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "str", "blist", "u32", "u32", "u32")
    round_id: int
    phase: str
    items_for_c: tuple[bytes, ...]
    accepted: int
    replayed: int
    rejected: int


@dataclass(frozen=True)
class RelayReceipt(Message):
    """How many units A accepted, ignored as replays, and rejected."""

    TYPE: ClassVar[int] = 26
    LAYOUT: ClassVar[tuple[str, ...]] = ("u32", "u32", "u32")
    accepted: int
    replayed: int
    rejected: int


@dataclass(frozen=True)
class KeySetOffer(Message):
    """Close a phase and compare key-set digests."""

    TYPE: ClassVar[int] = 27
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "str", "bytes")
    round_id: int
    phase: str
    digest: bytes


@dataclass(frozen=True)
class KeySetReply(Message):
    """A's digest, and its sorted keys when the digests differ (else empty)."""

    TYPE: ClassVar[int] = 28
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "bytes")
    digest: bytes
    keys: bytes


@dataclass(frozen=True)
class SurvivingSet(Message):
    """C's proposal: the surviving keys (empty = "your whole set", sent when digests match)."""

    TYPE: ClassVar[int] = 29
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "str", "bytes", "bytes")
    round_id: int
    phase: str
    keys: bytes
    digest: bytes


@dataclass(frozen=True)
class Agreed(Message):
    """A's digest of the surviving set it fixed."""

    TYPE: ClassVar[int] = 30
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes",)
    digest: bytes


@dataclass(frozen=True)
class AggregateRequest(Message):
    """C asks for A's share sums of an agreed aggregate phase."""

    TYPE: ClassVar[int] = 31
    LAYOUT: ClassVar[tuple[str, ...]] = ("u64", "str")
    round_id: int
    phase: str


@dataclass(frozen=True)
class AggregateShares(Message):
    """A's per-slot share sums (slots in declaration order) and summand counts."""

    TYPE: ClassVar[int] = 32
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "bytes")
    sums: bytes
    counts: bytes


@dataclass(frozen=True)
class RelayFetch(Message):
    """A participant's fetch relayed to A (the same fields as its :class:`FetchRequest`)."""

    TYPE: ClassVar[int] = 33
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes", "u64", "str", "bytes", "bytes")
    device_id: bytes
    round_id: int
    phase: str
    slot_ids: bytes  # concatenated 8-byte ids
    sealed_for_a: bytes


@dataclass(frozen=True)
class FetchReply(Message):
    """A's ``n × dim`` share sums boxed under the registrant's fetch secret."""

    TYPE: ClassVar[int] = 34
    LAYOUT: ClassVar[tuple[str, ...]] = ("bytes",)
    box: bytes


@dataclass(frozen=True)
class ErrorReply(Message):
    """A refusal, carrying the exception class name and message across the link."""

    TYPE: ClassVar[int] = 40
    LAYOUT: ClassVar[tuple[str, ...]] = ("str", "str")
    error: str
    detail: str
