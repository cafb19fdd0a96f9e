"""A device's secure-sum link to the coordinator over gRPC (``decentsim.v1.DeviceGateway``).

:class:`GatewayLink` is the ``send: Callable[[bytes], bytes]`` a ``DeviceClient`` is built
with: it maps each encoded secure-sum message to its RPC (a one-entry batch), over a mutual-TLS
channel that presents the device's own client certificate, and returns the coordinator's
encoded reply. A per-entry refusal is re-raised as the same typed ``SecureSumError`` the
in-memory transport raises. Calls have deadlines and are retried with exponential backoff on
UNAVAILABLE / DEADLINE_EXCEEDED: every secure-sum write is idempotent (an identical resend is a
replay), so a retried call never double-counts.

:class:`GrpcConnector` is the ``connect`` factory of a ``DevicePool``: one channel per
secure-sum participant (each participant has its own certificate, CN = its id), two clients
(neighbourhood and aggregates deployments). It suits a gateway without a coordinator service,
where a certificate authenticates exactly one participant; an enrolled device-agent process
instead owns several participants under one credential (``device_agent.agent``).
"""

from __future__ import annotations

import enum
import hashlib
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from contract import schedule
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.limits import MAX_DIRECTORY_PAGE_SLOTS, Channel, channel_options
from protocols.secure_sum import DeviceClient
from protocols.secure_sum import errors as ss_errors
from protocols.secure_sum.config import Deployment
from protocols.secure_sum.errors import MessageError, SecureSumError
from protocols.secure_sum.messages import (
    DirectoryRequest,
    DirectoryResponse,
    FetchRequest,
    MailboxPost,
    RegisterRequest,
    ShuffledPost,
    decode,
)
from protocols.secure_sum.slots import SLOT_ID_BYTES, SlotTable

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_T = TypeVar("_T")


class TransportError(Exception):
    """A gateway call failed as a call (not a protocol refusal).

    Attributes:
        code: the gRPC status code of the last attempt.
    """

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class AwaitingReply(TransportError):
    """A request whose reply has not arrived yet: over the Flower transport the server answers
    with its next message, so the step is redone then (its requests are byte-identical)."""

    def __init__(self, detail: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, detail)


class Role(enum.Enum):
    """Which of the run's two secure-sum deployments a link serves (decides the post RPC)."""

    #: pseudonym-slot phases: posts go to PostShares
    NEIGHBOURHOOD = schedule.NEIGHBOURHOOD
    #: aggregate phases: posts go to SubmitAggregates
    AGGREGATES = schedule.AGGREGATES


@dataclass(frozen=True)
class RetryPolicy:
    """Deadlines and exponential backoff of gateway calls.

    Attempt ``k`` (0-based) that fails with UNAVAILABLE or DEADLINE_EXCEEDED waits
    ``min(max_backoff_s, initial_backoff_s · multiplier^k)`` scaled by a jitter factor in
    ``[1 - jitter, 1]`` (so many devices do not retry in lockstep), up to ``attempts`` tries.
    """

    attempts: int = 5
    timeout_s: float = 30.0
    initial_backoff_s: float = 0.1
    multiplier: float = 2.0
    max_backoff_s: float = 5.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.timeout_s <= 0 or self.initial_backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("timeout_s must be > 0 and backoffs >= 0")
        if self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("multiplier must be >= 1 and jitter in [0, 1]")

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (0-based)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        # jitter only spreads retries in time; it protects nothing, so `random` is fine
        return base * (1.0 - self.jitter * random.random())


