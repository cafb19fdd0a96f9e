"""Wire messages of decentsim.v1: round trips, the secure-sum payloads they carry, size limits,
and real in-process gRPC calls (insecure loopback channels: this test only)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from contract.schedule import UNIT_DEVICES
from proto import limits
from proto.decentsim.v1 import (
    aggregator_pb2,
    aggregator_pb2_grpc,
    common_pb2,
    device_pb2,
    device_pb2_grpc,
)
from proto.framing import Reassembler, fragments
from protocols.secure_sum import messages as ssm
from protocols.secure_sum import protocol
from protocols.secure_sum.config import Mode, PhaseSpec, RoundSpec, SlotKind
from protocols.secure_sum.protocol import MAX_DENSE_WORDS, AggregatorServer, InMemoryNetwork
from protocols.secure_sum.slots import SLOT_ID_BYTES
from sim.params import BASE_PARAMS

MODULES = (common_pb2, device_pb2, aggregator_pb2)
ALL_MESSAGES = [
    m.DESCRIPTOR.message_types_by_name[name]
    for m in MODULES
    for name in m.DESCRIPTOR.message_types_by_name
]


# -- round trips -------------------------------------------------------------------------------
def _scalar(field: FieldDescriptor, k: int) -> object:
    """A non-default value for a scalar field (k varies it between repeated elements)."""
    t = field.type
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes([field.number, k + 1]) * 8
    if t == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{k}-é"
    if t == FieldDescriptor.TYPE_BOOL:
        return True
    if t == FieldDescriptor.TYPE_DOUBLE:
        return 0.1 * (field.number + k) + 1e-300
    if t == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    # integers: include the top bit for 64-bit unsigned fields (round ids are u64)
    if t == FieldDescriptor.TYPE_UINT64:
        return (1 << 64) - 1 - k
    if t == FieldDescriptor.TYPE_INT64:
        return -(1 << 62) + k
    return field.number * 1000 + k + 1


def _fill(msg: Message, depth: int = 0) -> Message:
    """Set every field (the first member of each oneof) to a non-default value."""
    for field in msg.DESCRIPTOR.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[0] is not field:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for _ in range(2):
                    _fill(getattr(msg, field.name).add(), depth + 1)
            else:
                _fill(getattr(msg, field.name), depth + 1)
        elif field.is_repeated:
            getattr(msg, field.name).extend(_scalar(field, k) for k in range(3))
        else:
            setattr(msg, field.name, _scalar(field, 0))
    return msg


def _cls(desc: Descriptor) -> type[Message]:
    module = {m.DESCRIPTOR.name: m for m in MODULES}[desc.file.name]
    return getattr(module, desc.name)


@pytest.mark.parametrize("desc", ALL_MESSAGES, ids=lambda d: d.full_name)
def test_every_message_round_trips_with_every_field_set(desc: Descriptor) -> None:
    msg = _fill(_cls(desc)())
    raw = msg.SerializeToString(deterministic=True)
    back = _cls(desc).FromString(raw)
    assert back == msg
    assert back.SerializeToString(deterministic=True) == raw
    for field in desc.fields:
        oneof = field.containing_oneof
        if oneof is not None and oneof.fields[0] is not field:
            continue
        value = getattr(back, field.name)
        if field.is_repeated:
            assert len(value) >= 2, field.full_name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            assert back.HasField(field.name), field.full_name
        else:
            assert value == _scalar(field, 0), field.full_name


def test_all_messages_live_in_the_versioned_package() -> None:
    assert {d.full_name.rsplit(".", 1)[0] for d in ALL_MESSAGES} == {"decentsim.v1"}
    services = {
        s.full_name: [m.name for m in s.methods]
        for mod in (device_pb2, aggregator_pb2)
        for s in mod.DESCRIPTOR.services_by_name.values()
    }
    assert services == {
        "decentsim.v1.DeviceGateway": [
            "Enrol",
            "GetRound",
            "RegisterSlots",
            "GetDirectory",
            "PostShares",
            "FetchSums",
            "SubmitAggregates",
            "Heartbeat",
            "ReportFailure",
        ],
        "decentsim.v1.AggregatorLink": [
            "OpenRound",
            "RelayRegistrations",
            "CloseRegistration",
            "RelaySealedBatch",
            "ExchangeDigests",
            "ReleaseSums",
            "RelayFetches",
        ],
    }


def test_oneof_outcome_holds_payload_or_error_never_both() -> None:
    res = device_pb2.PostResult(payload=b"receipt")
    res.error.CopyFrom(common_pb2.ErrorDetail(code=9, reason="PhaseClosed", detail="closed"))
    assert res.WhichOneof("outcome") == "error"
    assert res.payload == b""
    back = device_pb2.PostResult.FromString(res.SerializeToString())
    assert back.WhichOneof("outcome") == "error"
    assert back.error.reason == "PhaseClosed"


def test_unknown_fields_from_a_newer_peer_survive_a_round_trip() -> None:
    # a v1 reader must tolerate (and keep) fields a later minor revision adds
    newer = common_pb2.RoundRef(round_id=7, phase="messages").SerializeToString()
    newer += bytes([0x78, 0x2A])  # field 15, varint 42
    parsed = common_pb2.RoundRef.FromString(newer)
    assert (parsed.round_id, parsed.phase) == (7, "messages")
    assert parsed.SerializeToString() == newer


# -- carrying the secure-sum protocol ----------------------------------------------------------
AGG = PhaseSpec("observations", 3, SlotKind.AGGREGATE, 2, ("global/day/0", "global/day/1"))


@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.SHUFFLED, Mode.DENSE])
def test_posts_carried_in_rpc_messages_reach_the_exact_sum(mode: Mode) -> None:
    net = InMemoryNetwork(mode)
    spec = RoundSpec(5, (AGG,))
    net.open_round(spec)
    values = {0: [[1.0, 2.0, -3.5], [0.25, 0.0, 1.0]], 1: [[4.0, -2.0, 0.5]]}
    devices = [net.device() for _ in values]
    request = device_pb2.SubmitAggregatesRequest(
        round=common_pb2.RoundRef(round_id=spec.round_id, phase=AGG.name)
    )
    slot_sets = {0: ["global/day/0", "global/day/1"], 1: ["global/day/1"]}
    for i, dev in enumerate(devices):
        raw = dev.build_post(spec, AGG.name, slot_sets[i], values[i])
        request.posts.add(
            device=common_pb2.DeviceId(value=dev.device_id),
            item_count=AGG.items_per_device,
            dim=AGG.dim,
            payload=raw,
        )
    wire = device_pb2.SubmitAggregatesRequest.FromString(request.SerializeToString())
    reply = device_pb2.SubmitAggregatesResponse()
    for post in wire.posts:
        assert post.item_count == AGG.items_per_device and post.dim == AGG.dim
        out = net.coordinator.handle_device(post.payload, post.device.value)
        reply.results.add(device=post.device, payload=out)
    back = device_pb2.SubmitAggregatesResponse.FromString(reply.SerializeToString())
    assert [ssm.PostReceipt.from_bytes(r.payload).fresh for r in back.results] == [1, 1]
    net.coordinator.close_phase(spec.round_id, AGG.name)
    sums = net.coordinator.open_aggregates(spec.round_id, AGG.name)
    np.testing.assert_array_equal(sums["global/day/0"], [1.0, 2.0, -3.5])
    np.testing.assert_array_equal(sums["global/day/1"], [4.25, -2.0, 1.5])


# -- limits ------------------------------------------------------------------------------------
def test_gRPC_options_mirror_the_named_limits() -> None:
    assert limits.server_options(limits.Channel.DEVICE) == [
        ("grpc.max_receive_message_length", limits.DEVICE_MAX_REQUEST_BYTES),
        ("grpc.max_send_message_length", limits.DEVICE_MAX_RESPONSE_BYTES),
    ]
    assert limits.channel_options(limits.Channel.DEVICE) == [
        ("grpc.max_send_message_length", limits.DEVICE_MAX_REQUEST_BYTES),
        ("grpc.max_receive_message_length", limits.DEVICE_MAX_RESPONSE_BYTES),
    ]
    for opts in (
        limits.server_options(limits.Channel.LINK),
        limits.channel_options(limits.Channel.LINK),
    ):
        assert dict(opts) == {
            "grpc.max_receive_message_length": limits.LINK_MAX_MESSAGE_BYTES,
            "grpc.max_send_message_length": limits.LINK_MAX_MESSAGE_BYTES,
        }


def test_limits_are_consistent() -> None:
    page = limits.MAX_DIRECTORY_PAGE_SLOTS * SLOT_ID_BYTES
    assert page + 1024 <= limits.DEVICE_MAX_REQUEST_BYTES
    assert page + 1024 <= limits.DEVICE_MAX_RESPONSE_BYTES
    # one payload at the per-message limit still fits a request with its routing fields
    assert limits.MAX_PAYLOAD_BYTES + 1024 <= limits.DEVICE_MAX_REQUEST_BYTES
    # a full pool participant (UNIT_DEVICES devices) may post 64 distinct beacons per device
    assert UNIT_DEVICES * 64 <= limits.MAX_ITEMS_PER_POST <= protocol.MAX_ITEMS_PER_POST
    assert limits.LINK_CHUNK_BYTES + 4096 <= limits.LINK_MAX_MESSAGE_BYTES
    assert limits.LINK_MAX_PAYLOAD_BYTES < 2**31  # protobuf's ceiling for one message


#: Bytes of one sealed envelope: version, 8-byte key id, 32-byte ephemeral key, 16-byte tag.
_ENVELOPE = 57


def _documented_size(mode: Mode, items: int, dim: int) -> int:
    """A post's size by the layout ``proto.limits`` documents (fixed headers left out)."""
    if mode is Mode.MAILBOX:  # slot ids, C-shares, one sealed 48-byte seed + digest
        return SLOT_ID_BYTES * items + 8 * items * dim + _ENVELOPE + 48
    # an outer envelope of sealed C-items (id, slot, share) + length-prefixed sealed A-items
    c_items = items * (_ENVELOPE + 16 + SLOT_ID_BYTES + 8 * dim)
    return _ENVELOPE + c_items + items * (4 + _ENVELOPE + 32 + SLOT_ID_BYTES)


