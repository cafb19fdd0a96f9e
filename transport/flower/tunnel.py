"""DeviceGateway calls carried inside another transport's messages (the Flower transport).

Flower's Message API is server-push: the ServerApp sends a message, the ClientApp replies. A
device, though, *calls* the coordinator (register, post, fetch), and needs the answers. The
tunnel bridges the two without any protocol logic of its own:

1. the server sends a node the round's schedule plus every answer it holds for that node in
   the round so far (:class:`TunnelMessage`);
2. the node (re)does its step with a stub answering from those; the first request without an
   answer raises ``AwaitingReply`` and the node replies with its unanswered requests;
3. the server runs each request through the *same* ``DeviceGatewayServicer`` as the gRPC
   transport (:class:`TunnelServer`), with the node's credential as the caller, and sends the
   answers in the next message; a node that finished its step replies ``done``.

This works because a device's requests are deterministic (derived from its persisted secret):
redoing a step rebuilds byte-identical requests, so a request is its own key. Answers are
kept per node for the current round only; a refusal is sent once (the node acts on it as it
would on a gRPC error), so a retried request is run again, as a gRPC retry would be.

Identity: the servicer authenticates the caller from ``auth_context()`` exactly as over TLS;
here it is the credential certificate the server bound to the Flower node when that node
enrolled through the tunnel. Flower authenticates the node (SuperNode authentication and TLS
in a deployment; one process in a simulation).

Leakage: the server learns what it learns over gRPC (the same requests); Flower's SuperLink
additionally sees the tunnelled bytes, so in a deployment it must be operated by C (it is C's
transport, as the gRPC gateway is), and A-bound material stays sealed to A inside.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as PbMessage

from proto.decentsim.v1 import device_pb2 as pb

#: the tunnelled DeviceGateway methods: name -> (request type, reply type)
METHODS: dict[str, tuple[type[PbMessage], type[PbMessage]]] = {
    "Enrol": (pb.EnrolRequest, pb.EnrolResponse),
    "RegisterSlots": (pb.RegisterSlotsRequest, pb.RegisterSlotsResponse),
    "GetDirectory": (pb.GetDirectoryRequest, pb.DirectoryPage),
    "PostShares": (pb.PostSharesRequest, pb.PostSharesResponse),
    "SubmitAggregates": (pb.SubmitAggregatesRequest, pb.SubmitAggregatesResponse),
    "FetchSums": (pb.FetchSumsRequest, pb.FetchSumsResponse),
    "ReportFailure": (pb.ReportFailureRequest, pb.ReportFailureResponse),
}
#: the Flower ConfigRecord carrying the tunnel's fields in every message
RECORD = "decentsim"
#: the message type of each step (Flower: ``query.<step>``, the steps of
#: ``contract.schedule``); ``enrol`` precedes the rounds
ENROL = "enrol"


class TunnelError(Exception):
    """A malformed tunnel record (names the field)."""


def request_key(method: str, request: bytes) -> bytes:
    """The key of a tunnelled request: SHA-256 of its method and bytes."""
    return hashlib.sha256(method.encode() + b"\0" + request).digest()


@dataclass
class Call:
    """One tunnelled request."""

    method: str
    request: bytes

    @property
    def key(self) -> bytes:
        """:func:`request_key` of this call."""
        return request_key(self.method, self.request)


@dataclass
class Answer:
    """The server's answer to a :class:`Call`: the reply bytes, or a status and message."""

    key: bytes
    reply: bytes = b""
    code: str = ""  # a grpc.StatusCode name; empty: success
    detail: str = ""


@dataclass
class TunnelMessage:
    """Server → node: the schedule (or enrolment token) and the answers held for the node."""

    schedule: bytes
    answers: list[Answer] = field(default_factory=list)
    token: str = ""

    def to_fields(self) -> dict[str, Any]:
        """The fields of a Flower ``ConfigRecord``."""
        return {
            "schedule": self.schedule,
            "token": self.token,
            "keys": [a.key for a in self.answers],
            "replies": [a.reply for a in self.answers],
            "codes": [a.code for a in self.answers],
            "details": [a.detail for a in self.answers],
        }

    @classmethod
    def from_fields(cls, fields: Any) -> TunnelMessage:
        """Inverse of :meth:`to_fields` (raises :class:`TunnelError` on a bad record)."""
        try:
            cols = [list(fields[k]) for k in ("keys", "replies", "codes", "details")]
            schedule, token = bytes(fields["schedule"]), str(fields["token"])
        except (KeyError, TypeError) as err:
            raise TunnelError(f"tunnel message: missing or mistyped field {err}") from None
        if len({len(c) for c in cols}) != 1:
            raise TunnelError("tunnel message: keys, replies, codes and details differ in length")
        answers = [
            Answer(bytes(k), bytes(r), str(c), str(d)) for k, r, c, d in zip(*cols, strict=True)
        ]
        return cls(schedule, answers, token)


