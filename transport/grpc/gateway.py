"""The coordinator's device-facing gRPC service (``decentsim.v1.DeviceGateway``), mutual TLS.

A thin adapter around ``CoordinatorServer.handle_device(raw, peer)``, with no protocol logic
of its own. ``peer`` — the device a request acts for — is always the device id of the client
certificate the TLS layer verified (its commonName, 32 lowercase hex), optionally checked
against the enrolment registry; it is never taken from the request body. An entry naming
another device, or a payload whose routing fields disagree with the entry's, is refused.

Batched RPCs answer per entry, in request order: a protocol refusal (``SecureSumError``)
becomes that entry's ``ErrorDetail`` with the mapped gRPC status code (:func:`status_of`), the
exception class name (so the client re-raises the same typed error as in memory) and its
message. Whole-call statuses are kept for problems of the call: size (RESOURCE_EXHAUSTED),
identity (UNAUTHENTICATED / PERMISSION_DENIED), an unreachable aggregator (UNAVAILABLE: the
device retries; every write is idempotent).

A run has two secure-sum deployments with different codecs (``contract.schedule``):
RegisterSlots, GetDirectory, PostShares and FetchSums go to the neighbourhood (pseudonym-slot)
coordinator, SubmitAggregates to the aggregates coordinator.

With a ``service`` (``coordinator.service.CoordinatorService``), the client certificate names a
*credential* that owns several participant ids (a device pool; a phone owns one): an entry may
name any of its credential's participants. Enrol (no client certificate needed) and GetRound
are answered by the service; every served entry is reported to it (step progress, view log,
byte counts). Without a service, the certificate's id is the only participant and Enrol and
GetRound answer UNIMPLEMENTED.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import grpc

from identity.enrolment import EnrolmentError
from identity.pki import CertificateRejected
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.limits import (
    MAX_DIRECTORY_PAGE_SLOTS,
    MAX_ENTRIES_PER_BATCH,
    MAX_ITEMS_PER_POST,
    MAX_PAYLOAD_BYTES,
)
from protocols.secure_sum import CoordinatorServer, SlotKind
from protocols.secure_sum import errors as ss_errors
from protocols.secure_sum.errors import SecureSumError
from protocols.secure_sum.messages import (
    DirectoryRequest,
    DirectoryResponse,
    FetchRequest,
    MailboxPost,
    Message,
    RegisterRequest,
    ShuffledPost,
    decode,
)
from protocols.secure_sum.slots import SLOT_ID_BYTES
from transport.grpc.channels import CREDENTIAL_METADATA
from transport.grpc.link import LinkRefused, LinkUnavailable, abort, peer_common_name

_DEVICE_CN = re.compile(r"^[0-9a-f]{32}$")
#: Longest ``ReportFailure`` detail (bytes of UTF-8) the gateway takes.
MAX_FAILURE_DETAIL = 1024
#: Heartbeat pacing suggested to devices.
HEARTBEAT_INTERVAL_MS = 10_000
#: Longest GetRound long poll the gateway would allow (reported by Heartbeat).
MAX_WAIT_MS = 30_000

#: gRPC status of each protocol refusal; the most specific class in an error's MRO wins.
_STATUS: dict[type[SecureSumError], grpc.StatusCode] = {
    ss_errors.NotRegistrant: grpc.StatusCode.PERMISSION_DENIED,
    ss_errors.PartialGroup: grpc.StatusCode.PERMISSION_DENIED,
    ss_errors.SlotAlreadyRegistered: grpc.StatusCode.ALREADY_EXISTS,
    ss_errors.ConflictingSubmission: grpc.StatusCode.ALREADY_EXISTS,
    ss_errors.AlreadyFetched: grpc.StatusCode.FAILED_PRECONDITION,
    ss_errors.UnknownSlot: grpc.StatusCode.NOT_FOUND,
    ss_errors.UnknownPhase: grpc.StatusCode.NOT_FOUND,
    ss_errors.PhaseError: grpc.StatusCode.FAILED_PRECONDITION,
    ss_errors.RegistrationError: grpc.StatusCode.FAILED_PRECONDITION,
    ss_errors.AgreementError: grpc.StatusCode.ABORTED,
    # malformed messages, wrong lengths, bad encodings, envelopes, slot names, submissions
    SecureSumError: grpc.StatusCode.INVALID_ARGUMENT,
}


def status_of(error: SecureSumError) -> grpc.StatusCode:
    """The gRPC status code a protocol refusal maps to (never UNKNOWN)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    raise TypeError(f"{type(error).__name__} is not a SecureSumError")  # pragma: no cover