def _batch_of(raw: bytes, posts: int, items: int, dim: int) -> device_pb2.PostSharesRequest:
    batch = device_pb2.PostSharesRequest(round=common_pb2.RoundRef(round_id=1, phase="obs"))
    for k in range(posts):
        batch.posts.add(
            device=common_pb2.DeviceId(value=bytes([k + 1]) * 16),
            item_count=items,
            dim=dim,
            payload=raw,
        )
    return batch


def test_worst_case_mailbox_post_fits_the_payload_limit() -> None:
    """A real mailbox post at MAX_ITEMS_PER_POST × MAX_DIM, built by the secure-sum client."""
    items, dim = limits.MAX_ITEMS_PER_POST, limits.MAX_DIM
    phase = PhaseSpec("obs", dim, SlotKind.AGGREGATE, items, ("global/day/0",))
    net = InMemoryNetwork(Mode.MAILBOX)
    spec = RoundSpec(1, (phase,))
    net.open_round(spec)
    raw = net.device().build_post(spec, "obs", ["global/day/0"], np.ones((1, dim)))
    assert 0 <= len(raw) - _documented_size(Mode.MAILBOX, items, dim) <= 1024
    assert 0.5 * limits.MAX_PAYLOAD_BYTES < len(raw) <= limits.MAX_PAYLOAD_BYTES
    # the worst-case post fits one request with its routing fields
    assert _batch_of(raw, 1, items, dim).ByteSize() <= limits.DEVICE_MAX_REQUEST_BYTES