@dataclass
class TunnelReply:
    """Node → server: the step is done, or these requests need answers."""

    done: bool
    calls: list[Call] = field(default_factory=list)

    def to_fields(self) -> dict[str, Any]:
        """The fields of a Flower ``ConfigRecord``."""
        return {
            "done": self.done,
            "methods": [c.method for c in self.calls],
            "requests": [c.request for c in self.calls],
        }

    @classmethod
    def from_fields(cls, fields: Any) -> TunnelReply:
        """Inverse of :meth:`to_fields` (raises :class:`TunnelError` on a bad record)."""
        try:
            done = bool(fields["done"])
            methods, requests = list(fields["methods"]), list(fields["requests"])
        except (KeyError, TypeError) as err:
            raise TunnelError(f"tunnel reply: missing or mistyped field {err}") from None
        if len(methods) != len(requests):
            raise TunnelError("tunnel reply: methods and requests differ in length")
        bad = sorted({str(m) for m in methods} - set(METHODS))
        if bad:
            raise TunnelError(f"tunnel reply: unknown method(s) {bad}")
        return cls(done, [Call(str(m), bytes(r)) for m, r in zip(methods, requests, strict=True)])


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _TunnelContext:
    """The part of ``grpc.ServicerContext`` the gateway uses, for a tunnelled call: the
    caller's certificate (bound to its node), abort, and trailing metadata (ignored)."""

    def __init__(self, certificate_pem: bytes | None) -> None:
        self._cert = certificate_pem

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._cert]} if self._cert is not None else {}

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: object) -> None:
        del metadata  # integrity trailers matter to gRPC clients; the tunnel carries replies

    def abort(self, code: grpc.StatusCode, detail: str) -> NoReturn:
        raise _Abort(code, detail)


#: statuses a node should retry: not kept as answers, so the node's next request reruns
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class TunnelServer:
    """Runs tunnelled calls through a ``DeviceGatewayServicer`` and keeps each node's answers
    for the current round.

    Args:
        servicer: the gateway (the gRPC transport's own object).
        on_enrolled: called with (node, EnrolResponse) when a node's Enrol succeeds; the
            caller binds the node to the credential (:meth:`bind`).
    """

    def __init__(
        self, servicer: Any, on_enrolled: Callable[[int, pb.EnrolResponse], None] | None = None
    ) -> None:
        self._servicer = servicer
        self._on_enrolled = on_enrolled
        self._certs: dict[int, bytes] = {}
        self._answers: dict[int, dict[bytes, Answer]] = {}
        self._once: dict[int, list[Answer]] = {}
        self._round: int | None = None
        self._lock = threading.Lock()

    def bind(self, node: int, certificate_pem: bytes) -> None:
        """Node ``node`` calls as the credential of this certificate from now on."""
        self._certs[node] = certificate_pem

    def bound(self, node: int) -> bool:
        """Whether ``node`` has a credential."""
        return node in self._certs

    def new_round(self, round_id: int) -> None:
        """Forget the answers of the previous round (its requests cannot recur)."""
        with self._lock:
            if round_id != self._round:
                self._round = round_id
                self._answers.clear()
                self._once.clear()

    def message(self, node: int, schedule: bytes, token: str = "") -> TunnelMessage:
        """The next message for ``node``: the schedule and every answer it is owed."""
        with self._lock:
            kept = list(self._answers.get(node, {}).values())
            once = self._once.pop(node, [])
        return TunnelMessage(schedule, kept + once, token)

    def run(self, node: int, calls: list[Call]) -> None:
        """Run ``node``'s calls (in order); their answers go into its next message."""
        for call in calls:
            answer = self._run_one(node, call)
            with self._lock:
                if answer.code:
                    if grpc.StatusCode[answer.code] not in _RETRYABLE:
                        self._once.setdefault(node, []).append(answer)
                else:
                    self._answers.setdefault(node, {})[answer.key] = answer

    def _run_one(self, node: int, call: Call) -> Answer:
        req_type, _ = METHODS[call.method]
        try:
            request = req_type.FromString(call.request)
        except DecodeError as err:
            return Answer(call.key, code="INVALID_ARGUMENT", detail=f"{call.method}: {err}")
        if call.method != "Enrol" and node not in self._certs:
            return Answer(call.key, code="UNAUTHENTICATED", detail=f"node {node} has not enrolled")
        context = _TunnelContext(self._certs.get(node))
        try:
            reply = getattr(self._servicer, call.method)(request, context)
        except _Abort as err:
            return Answer(call.key, code=err.code.name, detail=err.detail)
        if call.method == "Enrol" and self._on_enrolled is not None:
            self._on_enrolled(node, reply)
        return Answer(call.key, reply=reply.SerializeToString())