def _refusal(
    code: grpc.StatusCode, reason: str, detail: str, ref: common_pb2.RoundRef | None
) -> common_pb2.ErrorDetail:
    return common_pb2.ErrorDetail(code=code.value[0], reason=reason, detail=detail, round=ref)


def _invalid(detail: str, ref: common_pb2.RoundRef | None) -> common_pb2.ErrorDetail:
    return _refusal(grpc.StatusCode.INVALID_ARGUMENT, "MessageError", detail, ref)


#: ``authenticate(client certificate PEM) -> device id hex`` (``EnrolmentRegistry.authenticate``)
Authenticate = Callable[[bytes], str]


class DeviceGatewayServicer(pb_grpc.DeviceGatewayServicer):
    """The DeviceGateway service over the coordinator's two secure-sum deployments.

    Args:
        neighbourhood: the coordinator of pseudonym-slot phases (registration, directory,
            message posts, fetches).
        aggregates: the coordinator of aggregate phases (SubmitAggregates); defaults to
            ``neighbourhood`` for a single deployment serving both kinds.
        authenticate: maps the verified client certificate to an enrolled, unrevoked device
            (``EnrolmentRegistry.authenticate``); without it the certificate's CN is the id.
        clock: unix seconds (Heartbeat).
        service: the run's coordinator service (credentials owning participants, Enrol,
            GetRound, progress reports).
        insecure: DEBUGGING ONLY, no TLS: the caller names its credential in the
            ``decentsim-credential`` metadata and nothing proves it.

    ``lock`` serializes every call into the protocol objects (they are not thread-safe); the
    round driver holds it too when it closes phases while devices may be calling.
    """

    def __init__(
        self,
        neighbourhood: CoordinatorServer,
        aggregates: CoordinatorServer | None = None,
        authenticate: Authenticate | None = None,
        clock: Callable[[], float] = time.time,
        service: Service | None = None,
        insecure: bool = False,
    ) -> None:
        self.neighbourhood = neighbourhood
        self.aggregates = aggregates if aggregates is not None else neighbourhood
        self._authenticate = authenticate
        self._clock = clock
        self._service = service
        self._insecure = insecure
        self.lock = threading.RLock()
        #: set by :meth:`drain`: Heartbeat tells devices the server is going away
        self.draining = False

    def drain(self) -> None:
        """Announce shutdown in heartbeats (devices finish their call and back off)."""
        self.draining = True

    # -- identity ---------------------------------------------------------------------------
    def _peer(self, context: grpc.ServicerContext) -> bytes:
        """The device id authenticated by the TLS client certificate (never the body)."""
        if self._insecure:
            device_hex = str(dict(context.invocation_metadata()).get(CREDENTIAL_METADATA, ""))
            if not _DEVICE_CN.match(device_hex):
                abort(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"insecure mode: name the credential in {CREDENTIAL_METADATA!r} metadata",
                )
        elif self._authenticate is not None:
            pems = context.auth_context().get("x509_pem_cert", [])
            if not pems:
                abort(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
            try:
                device_hex = self._authenticate(pems[0])
            except (EnrolmentError, CertificateRejected) as err:
                status = getattr(err, "grpc_status", "UNAUTHENTICATED")
                abort(context, getattr(grpc.StatusCode, status), str(err))
        else:
            device_hex = peer_common_name(context) or ""
        if not _DEVICE_CN.match(device_hex):
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {device_hex!r} is not a device identity "
                "(expected a 32-hex-digit device id)",
            )
        return bytes.fromhex(device_hex)

    # -- one entry --------------------------------------------------------------------------
    def _serve(
        self,
        context: grpc.ServicerContext,
        coordinator: CoordinatorServer,
        peer: bytes,
        claimed: bytes | None,
        raw: bytes,
        expected: tuple[type[Message], ...],
        routing: Sequence[tuple[str, object, str]],
        ref: common_pb2.RoundRef | None,
    ) -> bytes | common_pb2.ErrorDetail:
        """Check one entry's identity and routing, then hand its payload to the coordinator.

        ``routing`` lists (field name, value in the request, payload attribute) triples.
        ``claimed`` is the participant the entry acts for (``None``: a request naming none).
        """
        if claimed is None:
            claimed = peer
        elif not self._owns(peer, claimed):
            return _refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                "NotRegistrant",
                "the entry names a device other than the one the client certificate authenticates",
                ref,
            )
        if len(raw) > MAX_PAYLOAD_BYTES:
            return _refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "MessageError",
                f"payload of {len(raw)} bytes exceeds MAX_PAYLOAD_BYTES ({MAX_PAYLOAD_BYTES})",
                ref,
            )
        try:
            msg = decode(raw)
        except SecureSumError as err:
            return _invalid(f"payload is not decodable: {err}", ref)
        if not isinstance(msg, expected):
            names = " or ".join(t.__name__ for t in expected)
            return _invalid(f"payload is a {type(msg).__name__}; this RPC carries {names}", ref)
        for name, routed, attr in routing:
            inside = _field(msg, attr)
            if routed != inside and name == "device":
                return _refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "NotRegistrant",
                    "the payload names a device other than its entry's",
                    ref,
                )
            if routed != inside:
                return _invalid(
                    f"routing field {name} ({_show(routed)}) disagrees with the payload "
                    f"({_show(inside)})",
                    ref,
                )
        try:
            with self.lock:
                reply = coordinator.handle_device(raw, claimed, msg)
        except SecureSumError as err:
            if isinstance(err, ss_errors.RoundLost) and self._service is not None and ref:
                self._service.round_lost(ref.round_id)
            # the message names what is wrong; protocol errors never carry values or shares
            return _refusal(status_of(err), type(err).__name__, str(err), ref)
        except LinkUnavailable as err:
            abort(context, grpc.StatusCode.UNAVAILABLE, f"aggregator unreachable, retry: {err}")
        except LinkRefused as err:
            abort(context, grpc.StatusCode.INTERNAL, f"coordinator-aggregator link: {err}")
        if self._service is not None and ref is not None:
            self._service.accepted(self._rpc_of(msg, coordinator), claimed, ref.round_id, len(raw))
        return reply

    def _rpc_of(self, msg: Message, coordinator: CoordinatorServer) -> str:
        """The RPC an accepted payload came with (the service's step of the round)."""
        if isinstance(msg, RegisterRequest):
            return "RegisterSlots"
        if isinstance(msg, FetchRequest):
            return "FetchSums"
        if isinstance(msg, DirectoryRequest):
            return "GetDirectory"
        return "SubmitAggregates" if coordinator is self.aggregates else "PostShares"

    def _owns(self, peer: bytes, claimed: bytes) -> bool:
        """Whether the authenticated credential ``peer`` may act for participant ``claimed``."""
        if self._service is None:
            return claimed == peer
        return self._service.owns(peer.hex(), claimed)

    def _check_batch(self, context: grpc.ServicerContext, n: int) -> None:
        if n > MAX_ENTRIES_PER_BATCH:
            abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch of {n} entries exceeds MAX_ENTRIES_PER_BATCH ({MAX_ENTRIES_PER_BATCH})",
            )

    def _phase_kind_refusal(
        self, coordinator: CoordinatorServer, ref: common_pb2.RoundRef, want: SlotKind, rpc: str
    ) -> common_pb2.ErrorDetail | None:
        """FAILED_PRECONDITION when the round declares the phase with the other slot kind."""
        with self.lock:
            rnd = coordinator.rounds.get(ref.round_id)
        phase = next((p for p in rnd.spec.phases if p.name == ref.phase), None) if rnd else None
        if phase is None or phase.kind is want:
            return None  # an unknown round or phase is the protocol's refusal (NOT_FOUND)
        return _refusal(
            grpc.StatusCode.FAILED_PRECONDITION,
            "PhaseError",
            f"{rpc} carries {want.value} phases; phase {ref.phase!r} of round {ref.round_id} "
            f"is a {phase.kind.value} phase",
            ref,
        )

    # -- RPCs -------------------------------------------------------------------------------
    def Enrol(self, request: pb.EnrolRequest, context: grpc.ServicerContext) -> Any:
        """Redeem a single-use token + CSR for a credential (the service's; no client cert)."""
        if self._service is not None:
            try:
                return self._service.enrol(request)
            except EnrolmentError as err:
                status = getattr(err, "grpc_status", "UNAUTHENTICATED")
                abort(context, getattr(grpc.StatusCode, status), str(err))
            except ValueError as err:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "Enrol is not served by this gateway; enrol with the coordinator's enrolment "
            "registry (single-use token + CSR) and connect with the issued certificate",
        )

    def GetRound(self, request: pb.GetRoundRequest, context: grpc.ServicerContext) -> Any:
        """The run's current round and step (long poll on ``newer_than``), from the service."""
        if self._service is not None:
            peer = self._peer(context)
            self._service.seen(peer.hex())
            return self._service.schedule(request.newer_than, request.wait_ms)
        abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "GetRound is not served by this gateway: round schedules come from the round "
            "driver, which is not wired to it",
        )

    def ReportFailure(
        self, request: pb.ReportFailureRequest, context: grpc.ServicerContext
    ) -> pb.ReportFailureResponse:
        """A device cannot complete a step: the service voids the round's attempt."""
        if self._service is None:
            abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                "ReportFailure is not served by this gateway: no round driver is wired to it",
            )
        peer = self._peer(context)
        if (
            not request.step
            or not request.reason
            or len(request.detail.encode()) > (MAX_FAILURE_DETAIL)
        ):
            abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a failure report needs a step, a reason and a detail of at most "
                f"{MAX_FAILURE_DETAIL} bytes",
            )
        current = self._service.report_failure(
            peer.hex(), request.round_id, request.step, request.reason, request.detail
        )
        return pb.ReportFailureResponse(current=current)

    def RegisterSlots(
        self, request: pb.RegisterSlotsRequest, context: grpc.ServicerContext
    ) -> pb.RegisterSlotsResponse:
        """RegisterRequest → RegisterResponse per device (relayed to A by the coordinator)."""
        peer = self._peer(context)
        self._check_batch(context, len(request.registrations))
        ref = common_pb2.RoundRef(round_id=request.round_id)
        results = []
        for e in request.registrations:
            out = self._serve(
                context,
                self.neighbourhood,
                peer,
                e.device.value,
                e.payload,
                (RegisterRequest,),
                [
                    ("round_id", request.round_id, "round_id"),
                    ("device", e.device.value, "device_id"),
                    ("slot_count", e.slot_count, "#slot_ids"),
                ],
                ref,
            )
            results.append(_result(pb.RegistrationResult, e.device, out))
        return pb.RegisterSlotsResponse(results=results)

    def GetDirectory(
        self, request: pb.GetDirectoryRequest, context: grpc.ServicerContext
    ) -> pb.DirectoryPage:
        """One page of the round's frozen slot directory (a DirectoryResponse of the page)."""
        peer = self._peer(context)
        ref = common_pb2.RoundRef(round_id=request.round_id)
        out = self._serve(
            context,
            self.neighbourhood,
            peer,
            None,  # the public directory: any participant of the credential may read it
            request.payload,
            (DirectoryRequest,),
            [("round_id", request.round_id, "round_id")],
            ref,
        )
        if isinstance(out, common_pb2.ErrorDetail):
            context.set_trailing_metadata((("decentsim-error-bin", out.SerializeToString()),))
            abort(context, _status(out.code), f"{out.reason}: {out.detail}")
        ids = DirectoryResponse.from_bytes(out).slot_ids
        total = len(ids) // SLOT_ID_BYTES
        size = min(request.max_slots or MAX_DIRECTORY_PAGE_SLOTS, MAX_DIRECTORY_PAGE_SLOTS)
        start = min(request.start, total)
        page = ids[start * SLOT_ID_BYTES : (start + size) * SLOT_ID_BYTES]
        return pb.DirectoryPage(
            round_id=request.round_id,
            start=start,
            total_slots=total,
            directory_digest=hashlib.sha256(ids).digest(),
            payload=DirectoryResponse(page).to_bytes(),
        )

    def _posts(
        self,
        request: pb.PostSharesRequest | pb.SubmitAggregatesRequest,
        context: grpc.ServicerContext,
        coordinator: CoordinatorServer,
        kind: SlotKind,
        rpc: str,
    ) -> list[pb.PostResult]:
        peer = self._peer(context)
        self._check_batch(context, len(request.posts))
        ref = request.round
        wrong_kind = self._phase_kind_refusal(coordinator, ref, kind, rpc)
        results = []
        for e in request.posts:
            routing: list[tuple[str, object, str]] = [
                ("round_id", ref.round_id, "round_id"),
                ("phase", ref.phase, "phase"),
                ("device", e.device.value, "device_id"),
            ]
            if e.dim:  # a shuffled post's dim is sealed; the client states it as 0
                routing.append(("dim", e.dim, "dim"))
            too_many = None
            if e.item_count > MAX_ITEMS_PER_POST:
                # a participant hosts at most UNIT_DEVICES devices: its post is bounded
                too_many = _refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "WrongLength",
                    f"post of {e.item_count} items exceeds MAX_ITEMS_PER_POST "
                    f"({MAX_ITEMS_PER_POST})",
                    ref,
                )
            out = (
                wrong_kind
                or too_many
                or self._serve(
                    context,
                    coordinator,
                    peer,
                    e.device.value,
                    e.payload,
                    (MailboxPost, ShuffledPost),
                    [*routing, ("item_count", e.item_count, "#items")],
                    ref,
                )
            )
            results.append(_result(pb.PostResult, e.device, out))
        return results

    def PostShares(
        self, request: pb.PostSharesRequest, context: grpc.ServicerContext
    ) -> pb.PostSharesResponse:
        """MailboxPost/ShuffledPost → PostReceipt per device, pseudonym phases only."""
        results = self._posts(
            request, context, self.neighbourhood, SlotKind.PSEUDONYM, "PostShares"
        )
        return pb.PostSharesResponse(results=results)

    def SubmitAggregates(
        self, request: pb.SubmitAggregatesRequest, context: grpc.ServicerContext
    ) -> pb.SubmitAggregatesResponse:
        """MailboxPost/ShuffledPost → PostReceipt per device, aggregate phases only."""
        results = self._posts(
            request, context, self.aggregates, SlotKind.AGGREGATE, "SubmitAggregates"
        )
        return pb.SubmitAggregatesResponse(results=results)

    def FetchSums(
        self, request: pb.FetchSumsRequest, context: grpc.ServicerContext
    ) -> pb.FetchSumsResponse:
        """FetchRequest → FetchResponse per (device, slot); only the registrant may fetch."""
        peer = self._peer(context)
        self._check_batch(context, len(request.fetches))
        ref = request.round
        results = []
        for e in request.fetches:
            out = self._serve(
                context,
                self.neighbourhood,
                peer,
                e.device.value,
                e.payload,
                (FetchRequest,),
                [
                    ("round_id", ref.round_id, "round_id"),
                    ("phase", ref.phase, "phase"),
                    ("device", e.device.value, "device_id"),
                    ("slot_ids", e.slot_ids, "slot_ids"),
                ],
                ref,
            )
            result = _result(pb.FetchResult, e.device, out)
            result.slot_ids = e.slot_ids
            results.append(result)
        return pb.FetchSumsResponse(results=results)

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatResponse:
        """Server clock, the newest open round, and which named devices are not the caller's;
        a pilot's health goes to the service (``decentsim pilot status``)."""
        peer = self._peer(context)
        if self._service is not None:
            self._service.heartbeat(peer.hex(), request, self._clock())
        with self.lock:
            rounds = set(self.neighbourhood.rounds) | set(self.aggregates.rounds)
        return pb.HeartbeatResponse(
            server_time_unix_ms=int(self._clock() * 1000),
            current=common_pb2.RoundRef(round_id=max(rounds, default=0)),
            next_heartbeat_ms=HEARTBEAT_INTERVAL_MS,
            max_wait_ms=MAX_WAIT_MS,
            unknown_devices=[d for d in request.devices if not self._owns(peer, d.value)],
            draining=self.draining,
        )


