"""Sealed server transcripts: every byte a server received and sent, readable only by its auditor.

A server started with ``--audit-key PATH`` (the X25519 public key of its auditor) records each
protocol message it receives or sends in ``<state-dir>/views/<role>.transcript``. A record holds
an individual's shares, so it is never stored in plaintext: each one is sealed to its auditor's
key with the project's envelope (X25519 ephemeral + HKDF-SHA256 + ChaCha20-Poly1305, a fresh
ephemeral key per record). The server itself cannot read its transcript back.

File format (all integers big-endian)::

    file    = header record*
    header  = "DSAUDTR1" (8 bytes) ‖ u16 len ‖ role (UTF-8) ‖ auditor public key (32 bytes)
    record  = u32 len ‖ envelope                         (len = bytes of the envelope)
    envelope = seal(auditor key, plaintext, info = "decentsim/v1/audit-transcript",
                    aad = u16 len ‖ role ‖ u64 sequence number)
    plaintext = u8 version (1) ‖ u8 direction (0 = in, 1 = out) ‖ f64 unix time ‖
                u16 len ‖ deployment ‖ u16 len ‖ peer ‖ u16 len ‖ message type ‖
                u64 round (0: none) ‖ u32 len ‖ payload (the raw protocol message)

An *elided* record (version 2) has the same layout, but its payload is ``SHA-256(message) ‖ u64
length`` instead of the message: the server records so a message that the rest of its own
transcript determines (:data:`contract.views.ELIDED`: the slot directory it serves, which is its
registrations in order; a relay to the other server, which copies a request it recorded), and
the audit rebuilds each one from the records it derives from and checks the digest.

The sequence number (0, 1, 2, … over the whole file, continued after a restart) is bound as
AAD, so a record moved, dropped from the middle or copied between roles fails to open. A
record cut short by a crash (the file's tail) is dropped when the server reopens the file.
``peer`` is a participant id in hex, ``"coordinator"`` or ``"aggregator"``.

Auditor keys (:func:`create_auditor_keys`): each server has its own auditor, whose key pair is
``<role>-auditor.key`` (the 32-byte private key in hex, ``0600``) and ``<role>-auditor.pub``
(the public key in hex). A server is given only its own auditor's public key, so the auditor of
one server can open that server's transcript and no other: one key opening both would be the
coordinator + aggregator collusion the threat model excludes.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from identity.secret_files import write_secret
from protocols.secure_sum.envelope import KeyPair, key_id, open_envelope, seal
from protocols.secure_sum.errors import EnvelopeError, MessageError
from protocols.secure_sum.messages import decode

MAGIC = b"DSAUDTR1"
RECORD_VERSION = 1
#: version of a record whose payload is only the message's digest and length (see above)
ELIDED_VERSION = 2
INFO = b"decentsim/v1/audit-transcript"
KEY_BYTES = 32
DIRECTIONS = ("in", "out")


class TranscriptError(Exception):
    """A transcript or auditor key file is unusable; the message names the file and why."""


class TranscriptIntegrityError(TranscriptError):
    """A record of a transcript fails to authenticate or to parse (tampered, reordered or
    dropped records, or a broken writer): the evidence itself is bad, not the key or path."""


@dataclass(frozen=True)
class SealedPayload:
    """Where a large record's payload rests in its transcript: opened again on each read, so an
    audit of gigabytes of posts holds one post at a time, never the file."""

    path: Path
    offset: int
    size: int
    seq: int
    role: str
    auditor: KeyPair

    def open(self) -> bytes:
        """The payload, read and authenticated again.

        Raises:
            TranscriptIntegrityError: the file changed since it was first read.
        """
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            envelope = fh.read(self.size)
        try:
            plain = open_envelope(self.auditor, envelope, INFO, _aad(self.role, self.seq))
        except EnvelopeError:
            raise TranscriptIntegrityError(
                f"{self.path}: record {self.seq} no longer opens: the file changed while it was "
                "audited"
            ) from None
        return _payload_of(self.seq, plain)


@dataclass(frozen=True)
class TranscriptRecord:
    """One message a server received (``in``) or sent (``out``)."""

    seq: int
    direction: str
    time: float
    deployment: str
    peer: str
    kind: str
    round_id: int
    #: the payload, or (a record larger than ``read_transcript``'s ``keep_bytes``) where to
    #: open it again
    stored: bytes | SealedPayload
    #: the payload is ``SHA-256(message) ‖ u64 length`` of a message the transcript determines
    elided: bool = False

    @property
    def payload(self) -> bytes:
        """The raw protocol message (or an elided record's digest and length)."""
        if isinstance(self.stored, bytes):
            return self.stored
        return self.stored.open()

    def elided_digest(self) -> tuple[bytes, int]:
        """(SHA-256, length) of the message an elided record stands for."""
        return self.payload[:32], struct.unpack(">Q", self.payload[32:40])[0]


def _s16(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _aad(role: str, seq: int) -> bytes:
    return _s16(role) + struct.pack(">Q", seq)


def describe(payload: bytes) -> tuple[str, int]:
    """(message type name, round id or 0) of a raw protocol message (``"?"`` if undecodable)."""
    try:
        msg = decode(payload)
    except MessageError:
        return "?", 0
    return type(msg).__name__, int(getattr(msg, "round_id", 0))


def encode_record(
    direction: str,
    t: float,
    deployment: str,
    peer: str,
    payload: bytes,
    elide: frozenset[str] = frozenset(),
) -> bytes:
    """The plaintext of a record (see the module docstring); a message whose type is in
    ``elide`` is recorded as its digest and length."""
    if direction not in DIRECTIONS:
        raise TranscriptError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    kind, round_id = describe(payload)
    version = RECORD_VERSION
    if kind in elide:
        version = ELIDED_VERSION
        payload = hashlib.sha256(payload).digest() + struct.pack(">Q", len(payload))
    return b"".join(
        (
            bytes([version, DIRECTIONS.index(direction)]),
            struct.pack(">d", t),
            _s16(deployment),
            _s16(peer),
            _s16(kind),
            struct.pack(">QI", round_id, len(payload)),
            payload,
        )
    )


def _payload_of(seq: int, plain: bytes) -> bytes:
    return decode_record(seq, plain).payload


def decode_record(
    seq: int, plain: bytes, sealed: SealedPayload | None = None, keep_bytes: int | None = None
) -> TranscriptRecord:
    """Parse a record's plaintext. A payload longer than ``keep_bytes`` is not kept: the record
    holds ``sealed`` (where to open it again) instead.

    Raises:
        TranscriptError: a malformed record (names the sequence number).
    """
    try:
        if plain[0] not in (RECORD_VERSION, ELIDED_VERSION) or plain[1] > 1:
            raise TranscriptError(f"record {seq}: unknown version {plain[0]} or direction")
        pos = 2
        (t,) = struct.unpack_from(">d", plain, pos)
        pos += 8
        texts = []
        for _ in range(3):
            (n,) = struct.unpack_from(">H", plain, pos)
            texts.append(plain[pos + 2 : pos + 2 + n].decode())
            pos += 2 + n
        round_id, n = struct.unpack_from(">QI", plain, pos)
        pos += 12
        payload = plain[pos : pos + n]
        if len(payload) != n or pos + n != len(plain):
            raise TranscriptError(f"record {seq}: payload length {n} disagrees with the record")
        if plain[0] == ELIDED_VERSION and n != 40:
            raise TranscriptError(f"record {seq}: an elided record holds 40 bytes, not {n}")
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise TranscriptError(f"record {seq}: malformed ({type(e).__name__}: {e})") from None
    return TranscriptRecord(
        seq,
        DIRECTIONS[plain[1]],
        t,
        texts[0],
        texts[1],
        texts[2],
        round_id,
        sealed if sealed is not None and keep_bytes is not None and n > keep_bytes else payload,
        plain[0] == ELIDED_VERSION,
    )


def _header(role: str, public: bytes) -> bytes:
    return MAGIC + _s16(role) + public


def _parse_header(data: bytes, path: Path) -> tuple[str, bytes, int]:
    """(role, auditor public key, offset of the first record) of a transcript's leading bytes."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 2:
        raise TranscriptError(f"{path}: not an audit transcript (bad magic)")
    (n,) = struct.unpack_from(">H", data, len(MAGIC))
    start = len(MAGIC) + 2
    role = data[start : start + n].decode(errors="replace")
    public = data[start + n : start + n + KEY_BYTES]
    if len(public) != KEY_BYTES:
        raise TranscriptError(f"{path}: truncated header")
    return role, public, start + n + KEY_BYTES


def _envelopes(fh: BinaryIO, start: int) -> Iterator[tuple[bytes, int]]:
    """Each whole record's envelope from byte ``start`` of an open transcript, with the offset
    just after it; streamed, and stopping before a record cut short by a crash."""
    fh.seek(start)
    end = start
    while len(head := fh.read(4)) == 4:
        (size,) = struct.unpack(">I", head)
        envelope = fh.read(size)
        if len(envelope) < size:
            return
        end += 4 + size
        yield envelope, end


def read_header(path: Path) -> tuple[str, bytes]:
    """(role, auditor public key) a transcript is recorded for; reads only the header.

    Raises:
        TranscriptError: missing, or not a transcript.
    """
    try:
        with path.open("rb") as fh:
            head = fh.read(len(MAGIC) + 2 + (1 << 16) + KEY_BYTES)
    except FileNotFoundError:
        raise TranscriptError(f"{path}: transcript not found") from None
    role, public, _ = _parse_header(head, path)
    return role, public


def fingerprint(public: bytes) -> str:
    """A public key's short id (hex of its 8-byte key id), to name keys in messages."""
    return key_id(public).hex()


class TranscriptWriter:
    """Appends sealed records to a server's transcript (thread-safe).

    Args:
        path: the transcript file (created with its parent, ``0600``; an existing one is
            continued, after dropping a record cut short by a crash).
        role: ``"coordinator"`` or ``"aggregator"`` (bound into every record).
        auditor_public: the auditor's 32-byte X25519 public key.
        elide: message types recorded as their digest (the transcript determines them).
    """

    def __init__(
        self, path: Path, role: str, auditor_public: bytes, elide: frozenset[str] = frozenset()
    ) -> None:
        if len(auditor_public) != KEY_BYTES:
            raise TranscriptError(
                f"auditor public key must be {KEY_BYTES} bytes, got {len(auditor_public)}"
            )
        self.path, self.role, self._public = path, role, auditor_public
        self.elide = elide
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        if path.exists() and path.stat().st_size:
            old_role, old_public = read_header(path)
            if old_role != role or old_public != auditor_public:
                raise TranscriptError(
                    f"{path}: transcript of role {old_role!r} for another auditor key; "
                    "move it away before recording with this key"
                )
            end = len(_header(role, auditor_public))
            with path.open("rb") as fh:
                for _, after in _envelopes(fh, end):
                    self._seq, end = self._seq + 1, after
            os.truncate(path, end)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.write(fd, _header(role, auditor_public))
        self._file = os.fdopen(fd, "ab")
        self._lock = threading.Lock()

    def record(self, direction: str, deployment: str, peer: str, payload: bytes) -> None:
        """Seal and append one message (``direction`` is ``"in"`` or ``"out"``)."""
        plain = encode_record(direction, time.time(), deployment, peer, payload, self.elide)
        with self._lock:
            env = seal(self._public, plain, INFO, _aad(self.role, self._seq))
            self._file.write(struct.pack(">I", len(env)) + env)
            self._file.flush()
            self._seq += 1

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()


@dataclass(frozen=True)
class Transcript:
    """A transcript opened by its auditor.

    Attributes:
        role: the server it was recorded by.
        records: every whole record, in order.
        tail_bytes: bytes after the last whole record (a record cut short by a crash; the
            server drops them when it reopens the file), not used.
    """

    role: str
    records: list[TranscriptRecord]
    tail_bytes: int = 0


#: records with a larger payload are read again when used (see :class:`SealedPayload`)
KEEP_BYTES = 1 << 20


def read_transcript(path: Path, auditor: KeyPair, keep_bytes: int = KEEP_BYTES) -> Transcript:
    """A transcript, opened with its auditor's key pair (the file is streamed once: memory
    holds the opened records, not the file). A payload over ``keep_bytes`` (a pool's post, up to
    tens of megabytes in dense mode) is authenticated now and opened again on each use.

    Raises:
        TranscriptError: wrong file, or sealed to another auditor's key (both keys named by
            fingerprint).
        TranscriptIntegrityError: a record fails to open (tampered, reordered or dropped) or to
            parse, naming its sequence number.
    """
    role, public = read_header(path)
    if public != auditor.public:
        raise TranscriptError(
            f"{path}: the {role}'s transcript is sealed to auditor key {fingerprint(public)}, "
            f"not to this key ({fingerprint(auditor.public)}): only the {role}'s own auditor "
            "opens it"
        )
    records = []
    end = len(_header(role, public))
    with path.open("rb") as fh:
        for seq, (envelope, after) in enumerate(_envelopes(fh, end)):
            sealed = SealedPayload(path, after - len(envelope), len(envelope), seq, role, auditor)
            end = after
            try:
                plain = open_envelope(auditor, envelope, INFO, _aad(role, seq))
            except EnvelopeError as e:
                raise TranscriptIntegrityError(
                    f"{path}: record {seq} does not open ({type(e).__name__}): tampered, "
                    "reordered or dropped records"
                ) from None
            try:
                records.append(decode_record(seq, plain, sealed, keep_bytes))
            except TranscriptError as e:
                raise TranscriptIntegrityError(f"{path}: {e}") from None
        tail = fh.seek(0, os.SEEK_END) - end  # a record cut short by a crash
    return Transcript(role, records, tail)


def auditor_files(directory: Path, role: str) -> tuple[Path, Path]:
    """(private, public) key files of ``role``'s auditor in ``directory``:
    ``<role>-auditor.key`` and ``<role>-auditor.pub``."""
    return directory / f"{role}-auditor.key", directory / f"{role}-auditor.pub"


def create_auditor_keys(directory: Path, role: str) -> tuple[Path, Path]:
    """A fresh key pair for ``role``'s auditor in ``directory``: (``<role>-auditor.key`` 0600,
    ``<role>-auditor.pub``). Give the server only the public file."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pair = KeyPair.generate()
    private, public = auditor_files(directory, role)
    write_secret(private, (pair.private.private_bytes_raw().hex() + "\n").encode())
    public.write_text(pair.public.hex() + "\n")
    return private, public


def _hex_key(path: Path, what: str) -> bytes:
    try:
        raw = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        raise TranscriptError(f"{path}: {what} not found") from None
    except ValueError:
        raise TranscriptError(f"{path}: {what} is not hex") from None
    if len(raw) != KEY_BYTES:
        raise TranscriptError(f"{path}: {what} must be {KEY_BYTES} bytes, got {len(raw)}")
    return raw


def load_auditor_public(path: Path) -> bytes:
    """An auditor's public key from ``<role>-auditor.pub`` (hex).

    Raises:
        TranscriptError: missing, not hex, or not 32 bytes.
    """
    return _hex_key(path, "auditor public key")


def load_auditor_keypair(path: Path) -> KeyPair:
    """An auditor's key pair from ``<role>-auditor.key`` (hex; must be ``0600``).

    Raises:
        TranscriptError: missing, readable by others, not hex, or not 32 bytes.
    """
    if path.exists() and path.stat().st_mode & 0o077:
        raise TranscriptError(f"{path}: auditor private key is readable by group/others")
    return KeyPair.from_private_bytes(_hex_key(path, "auditor private key"))
