"""Fragmenting and reassembling payloads too large for one gRPC message (``common.Fragment``).

The coordinator ↔ aggregator payloads that grow with the population (a phase's relayed batch,
surviving-set key lists) are single secure-sum messages that may be far above
``LINK_MAX_MESSAGE_BYTES``. The sender cuts one into ``LINK_CHUNK_BYTES`` fragments, each
carrying the payload's length and SHA-256; the receiver accepts them only in order, with
consistent headers, up to a byte budget, and checks length and digest before handing the bytes
to the secure-sum decoder.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

from proto.decentsim.v1 import common_pb2
from proto.limits import LINK_CHUNK_BYTES, LINK_MAX_PAYLOAD_BYTES

_SHA256_BYTES = 32


class FramingError(ValueError):
    """A fragment stream is malformed: out of order, inconsistent, too large, or corrupt."""


def fragments(
    payload: bytes, chunk_bytes: int = LINK_CHUNK_BYTES
) -> Iterator[tuple[common_pb2.Fragment, bytes]]:
    """Cut ``payload`` into ``(Fragment header, data)`` pairs of at most ``chunk_bytes`` data.

    An empty payload is one empty fragment, so every payload has at least one.

    Raises:
        FramingError: ``chunk_bytes`` < 1, or the payload exceeds ``LINK_MAX_PAYLOAD_BYTES``.
    """
    if chunk_bytes < 1:
        raise FramingError(f"chunk size must be >= 1 byte, got {chunk_bytes}")
    if len(payload) > LINK_MAX_PAYLOAD_BYTES:
        raise FramingError(
            f"payload of {len(payload)} bytes exceeds LINK_MAX_PAYLOAD_BYTES "
            f"({LINK_MAX_PAYLOAD_BYTES})"
        )
    count = max(1, math.ceil(len(payload) / chunk_bytes))
    digest = hashlib.sha256(payload).digest()
    view = memoryview(payload)
    for i in range(count):
        header = common_pb2.Fragment(index=i, count=count, total_bytes=len(payload), sha256=digest)
        yield header, bytes(view[i * chunk_bytes : (i + 1) * chunk_bytes])


class Reassembler:
    """Collects the fragments of one payload, validating each as it arrives.

    Args:
        max_bytes: refuse a payload announcing more bytes than this (memory bound).
    """

    def __init__(self, max_bytes: int = LINK_MAX_PAYLOAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self._first: common_pb2.Fragment | None = None
        self._parts: list[bytes] = []
        self._received = 0

    @property
    def complete(self) -> bool:
        """Whether every announced fragment has arrived."""
        return self._first is not None and len(self._parts) == self._first.count

    def add(self, header: common_pb2.Fragment, data: bytes) -> None:
        """Accept the next fragment.

        Raises:
            FramingError: a header disagreeing with the first fragment's, a fragment out of
                order or after the last, an oversized announcement, or more data than
                announced. The reassembler is unchanged by a refused fragment.
        """
        first = self._first
        if first is None:
            if header.count < 1:
                raise FramingError(f"fragment count must be >= 1, got {header.count}")
            if header.total_bytes > self.max_bytes:
                raise FramingError(
                    f"payload announces {header.total_bytes} bytes, above the limit of "
                    f"{self.max_bytes}"
                )
            if len(header.sha256) != _SHA256_BYTES:
                raise FramingError(f"fragment digest must be 32 bytes, got {len(header.sha256)}")
        elif (header.count, header.total_bytes, header.sha256) != (
            first.count,
            first.total_bytes,
            first.sha256,
        ):
            raise FramingError(f"fragment {header.index} disagrees with the first fragment header")
        expected = len(self._parts)
        count = header.count if first is None else first.count
        if expected >= count:
            raise FramingError(f"fragment {header.index} arrived after the last of {count}")
        if header.index != expected:
            raise FramingError(f"fragment {header.index} arrived out of order; expected {expected}")
        total = header.total_bytes if first is None else first.total_bytes
        if self._received + len(data) > total:
            raise FramingError(f"fragments carry more than the announced {total} bytes")
        if first is None:
            self._first = header
        self._parts.append(data)
        self._received += len(data)

    def payload(self) -> bytes:
        """The reassembled payload, after checking its length and SHA-256.

        Raises:
            FramingError: fragments missing, or the length or digest does not match.
        """
        first = self._first
        if first is None or not self.complete:
            have = len(self._parts)
            want = "?" if first is None else first.count
            raise FramingError(f"payload incomplete: {have} of {want} fragments received")
        out = b"".join(self._parts)
        if len(out) != first.total_bytes:
            raise FramingError(f"payload has {len(out)} bytes; {first.total_bytes} announced")
        if hashlib.sha256(out).digest() != first.sha256:
            raise FramingError("payload SHA-256 does not match the announced digest")
        return out
