"""The Flower transport: the tunnel's records and state (no Flower needed), and whole runs on
Flower's simulation engine (Ray) that must equal the gRPC transport's, with a dropout handled
as under gRPC.

The Ray tests share one xdist group (``make test`` runs ``--dist loadgroup``): two Ray
clusters starting at once on a 2-core machine only slow each other down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from contract.runspec import RunSpec
from device_agent.store import PoolStore
from launcher.federation import Federation, items_budget
from launcher.run import federated_run
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from sim.model import OBSERVATIONS
from sim.params import BASE_PARAMS
from sim.populations import AGE_GROUPS, from_spec
from transport.flower.stub import TunnelRpcError, TunnelStub
from transport.flower.tunnel import (
    Answer,
    Call,
    TunnelError,
    TunnelMessage,
    TunnelReply,
    TunnelServer,
    request_key,
)
from transport.grpc.client import AwaitingReply

POPULATION = "synthetic:400"
POOLS = 2
THETA = {"beta": 0.6, "mortality": 0.5, "init_frac": 0.05}
WIDTH = 1 + len(BASE_PARAMS)


def make_spec(seed: int, days: int, mode: str = "mailbox", step_timeout_s: float = 60.0) -> RunSpec:
    """A small run: ideal radio, two pools."""
    return RunSpec(
        population=POPULATION,
        days=days,
        seed=seed,
        mode=mode,
        theta=dict(THETA),
        items_per_device=items_budget(from_spec(POPULATION, seed=seed), POOLS),
        advertising_intervals=4,
        radio="ideal",
        pools=POOLS,
        step_timeout_s=step_timeout_s,
    )


# -- the tunnel's records and state (transport-free) ------------------------------------------
class _Gateway:
    """A stand-in DeviceGateway servicer recording the identity each call arrived with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.refuse: grpc.StatusCode | None = None

    def _serve(self, method: str, context: Any) -> None:
        pems = context.auth_context().get("x509_pem_cert", [])
        self.calls.append((method, pems[0] if pems else b""))
        if self.refuse is not None:
            context.abort(self.refuse, f"{method} refused")

    def Enrol(self, request: pb.EnrolRequest, context: Any) -> pb.EnrolResponse:
        self._serve("Enrol", context)
        return pb.EnrolResponse(credential_id="ab" * 16, client_certificate_der=b"der")

    def RegisterSlots(self, request: pb.RegisterSlotsRequest, context: Any) -> Any:
        self._serve("RegisterSlots", context)
        return pb.RegisterSlotsResponse(
            results=[pb.RegistrationResult(device=common_pb2.DeviceId(value=b"x" * 16))]
        )


def _register(round_id: int) -> pb.RegisterSlotsRequest:
    return pb.RegisterSlotsRequest(round_id=round_id)


def test_records_round_trip_and_bad_records_are_named() -> None:
    msg = TunnelMessage(b"sched", [Answer(b"k" * 32, b"r"), Answer(b"j" * 32, code="NOT_FOUND")])
    assert TunnelMessage.from_fields(msg.to_fields()) == msg
    reply = TunnelReply(False, [Call("RegisterSlots", b"\x08\x01")])
    assert TunnelReply.from_fields(reply.to_fields()) == reply
    with pytest.raises(TunnelError, match="missing or mistyped field 'keys'"):
        TunnelMessage.from_fields({"schedule": b"", "token": ""})
    fields = msg.to_fields()
    fields["codes"] = ["OK"]
    with pytest.raises(TunnelError, match="differ in length"):
        TunnelMessage.from_fields(fields)
    with pytest.raises(TunnelError, match=r"unknown method\(s\) \['GetRound'\]"):
        TunnelReply.from_fields({"done": False, "methods": ["GetRound"], "requests": [b""]})


def test_server_runs_calls_as_the_bound_credential_and_keeps_answers_per_round() -> None:
    gateway = _Gateway()
    enrolled: list[int] = []
    server = TunnelServer(gateway, lambda node, reply: enrolled.append(node))
    req = _register(7).SerializeToString()
    # not enrolled yet: refused without reaching the gateway, and the refusal is sent once
    server.run(5, [Call("RegisterSlots", req)])
    (answer,) = server.message(5, b"s").answers
    assert (answer.code, answer.detail) == ("UNAUTHENTICATED", "node 5 has not enrolled")
    assert server.message(5, b"s").answers == [] and gateway.calls == []
    # enrolment runs with no identity and reports the node; calls then carry its certificate
    server.run(5, [Call("Enrol", pb.EnrolRequest(token="t").SerializeToString())])
    assert enrolled == [5] and gateway.calls == [("Enrol", b"")]
    server.bind(5, b"CERT-5")
    server.new_round(7)
    server.run(5, [Call("RegisterSlots", req)])
    assert gateway.calls[-1] == ("RegisterSlots", b"CERT-5")
    kept = server.message(5, b"s").answers
    assert [a.key for a in kept] == [request_key("RegisterSlots", req)] and not kept[0].code
    assert server.message(5, b"s").answers == kept  # kept for the whole round
    assert server.message(6, b"s").answers == []  # and only for that node
    server.new_round(8)
    assert server.message(5, b"s").answers == []
    # a retryable refusal is not kept (the node asks again); a final one is sent once
    gateway.refuse = grpc.StatusCode.UNAVAILABLE
    server.run(5, [Call("RegisterSlots", req)])
    assert server.message(5, b"s").answers == []
    gateway.refuse = grpc.StatusCode.PERMISSION_DENIED
    server.run(5, [Call("RegisterSlots", req)])
    assert [a.code for a in server.message(5, b"s").answers] == ["PERMISSION_DENIED"]
    # a request that does not parse is refused by name
    server.run(5, [Call("RegisterSlots", b"\xff\xff")])
    (bad,) = server.message(5, b"s").answers
    assert bad.code == "INVALID_ARGUMENT" and bad.detail.startswith("RegisterSlots:")


