"""The coordinator ↔ aggregator link over gRPC (``decentsim.v1.AggregatorLink``), mutual TLS.

A thin adapter around the transport-free protocol objects, with no protocol logic of its own:

- :class:`AggregatorLinkServicer` runs in the aggregator and hands every request's payload to
  ``AggregatorServer.handle`` (A's protocol refusals travel back as encoded ``ErrorReply``
  payloads with status OK, exactly as in memory);
- :class:`AggregatorLinkClient` runs in the coordinator and is the ``Callable[[bytes], bytes]``
  link a ``CoordinatorServer`` is built with: it maps each secure-sum message type to its RPC
  (see ``proto/decentsim/v1/aggregator.proto``), streaming the big ones in fragments.

gRPC status codes are used only for problems of the call itself: a peer that is not the
coordinator (PERMISSION_DENIED), routing fields disagreeing with the payload or bad framing
(INVALID_ARGUMENT), an unknown deployment (NOT_FOUND), sizes over ``proto.limits``
(RESOURCE_EXHAUSTED, enforced by gRPC itself).

One aggregator process may serve several secure-sum deployments (a run uses one for
neighbourhood sums and one for aggregates, as their codecs differ); the call's metadata key
``decentsim-deployment`` names which one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NoReturn

import grpc

from contract.wire import round_from_pb, round_to_pb
from proto.decentsim.v1 import aggregator_pb2 as pb
from proto.decentsim.v1 import aggregator_pb2_grpc as pb_grpc
from proto.decentsim.v1 import common_pb2
from proto.framing import FramingError, Reassembler, fragments
from proto.limits import LINK_MAX_PAYLOAD_BYTES
from protocols.secure_sum import AggregatorServer, Mode, RoundSpec
from protocols.secure_sum.accumulator import KEY_BYTES
from protocols.secure_sum.errors import SecureSumError
from protocols.secure_sum.messages import (
    AggregateRequest,
    CloseRegistration,
    KeySetOffer,
    Message,
    OpenRound,
    RelayFetch,
    RelayMailbox,
    RelayRegister,
    RelayShuffled,
    SurvivingSet,
    decode,
)
from protocols.secure_sum.slots import SLOT_ID_BYTES

#: The certificate commonName of the coordinator's client identity on the link.
COORDINATOR_CN = "coordinator"
#: The certificate commonName of the aggregator's identity.
AGGREGATOR_CN = "aggregator"
#: Call metadata naming the secure-sum deployment a link call is for.
DEPLOYMENT_METADATA = "decentsim-deployment"

MODE_TO_WIRE: dict[Mode, int] = {
    Mode.MAILBOX: common_pb2.MODE_MAILBOX,
    Mode.SHUFFLED: common_pb2.MODE_SHUFFLED,
    Mode.PLAINTEXT: common_pb2.MODE_PLAINTEXT,
    Mode.DENSE: common_pb2.MODE_DENSE,
}


class LinkError(Exception):
    """A call on the coordinator → aggregator link failed as a call (not a protocol refusal).

    Attributes:
        code: the gRPC status code the call ended with.
    """

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class LinkUnavailable(LinkError):
    """The aggregator could not be reached in time (UNAVAILABLE, DEADLINE_EXCEEDED): retry.

    Every link RPC is idempotent at A, so retrying the same secure-sum operation is safe.
    """


class LinkRefused(LinkError):
    """The aggregator refused the call itself (identity, framing, routing, size)."""


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, detail: str) -> NoReturn:
    """End the RPC with ``code`` and ``detail`` (``context.abort`` raises; this says so)."""
    context.abort(code, detail)
    raise AssertionError("grpc context.abort returned")  # pragma: no cover


def peer_common_name(context: grpc.ServicerContext) -> str | None:
    """The commonName of the client certificate the TLS layer verified, if any."""
    names = context.auth_context().get("x509_common_name", [])
    return names[0].decode("utf-8", "replace") if names else None


def _decode(raw: bytes, expected: tuple[type[Message], ...], context: grpc.ServicerContext) -> Any:
    """Decode a request payload of one of the ``expected`` types, or refuse the call."""
    try:
        msg = decode(raw)
    except SecureSumError as err:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"payload is not decodable: {err}")
    if not isinstance(msg, expected):
        names = " or ".join(t.__name__ for t in expected)
        abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"payload is a {type(msg).__name__}; this RPC carries {names}",
        )
    return msg


def _agree(context: grpc.ServicerContext, what: str, routed: object, inside: object) -> None:
    """Refuse a request whose routing field disagrees with the same field in its payload."""
    if routed != inside:
        abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"routing field {what} ({routed!r}) disagrees with the payload ({inside!r})",
        )


def _reassemble(
    chunks: Iterable[pb.RelayChunk] | Iterable[pb.DigestChunk],
    context: grpc.ServicerContext,
    header_fields: tuple[str, ...],
) -> tuple[bytes, object]:
    """Reassemble a fragment stream whose ``header_fields`` must be identical on every chunk.

    Returns the payload and the first chunk (for its routing fields).
    """
    assembler = Reassembler(LINK_MAX_PAYLOAD_BYTES)
    first = None
    try:
        for chunk in chunks:
            if first is None:
                first = chunk
            elif any(getattr(chunk, f) != getattr(first, f) for f in header_fields):
                raise FramingError(f"fragment {chunk.fragment.index} changes the routing fields")
            assembler.add(chunk.fragment, chunk.payload)
        if first is None:
            raise FramingError("the stream carried no fragment")
        return assembler.payload(), first
    except FramingError as err:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad fragment stream: {err}")


def _reply_chunks(payload: bytes) -> Iterator[pb.LinkChunk]:
    for header, data in fragments(payload):
        yield pb.LinkChunk(fragment=header, payload=data)


#: ``policy(deployment name, spec)``: A's check of a round spec C proposes (raise to refuse)
RoundPolicy = Callable[[str, RoundSpec], None]
#: ``observer(event, deployment name, round id, A's encoded reply)``: A's view of served calls
LinkObserver = Callable[[str, str, int, bytes], None]


class AggregatorLinkServicer(pb_grpc.AggregatorLinkServicer):
    """The aggregator's gRPC face: each call's payload goes to ``AggregatorServer.handle``.

    Args:
        servers: the aggregator's secure-sum deployments by name (the ``decentsim-deployment``
            metadata value; a call without it names ``""``).
        allowed_peers: client-certificate commonNames allowed to call (the coordinator only).
        policy: checks a round spec C proposes in OpenRound (its phases); A then opens it
            itself. Without a policy, A's operator opens rounds from its own schedule.
        observer: told of every served call (A's recorded view for the audit).
        insecure: DEBUGGING ONLY: serve without TLS, accepting any caller.

    ``lock`` serializes every call into the protocol objects (they are not thread-safe); A's
    operator holds it too when it opens a round from its own schedule.
    """

    def __init__(
        self,
        servers: Mapping[str, AggregatorServer],
        allowed_peers: frozenset[str] = frozenset({COORDINATOR_CN}),
        policy: RoundPolicy | None = None,
        observer: LinkObserver | None = None,
        insecure: bool = False,
    ) -> None:
        if not servers:
            raise ValueError("an aggregator link needs at least one deployment")
        self._servers = dict(servers)
        self._allowed = allowed_peers
        self._policy = policy
        self._observer = observer
        #: DEBUGGING ONLY: no TLS, so no peer identity to check
        self.insecure = insecure
        self.lock = threading.RLock()

    def _server(self, context: grpc.ServicerContext) -> AggregatorServer:
        cn = peer_common_name(context)
        if not self.insecure and cn not in self._allowed:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {cn!r} may not use the aggregator link "
                f"(allowed: {', '.join(sorted(self._allowed))})",
            )
        name = dict(context.invocation_metadata()).get(DEPLOYMENT_METADATA, "")
        server = self._servers.get(str(name))
        if server is None:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no secure-sum deployment {name!r} here")
        return server

    def _handle(self, server: AggregatorServer, raw: bytes) -> bytes:
        with self.lock:
            return server.handle(raw)

    def OpenRound(
        self, request: pb.OpenRoundRequest, context: grpc.ServicerContext
    ) -> pb.LinkReply:
        """OpenRound → Agreed: A checks it opened the same round spec."""
        server = self._server(context)
        msg = _decode(request.payload, (OpenRound,), context)
        _agree(context, "round_id", request.round_id, msg.round_id)
        if request.phases and self._policy is not None:
            name = str(dict(context.invocation_metadata()).get(DEPLOYMENT_METADATA, ""))
            try:
                spec = round_from_pb(request.round_id, list(request.phases))
                self._policy(name, spec)
            except (SecureSumError, ValueError) as err:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"round spec refused: {err}")
            with self.lock:
                if spec.round_id not in server.rounds:
                    server.open_round(spec)
                    # C runs one round at a time: older ones are finished, free their shares
                    for old in [r for r in server.rounds if r < spec.round_id]:
                        del server.rounds[old]
        reply = self._handle(server, request.payload)
        self._observe("open_round", context, request.round_id, reply)
        return pb.LinkReply(payload=reply)

    def _observe(
        self, event: str, context: grpc.ServicerContext, round_id: int, reply: bytes
    ) -> None:
        """Report a served call to the observer (A's view log): event, deployment, round."""
        if self._observer is not None:
            name = str(dict(context.invocation_metadata()).get(DEPLOYMENT_METADATA, ""))
            self._observer(event, name, round_id, reply)

    def RelayRegistrations(
        self, request: pb.RelayRegistrationsRequest, context: grpc.ServicerContext
    ) -> pb.RelayRegistrationsResponse:
        """RelayRegister → RegisterResponse, per entry (all entries checked before any runs)."""
        server = self._server(context)
        for entry in request.registrations:
            msg = _decode(entry.payload, (RelayRegister,), context)
            _agree(context, "round_id", request.round_id, msg.round_id)
            _agree(context, "device", entry.device.value, msg.device_id)
            _agree(context, "slot_count", entry.slot_count, len(msg.slot_ids) // SLOT_ID_BYTES)
        payloads = [self._handle(server, e.payload) for e in request.registrations]
        for reply in payloads:
            self._observe("register", context, request.round_id, reply)
        return pb.RelayRegistrationsResponse(payloads=payloads)

    def CloseRegistration(
        self, request: pb.CloseRegistrationRequest, context: grpc.ServicerContext
    ) -> pb.LinkReply:
        """CloseRegistration → Agreed (A compares the directory digest)."""
        server = self._server(context)
        msg = _decode(request.payload, (CloseRegistration,), context)
        _agree(context, "round_id", request.round_id, msg.round_id)
        return pb.LinkReply(payload=self._handle(server, request.payload))

    def RelaySealedBatch(
        self, request_iterator: Iterator[pb.RelayChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.LinkChunk]:
        """RelayMailbox → RelayReceipt or RelayShuffled → ShuffledForC, fragmented both ways."""
        server = self._server(context)
        fields = ("round", "mode", "post_count", "item_count")
        raw, first = _reassemble(request_iterator, context, fields)
        assert isinstance(first, pb.RelayChunk)
        msg = _decode(raw, (RelayMailbox, RelayShuffled), context)
        _agree(context, "mode", first.mode, MODE_TO_WIRE[server.deployment.mode])
        _agree(context, "round_id", first.round.round_id, msg.round_id)
        _agree(context, "phase", first.round.phase, msg.phase)
        _agree(context, "post_count", first.post_count, len(msg.device_ids))
        items = len(msg.items_for_a) if isinstance(msg, RelayShuffled) else len(msg.sealed_for_a)
        _agree(context, "item_count", first.item_count, items)
        reply = self._handle(server, raw)
        self._observe(f"relay:{msg.phase}", context, msg.round_id, reply)
        yield from _reply_chunks(reply)

    def ExchangeDigests(
        self, request_iterator: Iterator[pb.DigestChunk], context: grpc.ServicerContext
    ) -> Iterator[pb.LinkChunk]:
        """KeySetOffer → KeySetReply (OFFER) or SurvivingSet → Agreed (FIX), fragmented."""
        server = self._server(context)
        raw, first = _reassemble(
            request_iterator, context, ("round", "step", "digest", "key_count")
        )
        assert isinstance(first, pb.DigestChunk)
        if first.step == pb.AGREEMENT_STEP_OFFER:
            msg = _decode(raw, (KeySetOffer,), context)
            keys = 0
        elif first.step == pb.AGREEMENT_STEP_FIX:
            msg = _decode(raw, (SurvivingSet,), context)
            keys = len(msg.keys) // KEY_BYTES
        else:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "agreement step is unspecified")
        _agree(context, "round_id", first.round.round_id, msg.round_id)
        _agree(context, "phase", first.round.phase, msg.phase)
        _agree(context, "digest", first.digest, msg.digest)
        _agree(context, "key_count", first.key_count, keys)
        reply = self._handle(server, raw)
        self._observe(f"agree:{msg.phase}", context, msg.round_id, reply)
        yield from _reply_chunks(reply)

    def ReleaseSums(
        self, request: pb.ReleaseSumsRequest, context: grpc.ServicerContext
    ) -> pb.LinkReply:
        """AggregateRequest → AggregateShares (A's share sums of an agreed aggregate phase)."""
        server = self._server(context)
        msg = _decode(request.payload, (AggregateRequest,), context)
        _agree(context, "round_id", request.round.round_id, msg.round_id)
        _agree(context, "phase", request.round.phase, msg.phase)
        return pb.LinkReply(payload=self._handle(server, request.payload))

    def RelayFetches(
        self, request: pb.RelayFetchesRequest, context: grpc.ServicerContext
    ) -> pb.RelayFetchesResponse:
        """RelayFetch → FetchReply, per entry (all entries checked before any runs)."""
        server = self._server(context)
        for entry in request.fetches:
            msg = _decode(entry.payload, (RelayFetch,), context)
            _agree(context, "round_id", request.round.round_id, msg.round_id)
            _agree(context, "phase", request.round.phase, msg.phase)
            _agree(context, "device", entry.device.value, msg.device_id)
            _agree(context, "slot_ids", entry.slot_ids, msg.slot_ids)
        return pb.RelayFetchesResponse(
            payloads=[self._handle(server, e.payload) for e in request.fetches]
        )


class AggregatorLinkClient:
    """The coordinator's link to A over a mutual-TLS channel: ``link(raw) -> raw``.

    Pass it as the ``aggregator`` argument of ``CoordinatorServer``. Each call has a deadline;
    a call that fails as a call raises :class:`LinkUnavailable` (retry the same operation: the
    secure-sum steps are idempotent at A, and ``close_phase`` resumes) or
    :class:`LinkRefused`. A's protocol refusals are returned as their ``ErrorReply`` bytes.

    Args:
        channel: a ``grpc.secure_channel`` to the aggregator, presenting the coordinator's
            client certificate (CN ``"coordinator"``), with ``proto.limits.channel_options``.
        mode: the deployment's posting mode (stated on every relayed batch; A checks it).
        deployment: the deployment's name at the aggregator (``decentsim-deployment``).
        timeout_s: deadline of each call.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        mode: Mode,
        deployment: str = "",
        timeout_s: float = 60.0,
    ) -> None:
        self._stub = pb_grpc.AggregatorLinkStub(channel)
        self.mode = mode
        self._metadata = ((DEPLOYMENT_METADATA, deployment),)
        self.timeout_s = timeout_s
        self._proposed: dict[int, RoundSpec] = {}

    def propose(self, spec: RoundSpec) -> None:
        """Send ``spec``'s phases with its OpenRound, for an aggregator that opens rounds
        after checking them against its policy (instead of from its own schedule)."""
        self._proposed[spec.round_id] = spec

    def __call__(self, raw: bytes) -> bytes:
        """Send one encoded secure-sum message to A and return its encoded answer."""
        msg = decode(raw)
        try:
            return self._dispatch(msg, raw)
        except grpc.RpcError as err:
            code, detail = err.code(), err.details() or ""
            text = f"aggregator link {type(msg).__name__} failed with {code.name}: {detail}"
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise LinkUnavailable(code, text) from err
            raise LinkRefused(code, text) from err

    def _dispatch(self, msg: Message, raw: bytes) -> bytes:
        kw = {"timeout": self.timeout_s, "metadata": self._metadata}
        stub = self._stub
        if isinstance(msg, OpenRound):
            spec = self._proposed.pop(msg.round_id, None)
            phases = round_to_pb(spec) if spec is not None else []
            return stub.OpenRound(
                pb.OpenRoundRequest(round_id=msg.round_id, phases=phases, payload=raw), **kw
            ).payload
        if isinstance(msg, RelayRegister):
            entry = pb.RelayedRegistration(
                device=common_pb2.DeviceId(value=msg.device_id),
                slot_count=len(msg.slot_ids) // SLOT_ID_BYTES,
                payload=raw,
            )
            req = pb.RelayRegistrationsRequest(round_id=msg.round_id, registrations=[entry])
            return _single(stub.RelayRegistrations(req, **kw).payloads)
        if isinstance(msg, CloseRegistration):
            # slot_count 0: the message carries only the digest, which A checks exactly
            req = pb.CloseRegistrationRequest(round_id=msg.round_id, payload=raw)
            return stub.CloseRegistration(req, **kw).payload
        if isinstance(msg, RelayMailbox | RelayShuffled):
            items = (
                len(msg.items_for_a) if isinstance(msg, RelayShuffled) else len(msg.sealed_for_a)
            )
            ref = common_pb2.RoundRef(round_id=msg.round_id, phase=msg.phase)
            relay = (
                pb.RelayChunk(
                    round=ref,
                    mode=MODE_TO_WIRE[self.mode],
                    post_count=len(msg.device_ids),
                    item_count=items,
                    fragment=header,
                    payload=data,
                )
                for header, data in fragments(raw)
            )
            return _join(stub.RelaySealedBatch(relay, **kw))
        if isinstance(msg, KeySetOffer | SurvivingSet):
            ref = common_pb2.RoundRef(round_id=msg.round_id, phase=msg.phase)
            fix = isinstance(msg, SurvivingSet)
            step = pb.AGREEMENT_STEP_FIX if fix else pb.AGREEMENT_STEP_OFFER
            keys = len(msg.keys) // KEY_BYTES if isinstance(msg, SurvivingSet) else 0
            digests = (
                pb.DigestChunk(
                    round=ref,
                    step=step,
                    digest=msg.digest,
                    key_count=keys,
                    fragment=header,
                    payload=data,
                )
                for header, data in fragments(raw)
            )
            return _join(stub.ExchangeDigests(digests, **kw))
        if isinstance(msg, AggregateRequest):
            ref = common_pb2.RoundRef(round_id=msg.round_id, phase=msg.phase)
            return stub.ReleaseSums(pb.ReleaseSumsRequest(round=ref, payload=raw), **kw).payload
        if isinstance(msg, RelayFetch):
            ref = common_pb2.RoundRef(round_id=msg.round_id, phase=msg.phase)
            fetch = pb.RelayedFetch(
                device=common_pb2.DeviceId(value=msg.device_id), slot_ids=msg.slot_ids, payload=raw
            )
            req = pb.RelayFetchesRequest(round=ref, fetches=[fetch])
            return _single(stub.RelayFetches(req, **kw).payloads)
        raise LinkRefused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the aggregator link carries no {type(msg).__name__} message",
        )


def _single(payloads: Iterable[bytes]) -> bytes:
    """The one answer of a one-entry batch."""
    got = list(payloads)
    if len(got) != 1:
        raise LinkRefused(
            grpc.StatusCode.INTERNAL, f"aggregator answered {len(got)} entries to a batch of 1"
        )
    return got[0]


def _join(chunks: Iterable[pb.LinkChunk]) -> bytes:
    """Reassemble A's fragmented answer."""
    assembler = Reassembler(LINK_MAX_PAYLOAD_BYTES)
    try:
        for chunk in chunks:
            assembler.add(chunk.fragment, chunk.payload)
        return assembler.payload()
    except FramingError as err:
        raise LinkRefused(
            grpc.StatusCode.INTERNAL, f"aggregator's fragmented answer is malformed: {err}"
        ) from err
