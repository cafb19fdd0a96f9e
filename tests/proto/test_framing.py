"""Fragmenting link payloads (common.Fragment): exact reassembly, and every malformed stream
refused with a specific message and no change to the reassembler."""

from __future__ import annotations

import hashlib
import os

import pytest

from proto.decentsim.v1 import common_pb2
from proto.framing import FramingError, Reassembler, fragments
from proto.limits import LINK_CHUNK_BYTES


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 1000])
def test_fragments_reassemble_exactly(size: int) -> None:
    payload = os.urandom(size)
    parts = list(fragments(payload, 100))
    assert len(parts) == max(1, -(-size // 100))
    assert all(len(d) <= 100 for _, d in parts)
    assert [h.index for h, _ in parts] == list(range(len(parts)))
    assert {(h.count, h.total_bytes, h.sha256) for h, _ in parts} == {
        (len(parts), size, hashlib.sha256(payload).digest())
    }
    asm = Reassembler()
    for h, d in parts:
        assert not asm.complete
        asm.add(h, d)
    assert asm.complete
    assert asm.payload() == payload


def test_default_chunk_is_the_link_chunk() -> None:
    parts = list(fragments(bytes(LINK_CHUNK_BYTES + 1)))
    assert [len(d) for _, d in parts] == [LINK_CHUNK_BYTES, 1]


def _parts(
    payload: bytes = b"abcdefghij", chunk: int = 4
) -> list[tuple[common_pb2.Fragment, bytes]]:
    return list(fragments(payload, chunk))


def _expect_refused(asm: Reassembler, header: common_pb2.Fragment, data: bytes, match: str) -> None:
    before = (asm.complete, list(asm._parts))
    with pytest.raises(FramingError, match=match):
        asm.add(header, data)
    assert (asm.complete, list(asm._parts)) == before


def test_out_of_order_and_duplicate_fragments_are_refused() -> None:
    (h0, d0), (h1, d1), (h2, d2) = _parts()
    asm = Reassembler()
    _expect_refused(asm, h1, d1, r"fragment 1 arrived out of order; expected 0")
    asm.add(h0, d0)
    _expect_refused(asm, h0, d0, r"fragment 0 arrived out of order; expected 1")
    _expect_refused(asm, h2, d2, r"fragment 2 arrived out of order; expected 1")
    asm.add(h1, d1)
    asm.add(h2, d2)
    _expect_refused(asm, h2, d2, r"fragment 2 arrived after the last of 3")
    assert asm.payload() == b"abcdefghij"


def test_inconsistent_headers_are_refused() -> None:
    (h0, d0), (h1, d1), _ = _parts()
    asm = Reassembler()
    asm.add(h0, d0)
    for change in ({"count": 4}, {"total_bytes": 11}, {"sha256": bytes(32)}):
        forged = common_pb2.Fragment()
        forged.CopyFrom(h1)
        for k, v in change.items():
            setattr(forged, k, v)
        _expect_refused(asm, forged, d1, r"fragment 1 disagrees with the first fragment header")


def test_oversized_announcements_and_extra_bytes_are_refused() -> None:
    (h0, d0), (h1, _), _ = _parts()
    _expect_refused(Reassembler(max_bytes=9), h0, d0, r"announces 10 bytes, above the limit of 9")
    asm = Reassembler()
    asm.add(h0, d0)
    _expect_refused(asm, h1, b"x" * 7, r"more than the announced 10 bytes")
    bad = common_pb2.Fragment(index=0, count=0, total_bytes=1, sha256=bytes(32))
    _expect_refused(Reassembler(), bad, b"x", r"fragment count must be >= 1, got 0")
    short = common_pb2.Fragment(index=0, count=1, total_bytes=1, sha256=b"\x00" * 8)
    _expect_refused(Reassembler(), short, b"x", r"fragment digest must be 32 bytes, got 8")


def test_incomplete_short_or_corrupted_payloads_are_refused() -> None:
    (h0, d0), (h1, d1), (h2, d2) = _parts()
    asm = Reassembler()
    with pytest.raises(FramingError, match=r"incomplete: 0 of \? fragments"):
        asm.payload()
    asm.add(h0, d0)
    with pytest.raises(FramingError, match=r"incomplete: 1 of 3 fragments"):
        asm.payload()
    asm.add(h1, d1)
    asm.add(h2, d2[:1])
    with pytest.raises(FramingError, match=r"payload has 9 bytes; 10 announced"):
        asm.payload()
    flipped = Reassembler()
    flipped.add(h0, d0)
    flipped.add(h1, b"XXXX")
    flipped.add(h2, d2)
    with pytest.raises(FramingError, match=r"SHA-256 does not match"):
        flipped.payload()


def test_bad_chunk_size_is_refused() -> None:
    with pytest.raises(FramingError, match=r"chunk size must be >= 1 byte, got 0"):
        list(fragments(b"abc", 0))