def call_with_retries(
    call: Callable[[float], _T],
    policy: RetryPolicy,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> _T:
    """Run ``call(timeout_s)``, retrying UNAVAILABLE / DEADLINE_EXCEEDED with backoff.

    Raises:
        TransportError: a non-retryable status, or the last retryable one after
            ``policy.attempts`` tries; its message names the call, the code and the attempts.
    """
    for attempt in range(policy.attempts):
        try:
            return call(policy.timeout_s)
        except grpc.RpcError as err:
            code, detail = err.code(), err.details() or ""
            if code not in _RETRYABLE:
                raise TransportError(code, f"{what} failed with {code.name}: {detail}") from err
            if attempt + 1 == policy.attempts:
                raise TransportError(
                    code,
                    f"{what} failed with {code.name} after {policy.attempts} attempts: {detail}",
                ) from err
            sleep(policy.backoff_s(attempt))
    raise AssertionError("unreachable: attempts >= 1")  # pragma: no cover


def raise_refusal(error: common_pb2.ErrorDetail) -> None:
    """Re-raise a per-entry refusal as the typed ``SecureSumError`` it was at the server."""
    cls = getattr(ss_errors, error.reason, None)
    if not (isinstance(cls, type) and issubclass(cls, SecureSumError)):
        cls = SecureSumError
    code = next((c.name for c in grpc.StatusCode if c.value[0] == error.code), str(error.code))
    raise cls(f"coordinator refused ({code}): {error.detail}")


class GatewayLink:
    """``send(raw) -> raw`` for one device's ``DeviceClient`` over a gRPC channel.

    Args:
        channel: a ``grpc.secure_channel`` presenting this device's client certificate, or a
            ready DeviceGateway stub (e.g. the Flower transport's tunnel).
        device_id: the device (its certificate's CN is ``device_id.hex()``).
        role: which deployment this link serves (posts go to PostShares or SubmitAggregates).
        policy: deadlines and retries.
        sleep: the backoff sleep (tests pass a recorder).
    """

    def __init__(
        self,
        channel: grpc.Channel | Any,
        device_id: bytes,
        role: Role,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        is_stub = hasattr(channel, "RegisterSlots")
        self._stub = channel if is_stub else pb_grpc.DeviceGatewayStub(channel)
        self.device_id = device_id
        self.role = role
        self.policy = policy or RetryPolicy()
        self._sleep = sleep

    def _call(self, method: Any, request: Any, what: str) -> Any:
        return call_with_retries(
            lambda timeout: method(request, timeout=timeout), self.policy, what, self._sleep
        )

    def __call__(self, raw: bytes) -> bytes:
        """Deliver one encoded secure-sum message; return the encoded reply.

        Raises:
            SecureSumError: the coordinator refused it (the same subclass as in memory).
            TransportError: the call itself failed (after retries where retryable).
            MessageError: a message devices never send.
        """
        msg = decode(raw)
        device = common_pb2.DeviceId(value=self.device_id)
        if isinstance(msg, RegisterRequest):
            req = pb.RegisterSlotsRequest(
                round_id=msg.round_id,
                registrations=[
                    pb.SlotRegistration(
                        device=device, slot_count=len(msg.slot_ids) // SLOT_ID_BYTES, payload=raw
                    )
                ],
            )
            return _entry(self._call(self._stub.RegisterSlots, req, "RegisterSlots").results)
        if isinstance(msg, DirectoryRequest):
            return self._directory(msg.round_id, raw)
        if isinstance(msg, MailboxPost | ShuffledPost):
            ref = common_pb2.RoundRef(round_id=msg.round_id, phase=msg.phase)
            if isinstance(msg, MailboxPost):
                post = pb.SharePost(
                    device=device,
                    item_count=len(msg.slot_ids) // SLOT_ID_BYTES,
                    dim=msg.dim,
                    payload=raw,
                )
            else:  # the shuffled post's dim is inside its sealed envelope: stated as 0
                post = pb.SharePost(device=device, item_count=len(msg.items_for_a), payload=raw)
            if self.role is Role.NEIGHBOURHOOD:
                req_p = pb.PostSharesRequest(round=ref, posts=[post])
                return _entry(self._call(self._stub.PostShares, req_p, "PostShares").results)
            req_a = pb.SubmitAggregatesRequest(round=ref, posts=[post])
            return _entry(
                self._call(self._stub.SubmitAggregates, req_a, "SubmitAggregates").results
            )
        if isinstance(msg, FetchRequest):
            ref = common_pb2.RoundRef(round_id=msg.round_id, phase=msg.phase)
            fetch = pb.SlotFetch(device=device, slot_ids=msg.slot_ids, payload=raw)
            req_f = pb.FetchSumsRequest(round=ref, fetches=[fetch])
            return _entry(self._call(self._stub.FetchSums, req_f, "FetchSums").results)
        raise MessageError(f"devices do not send {type(msg).__name__}")

    def _directory(self, round_id: int, raw: bytes) -> bytes:
        """Assemble the whole directory from pages and check it against its digest."""
        parts: list[bytes] = []
        have, total, digest = 0, None, b""
        while total is None or have < total:
            req = pb.GetDirectoryRequest(
                round_id=round_id, start=have, max_slots=MAX_DIRECTORY_PAGE_SLOTS, payload=raw
            )
            page = self._call(self._stub.GetDirectory, req, "GetDirectory")
            ids = DirectoryResponse.from_bytes(page.payload).slot_ids
            if page.start != have or (total is not None and page.total_slots != total):
                raise MessageError("directory pages are inconsistent")
            total, digest = page.total_slots, page.directory_digest
            if not ids and have < total:
                raise MessageError(f"directory page at slot {have} of {total} is empty")
            parts.append(ids)
            have += len(ids) // SLOT_ID_BYTES
        whole = b"".join(parts)
        if have != total or hashlib.sha256(whole).digest() != digest:
            raise MessageError("the assembled directory does not match its announced digest")
        return DirectoryResponse(whole).to_bytes()


def _entry(results: Any) -> bytes:
    """The payload of a one-entry batch's result, or its refusal raised."""
    if len(results) != 1:
        raise MessageError(f"the coordinator answered {len(results)} results to one entry")
    result = results[0]
    if result.WhichOneof("outcome") == "error":
        raise_refusal(result.error)
    return bytes(result.payload)


#: ``credential_for(participant_id) -> (root PEM, private key PEM, certificate chain PEM)``
CredentialSource = Callable[[bytes], tuple[bytes, bytes, bytes]]


class GrpcConnector:
    """The ``connect`` factory of a ``DevicePool`` over the coordinator's gateway.

    Every participant (a phone, or a pool's share of up to ``UNIT_DEVICES`` devices) gets a
    fresh random 16-byte id and its own mutual-TLS channel presenting that id's certificate.

    Args:
        target: the coordinator's ``host:port``.
        credential_for: a participant's mTLS material (root, key, chain PEM; e.g.
            ``Credential.grpc_pem()`` of its certificate, CN ``participant_id.hex()``).
        neighbourhood, aggregates: the two deployments the devices take part in.
        policy: deadlines and retries of every call.
    """

    def __init__(
        self,
        target: str,
        credential_for: CredentialSource,
        neighbourhood: Deployment,
        aggregates: Deployment,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.target = target
        self._credential_for = credential_for
        self.neighbourhood = neighbourhood
        self.aggregates = aggregates
        self.policy = policy or RetryPolicy()
        #: the public directory, fetched once per round for the whole pool
        self.directory_cache: dict[int, SlotTable] = {}
        self._channels: list[grpc.Channel] = []

    def channel(self, participant_id: bytes) -> grpc.Channel:
        """A new mutual-TLS channel presenting ``participant_id``'s certificate."""
        root, key, chain = self._credential_for(participant_id)
        creds = grpc.ssl_channel_credentials(root, key, chain)
        channel = grpc.secure_channel(self.target, creds, options=channel_options(Channel.DEVICE))
        self._channels.append(channel)
        return channel

    def participant(
        self, participant_id: bytes, devices: int = 1, secret: bytes | None = None
    ) -> tuple[DeviceClient, DeviceClient]:
        """The (neighbourhood, aggregates) clients of participant ``participant_id`` hosting
        ``devices`` devices, over one channel presenting its certificate.

        ``devices`` scales the neighbourhood posts (``devices × items_per_device`` items); an
        aggregates post is one item, the participant's devices' observations summed. With a
        ``secret`` (32 bytes the participant keeps), a rebuilt request is byte-identical.
        """
        channel = self.channel(participant_id)
        nbhd = GatewayLink(channel, participant_id, Role.NEIGHBOURHOOD, self.policy)
        aggr = GatewayLink(channel, participant_id, Role.AGGREGATES, self.policy)
        return (
            DeviceClient(
                participant_id,
                self.neighbourhood,
                nbhd,
                self.directory_cache,
                devices=devices,
                secret=secret,
            ),
            DeviceClient(participant_id, self.aggregates, aggr, secret=secret),
        )

    def connect(self, unit: int, devices: int) -> tuple[DeviceClient, DeviceClient]:
        """``DevicePool`` connect: participant ``unit`` of a pool, hosting ``devices`` devices,
        as a new participant with a fresh random id (and so its own certificate)."""
        del unit  # the id is random: nothing about the pool's layout goes on the wire
        return self.participant(os.urandom(16), devices)

    def close(self) -> None:
        """Close every channel this connector opened."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
