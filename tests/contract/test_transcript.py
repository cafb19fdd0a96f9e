"""The sealed transcript: round trip, every way a record can be tampered with is refused, and
each server's auditor has a key of its own that opens no other server's transcript."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from contract.transcript import (
    MAGIC,
    SealedPayload,
    TranscriptError,
    TranscriptIntegrityError,
    TranscriptWriter,
    auditor_files,
    create_auditor_keys,
    decode_record,
    encode_record,
    fingerprint,
    load_auditor_keypair,
    load_auditor_public,
    read_header,
    read_transcript,
)
from protocols.secure_sum.messages import DirectoryRequest, DirectoryResponse


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return create_auditor_keys(tmp_path / "audit", "coordinator")


def _write(path: Path, pub: Path, payloads: list[bytes]) -> None:
    w = TranscriptWriter(path, "coordinator", load_auditor_public(pub))
    for i, p in enumerate(payloads):
        w.record("in" if i % 2 == 0 else "out", "neighbourhood", "ab" * 16, p)
    w.close()


def test_round_trip_and_continuation(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    assert priv.stat().st_mode & 0o777 == 0o600
    path = tmp_path / "c.transcript"
    msg = DirectoryRequest(42).to_bytes()
    _write(path, pub, [msg, b"raw bytes"])
    _write(path, pub, [b"after restart"])  # a restarted server continues the sequence
    transcript = read_transcript(path, load_auditor_keypair(priv))
    role, recs = transcript.role, transcript.records
    assert role == "coordinator" and transcript.tail_bytes == 0
    assert read_header(path) == ("coordinator", load_auditor_public(pub))
    assert [r.seq for r in recs] == [0, 1, 2]
    assert [r.payload for r in recs] == [msg, b"raw bytes", b"after restart"]
    assert (recs[0].kind, recs[0].round_id, recs[0].direction) == ("DirectoryRequest", 42, "in")
    assert (recs[1].kind, recs[1].direction, recs[1].peer) == ("?", "out", "ab" * 16)
    # the server cannot read its own transcript: the payload is not in the file
    assert b"raw bytes" not in path.read_bytes()


def test_an_elided_message_is_recorded_as_its_digest(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    path = tmp_path / "c.transcript"
    directory = DirectoryResponse(bytes(range(16)) * 1000).to_bytes()
    w = TranscriptWriter(
        path, "coordinator", load_auditor_public(pub), frozenset({"DirectoryResponse"})
    )
    w.record("in", "neighbourhood", "ab" * 16, DirectoryRequest(3).to_bytes())
    w.record("out", "neighbourhood", "ab" * 16, directory)
    w.close()
    recs = read_transcript(path, load_auditor_keypair(priv)).records
    assert [r.elided for r in recs] == [False, True]
    assert recs[1].kind == "DirectoryResponse" and len(recs[1].payload) == 40
    assert recs[1].elided_digest() == (hashlib.sha256(directory).digest(), len(directory))
    assert path.stat().st_size < 1000  # not the 16 kB message
    # an elided record must hold exactly a digest and a length
    plain = encode_record(
        "out", 0.0, "neighbourhood", "ab" * 16, directory, frozenset({"DirectoryResponse"})
    )
    with pytest.raises(TranscriptError, match="record 9: an elided record holds 40 bytes, not 41"):
        decode_record(9, plain[:-44] + struct.pack(">I", 41) + plain[-40:] + b"x")


def test_large_payloads_are_opened_again_when_read(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """A payload over ``keep_bytes`` (a dense post: megabytes) is not held in memory: the record
    points into the file and opens it again, authenticated, on each read."""
    priv, pub = keys
    path = tmp_path / "c.transcript"
    big = bytes(range(256)) * 64
    _write(path, pub, [b"small", big, b"tail"])
    kp = load_auditor_keypair(priv)
    recs = read_transcript(path, kp, keep_bytes=1024).records
    assert [type(r.stored) for r in recs] == [bytes, SealedPayload, bytes]
    assert [r.payload for r in recs] == [b"small", big, b"tail"]
    assert read_transcript(path, kp).records[1].stored == big  # kept: 16 KiB < 1 MiB default
    # the file changed under the audit: the lazy read refuses it, naming the record
    data = bytearray(path.read_bytes())
    data[recs[1].stored.offset + 100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(TranscriptIntegrityError, match="record 1 no longer opens"):
        _ = recs[1].payload


def test_tampering_reordering_and_wrong_key_are_refused(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    priv, pub = keys
    path = tmp_path / "c.transcript"
    _write(path, pub, [b"first", b"second"])
    data = path.read_bytes()
    kp = load_auditor_keypair(priv)
    flipped = bytearray(data)
    flipped[-1] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(TranscriptIntegrityError, match="record 1 does not open"):
        read_transcript(path, kp)
    # swap the two records: the sequence numbers bound as AAD no longer match
    head = len(MAGIC) + 2 + len(b"coordinator") + 32
    (n0,) = struct.unpack_from(">I", data, head)
    first, second = data[head : head + 4 + n0], data[head + 4 + n0 :]
    path.write_bytes(data[:head] + second + first)
    with pytest.raises(TranscriptIntegrityError, match="record 0 does not open"):
        read_transcript(path, kp)
    # the other server's auditor key does not open it; both keys are named
    other_priv, _ = create_auditor_keys(tmp_path / "audit", "aggregator")
    other = load_auditor_keypair(other_priv)
    path.write_bytes(data)
    with pytest.raises(TranscriptError, match="sealed to auditor key") as e:
        read_transcript(path, other)
    assert fingerprint(kp.public) in str(e.value) and fingerprint(other.public) in str(e.value)
    assert not isinstance(e.value, TranscriptIntegrityError)  # a wrong key, not bad evidence
    # a record cut short by a crash is left out (and counted) by the reader, and dropped when
    # the server reopens the file
    path.write_bytes(data[:-5])
    cut = read_transcript(path, kp)
    assert [r.payload for r in cut.records] == [b"first"] and cut.tail_bytes > 0
    _write(path, pub, [b"third"])
    assert [r.payload for r in read_transcript(path, kp).records] == [b"first", b"third"]


def test_each_server_has_its_own_auditor_key(tmp_path: Path) -> None:
    c_priv, c_pub = create_auditor_keys(tmp_path, "coordinator")
    a_priv, a_pub = create_auditor_keys(tmp_path, "aggregator")
    assert (c_priv, c_pub) == auditor_files(tmp_path, "coordinator")
    assert (c_priv.name, a_pub.name) == ("coordinator-auditor.key", "aggregator-auditor.pub")
    assert load_auditor_public(c_pub) != load_auditor_public(a_pub)
    assert a_priv.stat().st_mode & 0o777 == 0o600


def test_bad_key_files_are_named(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    priv, pub = keys
    priv.chmod(0o644)
    with pytest.raises(TranscriptError, match="readable by group/others"):
        load_auditor_keypair(priv)
    bad = tmp_path / "bad.pub"
    bad.write_text("zz")
    with pytest.raises(TranscriptError, match=r"bad\.pub: auditor public key is not hex"):
        load_auditor_public(bad)
    bad.write_text("00" * 16)
    with pytest.raises(TranscriptError, match="must be 32 bytes, got 16"):
        load_auditor_public(bad)
    with pytest.raises(TranscriptError, match="direction must be one of"):
        TranscriptWriter(tmp_path / "t", "aggregator", load_auditor_public(pub)).record(
            "sideways", "", "", b""
        )
    w = TranscriptWriter(tmp_path / "x.transcript", "aggregator", load_auditor_public(pub))
    w.close()
    with pytest.raises(TranscriptError, match="transcript of role 'aggregator' for another"):
        TranscriptWriter(tmp_path / "x.transcript", "coordinator", load_auditor_public(pub))