def test_full_pooled_shuffled_messages_post_fits_the_payload_limit() -> None:
    """A shuffled messages-phase post of a full pool participant (UNIT_DEVICES devices × 64
    items of dim 1 + p = 4: MAX_ITEMS_PER_POST items) fits the limits. Its size follows the
    documented layout, checked byte for byte on a real post of a 1/16 participant (building
    the full one would seal 2 × 65,536 envelopes)."""
    dim, per_device = 1 + len(BASE_PARAMS), limits.MAX_ITEMS_PER_POST // UNIT_DEVICES
    phase = PhaseSpec("messages", dim, SlotKind.PSEUDONYM, per_device)
    net = InMemoryNetwork(Mode.SHUFFLED, deployment_key=bytes(range(32)))
    spec = RoundSpec(1, (phase,))
    net.open_round(spec)
    (slot,) = net.device().register(1, [bytes(16)])
    net.coordinator.close_registration(1)
    part = net.device(devices=UNIT_DEVICES // 16)
    raw = part.build_post(spec, "messages", [slot], np.ones((1, dim)))
    items = UNIT_DEVICES // 16 * per_device
    assert len(ssm.ShuffledPost.from_bytes(raw).items_for_a) == items
    assert 0 <= len(raw) - _documented_size(Mode.SHUFFLED, items, dim) <= 1024
    full = _documented_size(Mode.SHUFFLED, limits.MAX_ITEMS_PER_POST, dim) + 1024
    assert UNIT_DEVICES * per_device == limits.MAX_ITEMS_PER_POST
    assert full <= limits.MAX_PAYLOAD_BYTES
    # a pool's batch of 4 full participants' posts fits one request
    assert 4 * (full + 64) <= limits.DEVICE_MAX_REQUEST_BYTES


def test_largest_dense_post_fits_the_payload_limit() -> None:
    """A dense post is ``8 · slots · dim`` bytes of C-shares (no slot ids in a pseudonym phase)
    plus one sealed seed, checked byte for byte on a real post; at its bound
    (``MAX_DENSE_WORDS`` words) it fits one payload."""
    dim = 1 + len(BASE_PARAMS)
    phase = PhaseSpec("messages", dim, SlotKind.PSEUDONYM, 4)
    net = InMemoryNetwork(Mode.DENSE, deployment_key=bytes(range(32)))
    spec = RoundSpec(1, (phase,))
    net.open_round(spec)
    slots = net.device().register(1, [bytes([i]) * 16 for i in range(50)])
    net.coordinator.close_registration(1)
    raw = net.device().build_post(spec, "messages", slots[:3], np.ones((3, dim)))
    post = ssm.MailboxPost.from_bytes(raw)
    assert post.slot_ids == b"" and len(post.share_c) == 8 * 50 * dim
    assert 0 <= len(raw) - (8 * 50 * dim + _ENVELOPE + 48) <= 1024
    assert 8 * MAX_DENSE_WORDS + _ENVELOPE + 48 + 1024 <= limits.MAX_PAYLOAD_BYTES


# -- real gRPC ---------------------------------------------------------------------------------
class _Gateway(device_pb2_grpc.DeviceGatewayServicer):
    """Only Heartbeat: echoes the device count and progress, stamps a server time."""

    def __init__(self) -> None:
        self.calls = 0

    def Heartbeat(
        self, request: device_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> device_pb2.HeartbeatResponse:
        self.calls += 1
        return device_pb2.HeartbeatResponse(
            server_time_unix_ms=request.client_time_unix_ms + 5,
            current=request.progress,
            next_heartbeat_ms=1000 * len(request.devices),
        )


class _Link(aggregator_pb2_grpc.AggregatorLinkServicer):
    """Only RelaySealedBatch: reassembles, hands the bytes to a real AggregatorServer."""

    def __init__(self, aggregator: AggregatorServer, chunk_bytes: int) -> None:
        self.aggregator = aggregator
        self.chunk_bytes = chunk_bytes
        self.fragments_in = 0

    def RelaySealedBatch(
        self, request_iterator: Iterator[aggregator_pb2.RelayChunk], context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.LinkChunk]:
        asm = Reassembler()
        for chunk in request_iterator:
            asm.add(chunk.fragment, chunk.payload)
            self.fragments_in += 1
        reply = self.aggregator.handle(asm.payload())
        for header, data in fragments(reply, self.chunk_bytes):
            yield aggregator_pb2.LinkChunk(fragment=header, payload=data)


@pytest.fixture
def gateway() -> Iterator[tuple[str, _Gateway]]:
    servicer = _Gateway()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=limits.server_options(limits.Channel.DEVICE),
    )
    device_pb2_grpc.add_DeviceGatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(grace=None)


def _oversized_heartbeat() -> device_pb2.HeartbeatRequest:
    req = device_pb2.HeartbeatRequest(
        devices=[common_pb2.DeviceId(value=bytes(limits.DEVICE_MAX_REQUEST_BYTES))]
    )
    assert req.ByteSize() > limits.DEVICE_MAX_REQUEST_BYTES
    return req


def test_heartbeat_over_real_grpc(gateway: tuple[str, _Gateway]) -> None:
    target, servicer = gateway
    opts = limits.channel_options(limits.Channel.DEVICE)
    with grpc.insecure_channel(target, options=opts) as channel:
        stub = device_pb2_grpc.DeviceGatewayStub(channel)
        reply = stub.Heartbeat(
            device_pb2.HeartbeatRequest(
                devices=[common_pb2.DeviceId(value=bytes([i]) * 16) for i in range(3)],
                progress=common_pb2.RoundRef(round_id=12, phase="messages"),
                client_time_unix_ms=1_700_000_000_000,
            ),
            timeout=10,
        )
    assert reply.server_time_unix_ms == 1_700_000_000_005
    assert (reply.current.round_id, reply.current.phase) == (12, "messages")
    assert reply.next_heartbeat_ms == 3000
    assert servicer.calls == 1


def test_server_refuses_a_request_above_its_limit(gateway: tuple[str, _Gateway]) -> None:
    target, servicer = gateway
    # a client that does not apply our options: the server must refuse on its own
    with grpc.insecure_channel(target) as channel:
        stub = device_pb2_grpc.DeviceGatewayStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(_oversized_heartbeat(), timeout=10)
        assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in err.value.details()
        # the servicer never ran, and the server still serves normal requests
        assert servicer.calls == 0
        ok = stub.Heartbeat(device_pb2.HeartbeatRequest(client_time_unix_ms=1), timeout=10)
    assert ok.server_time_unix_ms == 6
    assert servicer.calls == 1


def test_client_with_our_options_refuses_to_send_oversized(
    gateway: tuple[str, _Gateway],
) -> None:
    target, servicer = gateway
    opts = limits.channel_options(limits.Channel.DEVICE)
    with grpc.insecure_channel(target, options=opts) as channel:
        stub = device_pb2_grpc.DeviceGatewayStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(_oversized_heartbeat(), timeout=10)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert servicer.calls == 0


def test_fragmented_relay_reaches_the_aggregator_over_grpc() -> None:
    """A multi-fragment RelayMailbox streamed to a real AggregatorServer; its ErrorReply
    (the round is not open at A) streams back and decodes to the typed refusal."""
    net = InMemoryNetwork(Mode.MAILBOX)
    n = 3000
    relay = ssm.RelayMailbox(
        99, "messages", (b"\x01" * 16,) * n, (b"\x02" * 512,) * n, (b"\x03" * 105,) * n
    ).to_bytes()
    chunk = 256 * 1024
    servicer = _Link(net.aggregator, chunk_bytes=16)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=limits.server_options(limits.Channel.LINK),
    )
    aggregator_pb2_grpc.add_AggregatorLinkServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        opts = limits.channel_options(limits.Channel.LINK)
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
            stub = aggregator_pb2_grpc.AggregatorLinkStub(channel)
            chunks = (
                aggregator_pb2.RelayChunk(
                    round=common_pb2.RoundRef(round_id=99, phase="messages"),
                    mode=common_pb2.MODE_MAILBOX,
                    post_count=n,
                    item_count=n * 32,
                    fragment=header,
                    payload=data,
                )
                for header, data in fragments(relay, chunk)
            )
            asm = Reassembler()
            n_back = 0
            for back in stub.RelaySealedBatch(chunks, timeout=10):
                asm.add(back.fragment, back.payload)
                n_back += 1
    finally:
        server.stop(grace=None)
    assert servicer.fragments_in == -(-len(relay) // chunk) > 1
    reply = ssm.decode(asm.payload())
    assert isinstance(reply, ssm.ErrorReply)
    assert reply.error == "UnknownRound"
    assert "round 99 is not open on the aggregator" in reply.detail
    assert n_back == -(-len(reply.to_bytes()) // 16) > 1
