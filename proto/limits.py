"""Explicit message-size limits of the wire protocol, and the gRPC options that enforce them.

gRPC's own defaults (4 MiB receive, unlimited send) are wrong for both of our channels: too
small for a device pool's batches and the directory pages, and unbounded on send. Every limit
here is derived from the secure-sum layout (``protocols/secure_sum``) so that an honest
request always fits and anything larger is refused by the transport with
``RESOURCE_EXHAUSTED`` before a byte of it is parsed.

Sizes of one secure-sum post (``items`` items of ``dim`` int64 values; an envelope adds 57
bytes: version, 8-byte key id, 32-byte ephemeral key, 16-byte tag):

- mailbox: ``8 · items`` slot ids + ``8 · items · dim`` C-shares + one sealed 48-byte block;
- shuffled: one outer envelope holding ``items`` sealed C-items of ``57 + 24 + 8 · dim`` bytes
  (16-byte contribution id, 8-byte slot, shares), plus ``items`` sealed A-items of ``57 + 40``
  bytes each (each with a 4-byte length prefix);
- dense: ``8 · slots · dim`` C-shares of every slot of the phase (no slot ids in a pseudonym
  phase, the aggregate names in an aggregate one) + one sealed 48-byte block; at most
  ``protocols.secure_sum.protocol.MAX_DENSE_WORDS`` (2²²) words, 32 MiB.

A post comes from one secure-sum participant: a phone (one device) or a share of a device pool
(up to ``device_agent.pool.UNIT_DEVICES`` = 1,024 devices, padded to ``devices ×
items_per_device`` items). At the limits below (65,536 items of dim 64) a mailbox post is about
34.6 MB; a messages-phase post of 65,536 items of dim 4 about 3.1 MB (mailbox) or 15 MB
(shuffled): all fit ``MAX_PAYLOAD_BYTES``.
"""

from __future__ import annotations

import enum

_MiB = 1 << 20

#: Most items one participant may post in one phase (``devices × items_per_device``): 1,024
#: pooled devices × 64 distinct beacons a day each, and keeps one post under
#: ``MAX_PAYLOAD_BYTES``.
MAX_ITEMS_PER_POST = 65_536

#: Most ring elements per item (``PhaseSpec.dim``): a value plus p ≲ 16 tangents per message,
#: or a few observations × (1 + p) per aggregate item; 64 leaves room for either.
MAX_DIM = 64

#: Most bytes of one encoded secure-sum message carried in one ``payload`` field of a unary
#: device RPC (one post, registration or fetch). 40 MiB holds the largest post the two limits
#: above allow (≈ 34.6 MB, see the module docstring).
MAX_PAYLOAD_BYTES = 40 * _MiB

#: Most entries (devices' posts, registrations, or fetches) in one batched device RPC. Pools
#: split larger batches; the byte limit below is the binding one for big posts.
MAX_ENTRIES_PER_BATCH = 4096

#: Most slot ids in one directory page: 262,144 × 8 bytes = 2 MiB per page.
MAX_DIRECTORY_PAGE_SLOTS = 1 << 18

#: Most bytes of one device → coordinator request (server receive, device send). 64 MiB holds
#: one worst-case post, or a batch of a few full messages-phase posts, and keeps one request's
#: memory bounded at C.
DEVICE_MAX_REQUEST_BYTES = 64 * _MiB

#: Most bytes of one coordinator → device reply (server send, device receive): a full directory
#: page (2 MiB) or a batch of fetch results, with headroom.
DEVICE_MAX_RESPONSE_BYTES = 64 * _MiB

#: Size of one fragment of a streamed coordinator ↔ aggregator payload (``common.Fragment``):
#: small enough to interleave with other calls, large enough that per-message overhead is
#: negligible.
LINK_CHUNK_BYTES = 4 * _MiB

#: Most bytes of one gRPC message on the coordinator ↔ aggregator link, in either direction:
#: a fragment (4 MiB) plus its routing fields, or a unary batch of relayed registrations or
#: fetches (a pool's day: thousands of ~300-byte entries). 64 MiB bounds a call's memory.
LINK_MAX_MESSAGE_BYTES = 64 * _MiB

#: Most bytes of one reassembled link payload (a phase's relayed batch or key list). A whole
#: phase travels as one secure-sum message; the Astoria population (37,518 devices) in shuffled
#: mode with 64 items of dim 17 relays ≈ 37,518 × 64 × (57 + 24 + 136 + 101) B ≈ 0.8 GB.
#: 2 GiB is protobuf's hard ceiling for one message and a memory bound for the receiver.
LINK_MAX_PAYLOAD_BYTES = 2 * 1024 * _MiB - 1


class Channel(enum.Enum):
    """Which channel the options are for."""

    #: device (or device pool) ↔ coordinator gateway
    DEVICE = "device"
    #: coordinator ↔ aggregator link (server to server)
    LINK = "link"


def _limits(channel: Channel) -> tuple[int, int]:
    """(bytes a client may send / a server may receive, bytes a server may send / a client
    may receive)."""
    if channel is Channel.DEVICE:
        return DEVICE_MAX_REQUEST_BYTES, DEVICE_MAX_RESPONSE_BYTES
    return LINK_MAX_MESSAGE_BYTES, LINK_MAX_MESSAGE_BYTES


def server_options(channel: Channel) -> list[tuple[str, int]]:
    """gRPC options for a ``grpc.server(..., options=...)`` serving ``channel``.

    The server refuses larger requests with ``RESOURCE_EXHAUSTED`` and never sends a reply
    larger than the client accepts.
    """
    request, response = _limits(channel)
    return [
        ("grpc.max_receive_message_length", request),
        ("grpc.max_send_message_length", response),
    ]


def channel_options(channel: Channel) -> list[tuple[str, int]]:
    """gRPC options for a client ``grpc.secure_channel(..., options=...)`` on ``channel``.

    The mirror image of :func:`server_options`: a client refuses to send what the server would
    refuse (failing fast, locally, with ``RESOURCE_EXHAUSTED``) and accepts every reply the
    server may send.
    """
    request, response = _limits(channel)
    return [
        ("grpc.max_send_message_length", request),
        ("grpc.max_receive_message_length", response),
    ]