class Service(Protocol):
    """What the gateway asks of the coordinator service (``CoordinatorService``)."""

    def owns(self, credential: str, participant: bytes) -> bool:
        """Whether the credential may act for the participant."""
        ...

    def seen(self, credential: str) -> None:
        """The credential called."""
        ...

    def accepted(self, rpc: str, participant: bytes, round_id: int, nbytes: int) -> None:
        """An entry of ``rpc`` was served."""
        ...

    def enrol(self, request: pb.EnrolRequest) -> pb.EnrolResponse:
        """Redeem a token."""
        ...

    def round_lost(self, round_id: int) -> None:
        """The aggregator no longer holds ``round_id``."""
        ...

    def schedule(self, newer_than: int, wait_ms: int) -> pb.RoundSchedule:
        """The current round schedule."""
        ...

    def report_failure(
        self, credential: str, round_id: int, step: str, reason: str, detail: str
    ) -> bool:
        """A credential's devices cannot complete ``step``; True if that round is current."""
        ...

    def heartbeat(self, credential: str, request: pb.HeartbeatRequest, now: float) -> None:
        """A credential's heartbeat arrived at ``now`` (its progress, clock and health)."""
        ...


def _status(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a status number."""
    return next(c for c in grpc.StatusCode if c.value[0] == number)


def _show(value: object) -> str:
    """A routing value for an error message (ids as hex)."""
    return value.hex() if isinstance(value, bytes) else repr(value)


def _field(msg: Message, attr: str) -> object:
    """A payload field, or ``#name``: the number of 16-byte ids / items in it."""
    if attr == "#slot_ids":
        return len(msg.slot_ids) // SLOT_ID_BYTES  # type: ignore[attr-defined]
    if attr == "#items":
        if isinstance(msg, ShuffledPost):
            return len(msg.items_for_a)
        return len(msg.slot_ids) // SLOT_ID_BYTES  # type: ignore[attr-defined]
    return getattr(msg, attr, None)


def _result(cls: Any, device: common_pb2.DeviceId, out: bytes | common_pb2.ErrorDetail) -> Any:
    """A per-entry result message: the reply payload or the refusal."""
    if isinstance(out, common_pb2.ErrorDetail):
        return cls(device=device, error=out)
    return cls(device=device, payload=out)
