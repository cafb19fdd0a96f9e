"""The device side of the tunnel (``transport.flower.tunnel``): a DeviceGateway stub answering from
the answers the server sent with its last message.

A call with an answer returns the decoded reply (or raises the refusal as a gRPC error, so the
device's retry logic is the gRPC transport's); a call without one is queued and raises
``AwaitingReply``: the device's step stops there and is redone with the next message.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message as PbMessage

from transport.flower.tunnel import METHODS, Answer, Call, TunnelMessage, TunnelReply, request_key
from transport.grpc.client import AwaitingReply


class TunnelRpcError(grpc.RpcError):  # type: ignore[misc]
    """A refusal carried through the tunnel, with the gRPC status the gateway chose."""

    def __init__(self, code: grpc.StatusCode, detail: str) -> None:
        super().__init__(detail)
        self._code = code
        self._detail = detail

    def code(self) -> grpc.StatusCode:
        """The status code."""
        return self._code

    def details(self) -> str:
        """The gateway's message."""
        return self._detail


class TunnelStub:
    """``DeviceGatewayStub``-shaped: ``stub.RegisterSlots(request, timeout=…)`` etc."""

    def __init__(self) -> None:
        self._answers: dict[bytes, Answer] = {}
        self.pending: list[Call] = []

    def load(self, message: TunnelMessage) -> None:
        """Take the answers of a new message; forget the previous message's queue."""
        self._answers = {a.key: a for a in message.answers}
        self.pending = []

    def reply(self, done: bool) -> TunnelReply:
        """What to send back: done, or the queued requests (each once)."""
        calls = list({c.key: c for c in self.pending}.values())
        return TunnelReply(done and not calls, calls)

    def _call(self, method: str, request: PbMessage) -> Any:
        raw = request.SerializeToString(deterministic=True)
        key = request_key(method, raw)
        answer = self._answers.get(key)
        if answer is None:
            self.pending.append(Call(method, raw))
            raise AwaitingReply(f"{method}: the answer comes with the next message")
        if answer.code:
            del self._answers[key]  # a refusal is answered once; a retry asks the server again
            raise TunnelRpcError(grpc.StatusCode[answer.code], answer.detail)
        return METHODS[method][1].FromString(answer.reply)

    def __getattr__(self, method: str) -> Any:
        if method not in METHODS:
            raise AttributeError(method)
        return lambda request, timeout=None, **_: self._call(method, request)