def test_stub_answers_from_the_message_or_queues_the_request() -> None:
    stub = TunnelStub()
    req = _register(3)
    with pytest.raises(AwaitingReply):
        stub.RegisterSlots(req, timeout=5)
    assert stub.reply(True) == TunnelReply(False, [Call("RegisterSlots", req.SerializeToString())])
    reply = pb.RegisterSlotsResponse(
        results=[pb.RegistrationResult(device=common_pb2.DeviceId(value=b"d" * 16))]
    )
    key = request_key("RegisterSlots", req.SerializeToString())
    stub.load(TunnelMessage(b"", [Answer(key, reply.SerializeToString())]))
    assert stub.RegisterSlots(req) == reply
    assert stub.RegisterSlots(req) == reply  # answers stay for the message
    assert stub.reply(True) == TunnelReply(True, [])
    stub.load(TunnelMessage(b"", [Answer(key, code="FAILED_PRECONDITION", detail="closed")]))
    with pytest.raises(TunnelRpcError) as err:
        stub.RegisterSlots(req)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "closed"
    with pytest.raises(AwaitingReply):  # a refusal is answered once: a retry goes out again
        stub.RegisterSlots(req)
    with pytest.raises(AttributeError):
        stub.GetRound  # noqa: B018 — not tunnelled: the schedule comes with the message


# -- whole runs on Flower's simulation engine ---------------------------------------------------
def _own(root: Path, i: int) -> dict[int, np.ndarray]:
    store = PoolStore(root / f"pool-{i}")
    try:
        rows = store.observed(0)
    finally:
        store.db.close()
    return {d: y.reshape(len(OBSERVATIONS), len(AGE_GROUPS), WIDTH) for d, y in rows.items()}


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
@pytest.mark.parametrize("mode", ["mailbox", "shuffled", "dense"])
def test_flower_transport_equals_grpc(tmp_path: Path, mode: str) -> None:
    """Same population, seed and θ: the opened aggregates, loss, gradient and bytes equal the
    gRPC transport's exactly."""
    spec = make_spec(11, 4, mode)
    flower = federated_run(spec, tmp_path / "flower", 11, timeout_s=300, transport="flower")
    grpc_run = federated_run(spec, tmp_path / "grpc", 11, timeout_s=300)
    y_f = Federation(tmp_path / "flower" / "state", spec, 11).results()["y"]
    y_g = Federation(tmp_path / "grpc" / "state", spec, 11).results()["y"]
    assert y_f.shape == (4, len(OBSERVATIONS), len(AGE_GROUPS), WIDTH)
    assert y_f[..., 0].sum() > 0, "a run without infections proves little"
    np.testing.assert_array_equal(y_f, y_g)
    for key in ("daily", "loss", "grad", "bytes_device_to_servers"):
        assert flower[key] == grpc_run[key], key
    # every pool ran as a Flower node with its own store, as under gRPC
    for i in range(POOLS):
        assert sorted(_own(tmp_path / "flower" / "state", i)) == [0, 1, 2, 3]


@pytest.mark.slow
@pytest.mark.xdist_group("flower")
def test_flower_node_that_fails_drops_out_as_under_grpc(tmp_path: Path) -> None:
    """Pool 1's node fails every message from day 2 on: its steps time out at the service
    exactly as a silent gRPC device's do, and every later aggregate is pool 0's own total."""
    from device_agent import flower_client
    from launcher.flower import simulate_federation

    drop_day, days = 2, 5
    # long enough that a healthy node never misses a step on a loaded 2-core machine; the
    # failed node costs one deadline (then it is absent and nobody waits for it)
    spec = make_spec(5, days, step_timeout_s=10.0)
    root = tmp_path / "state"
    fed = Federation(root, spec, 5)

    def failing(step: str, fields: Any, settings: dict[str, str]) -> dict[str, Any]:
        if settings["state-dir"].endswith("pool-1") and step != "enrol":
            sched = pb.RoundSchedule.FromString(bytes(fields["schedule"]))
            if sched.day >= drop_day:
                raise RuntimeError("pool 1 is gone")
        return flower_client.handle(step, fields, settings)

    try:
        simulate_federation(fed, handler=failing)
    finally:
        fed.stop()
    assert fed.finished()
    y = fed.results()["y"]
    own0, own1 = _own(root, 0), _own(root, 1)
    assert sorted(own0) == list(range(days)) and sorted(own1) == list(range(drop_day))
    for d in range(days):
        expected = own0[d] + own1[d] if d < drop_day else own0[d]
        np.testing.assert_array_equal(y[d, :, :, 0], expected[..., 0], err_msg=f"day {d}")
        np.testing.assert_allclose(y[d, :, :, 1:], expected[..., 1:], rtol=0, atol=1e-6)
    assert sum(own1[d][..., 0].sum() for d in own1) > 0, "pool 1 contributed while alive"
    import sqlite3

    conn = sqlite3.connect(root / "coordinator" / "coordinator.sqlite3")
    survivors = dict(conn.execute("SELECT day, surviving_observations FROM days").fetchall())
    conn.close()
    assert survivors == {d: 2 if d < drop_day else 1 for d in range(days)}
