"""Sealed server transcripts: every byte a server received and sent, readable only by the auditor.

A server started with ``--audit-key PATH`` (an X25519 public key of the auditor) records each
protocol message it receives or sends in ``<state-dir>/views/<role>.transcript``. A record holds
an individual's shares, so it is never stored in plaintext: each one is sealed to the auditor's
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

The sequence number (0, 1, 2, … over the whole file, continued after a restart) is bound as
AAD, so a record moved, dropped from the middle or copied between roles fails to open. A
record cut short by a crash (the file's tail) is dropped when the server reopens the file.
``peer`` is a participant id in hex, ``"coordinator"`` or ``"aggregator"``.

Auditor keys (:func:`create_auditor_keys`): ``auditor.key`` (the 32-byte private key in hex,
``0600``) and ``auditor.pub`` (the public key in hex). Only the public key is given to servers.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from identity.secret_files import write_secret
from protocols.secure_sum.envelope import KeyPair, open_envelope, seal
from protocols.secure_sum.errors import EnvelopeError, MessageError
from protocols.secure_sum.messages import decode

MAGIC = b"DSAUDTR1"
RECORD_VERSION = 1
INFO = b"decentsim/v1/audit-transcript"
KEY_BYTES = 32
#: largest record accepted when reading (a record holds one protocol message)
MAX_RECORD_BYTES = 1 << 31
DIRECTIONS = ("in", "out")


class TranscriptError(Exception):
    """A transcript or auditor key file is unusable; the message names the file and why."""


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
    payload: bytes


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


def encode_record(direction: str, t: float, deployment: str, peer: str, payload: bytes) -> bytes:
    """The plaintext of a record (see the module docstring)."""
    if direction not in DIRECTIONS:
        raise TranscriptError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    kind, round_id = describe(payload)
    return b"".join(
        (
            bytes([RECORD_VERSION, DIRECTIONS.index(direction)]),
            struct.pack(">d", t),
            _s16(deployment),
            _s16(peer),
            _s16(kind),
            struct.pack(">QI", round_id, len(payload)),
            payload,
        )
    )


def decode_record(seq: int, plain: bytes) -> TranscriptRecord:
    """Parse a record's plaintext.

    Raises:
        TranscriptError: a malformed record (names the sequence number).
    """
    try:
        if plain[0] != RECORD_VERSION or plain[1] > 1:
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
    except (IndexError, struct.error, UnicodeDecodeError) as e:
        raise TranscriptError(f"record {seq}: malformed ({type(e).__name__}: {e})") from None
    return TranscriptRecord(
        seq, DIRECTIONS[plain[1]], t, texts[0], texts[1], texts[2], round_id, payload
    )


def _header(role: str, public: bytes) -> bytes:
    return MAGIC + _s16(role) + public


def _scan(path: Path) -> tuple[str, bytes, int, int]:
    """(role, auditor public key, whole records, byte offset after the last whole record)."""
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 2:
        raise TranscriptError(f"{path}: not an audit transcript (bad magic)")
    (n,) = struct.unpack_from(">H", data, len(MAGIC))
    start = len(MAGIC) + 2
    role = data[start : start + n].decode(errors="replace")
    public = data[start + n : start + n + KEY_BYTES]
    if len(public) != KEY_BYTES:
        raise TranscriptError(f"{path}: truncated header")
    pos, count = start + n + KEY_BYTES, 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        if pos + 4 + size > len(data):
            break
        pos += 4 + size
        count += 1
    return role, public, count, pos


class TranscriptWriter:
    """Appends sealed records to a server's transcript (thread-safe).

    Args:
        path: the transcript file (created with its parent, ``0600``; an existing one is
            continued, after dropping a record cut short by a crash).
        role: ``"coordinator"`` or ``"aggregator"`` (bound into every record).
        auditor_public: the auditor's 32-byte X25519 public key.
    """

    def __init__(self, path: Path, role: str, auditor_public: bytes) -> None:
        if len(auditor_public) != KEY_BYTES:
            raise TranscriptError(
                f"auditor public key must be {KEY_BYTES} bytes, got {len(auditor_public)}"
            )
        self.path, self.role, self._public = path, role, auditor_public
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        if path.exists() and path.stat().st_size:
            old_role, old_public, self._seq, end = _scan(path)
            if old_role != role or old_public != auditor_public:
                raise TranscriptError(
                    f"{path}: transcript of role {old_role!r} for another auditor key; "
                    "move it away before recording with this key"
                )
            os.truncate(path, end)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
            os.write(fd, _header(role, auditor_public))
        self._file = os.fdopen(fd, "ab")
        self._lock = threading.Lock()

    def record(self, direction: str, deployment: str, peer: str, payload: bytes) -> None:
        """Seal and append one message (``direction`` is ``"in"`` or ``"out"``)."""
        plain = encode_record(direction, time.time(), deployment, peer, payload)
        with self._lock:
            env = seal(self._public, plain, INFO, _aad(self.role, self._seq))
            self._file.write(struct.pack(">I", len(env)) + env)
            self._file.flush()
            self._seq += 1

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._file.close()


def read_transcript(path: Path, auditor: KeyPair) -> tuple[str, list[TranscriptRecord]]:
    """(role, records) of a transcript, opened with the auditor's key pair.

    Raises:
        TranscriptError: wrong file, another auditor's key, or a record that fails to open
            (tampered, reordered or dropped), naming the sequence number.
    """
    role, public, count, _ = _scan(path)
    if public != auditor.public:
        raise TranscriptError(f"{path}: sealed to another auditor key (key id mismatch)")
    return role, list(_records(path, role, auditor, count))


def _records(path: Path, role: str, auditor: KeyPair, count: int) -> Iterator[TranscriptRecord]:
    data = path.read_bytes()
    (n,) = struct.unpack_from(">H", data, len(MAGIC))
    pos = len(MAGIC) + 2 + n + KEY_BYTES
    for seq in range(count):
        (size,) = struct.unpack_from(">I", data, pos)
        env = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
        try:
            plain = open_envelope(auditor, env, INFO, _aad(role, seq))
        except EnvelopeError as e:
            raise TranscriptError(
                f"{path}: record {seq} does not open ({type(e).__name__}): tampered, "
                "reordered or dropped records"
            ) from None
        yield decode_record(seq, plain)


def create_auditor_keys(directory: Path) -> tuple[Path, Path]:
    """A fresh auditor key pair in ``directory``: (``auditor.key`` 0600, ``auditor.pub``)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    pair = KeyPair.generate()
    private = directory / "auditor.key"
    write_secret(private, (pair.private.private_bytes_raw().hex() + "\n").encode())
    public = directory / "auditor.pub"
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
    """The auditor's public key from ``auditor.pub`` (hex).

    Raises:
        TranscriptError: missing, not hex, or not 32 bytes.
    """
    return _hex_key(path, "auditor public key")


def load_auditor_keypair(path: Path) -> KeyPair:
    """The auditor's key pair from ``auditor.key`` (hex; must be ``0600``).

    Raises:
        TranscriptError: missing, readable by others, not hex, or not 32 bytes.
    """
    if path.exists() and path.stat().st_mode & 0o077:
        raise TranscriptError(f"{path}: auditor private key is readable by group/others")
    return KeyPair.from_private_bytes(_hex_key(path, "auditor private key"))
