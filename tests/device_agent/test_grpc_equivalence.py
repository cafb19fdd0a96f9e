"""The decentralized run over real gRPC with mutual TLS reproduces the central simulator.

In-process servers on ``127.0.0.1:0``: the aggregator's ``AggregatorLink`` (two secure-sum
deployments), and the coordinator's ``DeviceGateway`` whose ``CoordinatorServer`` objects
reach A through ``AggregatorLinkClient``. Two device pools connect through ``GrpcConnector``:
each pool splits into secure-sum participants, each presenting its own certificate from the
run's local CA. Daily aggregates must
equal the central run's bit for bit; refusals must come back with the right status and message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from contract.round import FederatedRun, RoundDriver
from contract.schedule import MESSAGES_PHASE, aggregates_codec, neighbourhood_codec
from device_agent.pool import DevicePool, SimulatedWorld
from identity.pki import LocalCA
from proto.decentsim.v1 import aggregator_pb2, aggregator_pb2_grpc, common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.framing import fragments
from proto.limits import DEVICE_MAX_REQUEST_BYTES, MAX_PAYLOAD_BYTES, Channel, server_options
from protocols.ble.radio import IdealRadio
from protocols.ble.simkeys import SimulatedKeyring
from protocols.secure_sum import (
    AggregatorServer,
    CoordinatorServer,
    Deployment,
    KeyPair,
    Mode,
    PhaseSpec,
    RoundSpec,
    SlotKind,
)
from protocols.secure_sum import errors as ss_errors
from protocols.secure_sum.messages import (
    DirectoryRequest,
    MailboxPost,
    OpenRound,
    RegisterRequest,
    RelayMailbox,
    RelayReceipt,
    decode,
)
from sim import dual
from sim.model import ModelConfig
from sim.params import BASE_PARAMS, Theta
from sim.populations import Population, synthetic
from sim.runner import CentralSimulator, RunResult, total_infections
from transport.grpc.client import (
    GatewayLink,
    GrpcConnector,
    RetryPolicy,
    Role,
    TransportError,
    call_with_retries,
)
from transport.grpc.gateway import DeviceGatewayServicer, status_of
from transport.grpc.link import (
    DEPLOYMENT_METADATA,
    AggregatorLinkClient,
    AggregatorLinkServicer,
    LinkUnavailable,
)

N, SEED, DAYS = 120, 3, 4
THETA = Theta(beta=0.6, init_frac=0.05)
CONFIG = ModelConfig()
ITEMS = 32
ADVERTISED = 4
FAST_FAIL = RetryPolicy(attempts=2, timeout_s=5.0, initial_backoff_s=0.01, jitter=0.0)


def _server(channel: Channel, pem: tuple[bytes, bytes, bytes]) -> tuple[grpc.Server, int]:
    root, key, chain = pem
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=server_options(channel))
    creds = grpc.ssl_server_credentials([(key, chain)], root, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port > 0
    return server, port


class _Service:
    """One secure-sum deployment as the round driver sees it (a ``SumService``)."""

    def __init__(self, link: AggregatorLinkServicer, a: AggregatorServer, c: CoordinatorServer):
        self._link, self._a, self._c = link, a, c

    @property
    def coordinator(self) -> CoordinatorServer:
        return self._c

    def open_round(self, spec: RoundSpec) -> None:
        with self._link.lock:  # A's operator opens from its own copy of the schedule
            self._a.open_round(spec)
        self._c.open_round(spec)  # over gRPC: A confirms the same spec


class Stack:
    """Aggregator + coordinator gRPC servers with TLS from one local CA."""

    def __init__(self, state: Path, mode: Mode) -> None:
        self.mode = mode
        self.ca = LocalCA.load_or_create(state, "decentsim test CA")
        self.servers: list[grpc.Server] = []
        self.channels: list[grpc.Channel] = []
        deployments, aggregators, coordinators = {}, {}, {}
        for name, codec, key in (
            ("neighbourhood", neighbourhood_codec(), os.urandom(32)),
            ("aggregates", aggregates_codec(), b""),
        ):
            c_keys, a_keys = KeyPair.generate(), KeyPair.generate()
            deployments[name] = Deployment(mode, codec, c_keys.public, a_keys.public, key)
            aggregators[name] = (a_keys, AggregatorServer(a_keys, deployments[name]))
            coordinators[name] = c_keys
        self.deployments = deployments
        # the aggregator process
        self.link = AggregatorLinkServicer({k: v[1] for k, v in aggregators.items()})
        a_pem = self.ca.issue_server_certificate(common_name="aggregator").grpc_pem()
        a_server, self.a_port = _server(Channel.LINK, a_pem)
        aggregator_pb2_grpc.add_AggregatorLinkServicer_to_server(self.link, a_server)
        # the coordinator process: its link to A, then its device gateway
        c_client = self.ca.issue_client_certificate("coordinator").grpc_pem()
        to_a = self.link_channel(c_client)
        c = {
            name: CoordinatorServer(
                coordinators[name], deployments[name], AggregatorLinkClient(to_a, mode, name)
            )
            for name in deployments
        }
        self.gateway = DeviceGatewayServicer(c["neighbourhood"], c["aggregates"])
        c_server, self.c_port = _server(
            Channel.DEVICE, self.ca.issue_server_certificate().grpc_pem()
        )
        pb_grpc.add_DeviceGatewayServicer_to_server(self.gateway, c_server)
        self.services = {
            name: _Service(self.link, aggregators[name][1], c[name]) for name in deployments
        }
        for server in (a_server, c_server):
            server.start()
            self.servers.append(server)
        self.connector = GrpcConnector(
            f"127.0.0.1:{self.c_port}",
            lambda d: tuple(self.ca.issue_client_certificate(d.hex()).grpc_pem()),
            deployments["neighbourhood"],
            deployments["aggregates"],
            RetryPolicy(attempts=3, timeout_s=20.0),
        )

    def link_channel(self, pem: tuple[bytes, bytes, bytes]) -> grpc.Channel:
        ch = grpc.secure_channel(f"127.0.0.1:{self.a_port}", grpc.ssl_channel_credentials(*pem))
        self.channels.append(ch)
        return ch

    def device_channel(self, pem: tuple[bytes, bytes, bytes], **options: int) -> grpc.Channel:
        ch = grpc.secure_channel(
            f"127.0.0.1:{self.c_port}",
            grpc.ssl_channel_credentials(*pem),
            options=list(options.items()),
        )
        self.channels.append(ch)
        return ch

    def close(self) -> None:
        self.connector.close()
        for ch in self.channels:
            ch.close()
        for server in self.servers:
            server.stop(grace=None)


@pytest.fixture(scope="module")
def population() -> Population:
    return synthetic(N, seed=1)


@pytest.fixture(scope="module")
def central(population: Population) -> RunResult:
    return CentralSimulator(population, CONFIG, SEED, dtype=torch.float64).run(
        THETA, DAYS, "forward"
    )


@pytest.fixture(scope="module")
def mailbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("mailbox"), Mode.MAILBOX)
    yield stack
    stack.close()


def _run(stack: Stack, population: Population, unit_devices: int) -> tuple[FederatedRun, int]:
    """The run over gRPC, and how many secure-sum participants (certificates) took part."""
    keyring = SimulatedKeyring(bytes(range(16)))
    world = SimulatedWorld(population, CONFIG, IdealRadio(keyring), ADVERTISED)
    perm = torch.randperm(population.n_agents, generator=torch.Generator().manual_seed(11))
    pools = [
        DevicePool.of_population(
            ids,
            population,
            CONFIG,
            SEED,
            keyring,
            world,
            stack.connector.connect,
            unit_devices=unit_devices,
        )
        for ids in (torch.sort(part).values for part in perm.chunk(2))
    ]
    driver = RoundDriver(
        stack.services["neighbourhood"],
        stack.services["aggregates"],
        pools,
        ITEMS,
        pools[0].world.advertising_intervals,
    )
    return driver.run(THETA, DAYS), sum(p.n_units for p in pools)


def _check_equivalence(
    run: FederatedRun, central: RunResult, mode: Mode, participants: int
) -> None:
    for day in range(DAYS):
        assert torch.equal(dual.value(run.y[day]), dual.value(central.y[day])), f"day {day}"
        # one observation item per participant; mailbox counts posts, shuffled items
        assert run.days[day].observations.surviving == participants
        expected = N * ITEMS if mode is Mode.SHUFFLED else participants
        assert run.days[day].messages.surviving == expected
    assert float(dual.value(run.y)[:, 0].sum()) > 5  # a real epidemic went over the wire
    _, grad_c = central.loss_and_grad()
    _, grad_f = run.loss_and_grad(total_infections)
    assert grad_c is not None
    torch.testing.assert_close(grad_f, grad_c, rtol=1e-6, atol=1e-9)
    assert run.daily()["new_infections"] == central.daily()["new_infections"]


def test_mailbox_run_over_grpc_equals_the_central_run(
    mailbox: Stack, population: Population, central: RunResult
) -> None:
    # pools of 60 devices in participants of at most 32: four certificates in all
    run, participants = _run(mailbox, population, unit_devices=32)
    assert participants == 4
    _check_equivalence(run, central, Mode.MAILBOX, participants)


@pytest.mark.parametrize(
    ("mode", "unit_devices", "participants"), [(Mode.SHUFFLED, 256, 2), (Mode.DENSE, 32, 4)]
)
def test_unlinkable_runs_over_grpc_equal_the_central_run(
    tmp_path: Path,
    population: Population,
    central: RunResult,
    mode: Mode,
    unit_devices: int,
    participants: int,
) -> None:
    stack = Stack(tmp_path, mode)
    try:
        run, got = _run(stack, population, unit_devices=unit_devices)
        assert got == participants
        _check_equivalence(run, central, mode, participants)
    finally:
        stack.close()


def _open_probe_round(stack: Stack, round_id: int) -> RoundSpec:
    width = 1 + len(BASE_PARAMS)
    spec = RoundSpec(round_id, (PhaseSpec(MESSAGES_PHASE, width, SlotKind.PSEUDONYM, 1),))
    stack.services["neighbourhood"].open_round(spec)
    return spec


def test_dense_posts_over_grpc_are_checked_and_sum_exactly(tmp_path: Path) -> None:
    """Through the real gateway in dense mode: a post naming slots, a truncated share block and
    a post for another round are each refused with a status and message that name the fault
    and change nothing; the honest posts then sum exactly into the registrant's day total."""
    stack = Stack(tmp_path, Mode.DENSE)
    try:
        rid = 902
        spec = _open_probe_round(stack, rid)
        alice_id, bob_id, mallory_id = os.urandom(16), os.urandom(16), os.urandom(16)
        alice, _ = stack.connector.participant(alice_id)
        bob, _ = stack.connector.participant(bob_id)
        mallory, _ = stack.connector.participant(mallory_id)
        (alice_slot,) = alice.register(rid, [os.urandom(16)])
        (bob_slot,) = bob.register(rid, [os.urandom(16)])
        coordinator = stack.services["neighbourhood"].coordinator
        coordinator.close_registration(rid)
        width = 1 + len(BASE_PARAMS)
        good = decode(mallory.build_post(spec, MESSAGES_PHASE, [alice_slot], np.ones((1, width))))
        assert isinstance(good, MailboxPost) and good.slot_ids == b""
        named = MailboxPost(**{**vars(good), "slot_ids": bytes(alice_slot)})
        cut = MailboxPost(**{**vars(good), "share_c": good.share_c[:-8]})
        stub = pb_grpc.DeviceGatewayStub(stack.connector.channel(mallory_id))
        refusals = []
        for msg, routed_round in ((named, rid), (cut, rid), (good, rid + 1)):
            reply = stub.PostShares(
                pb.PostSharesRequest(
                    round=common_pb2.RoundRef(round_id=routed_round, phase=MESSAGES_PHASE),
                    posts=[
                        pb.SharePost(
                            device=common_pb2.DeviceId(value=mallory_id),
                            item_count=len(msg.slot_ids) // 8,
                            dim=width,
                            payload=msg.to_bytes(),
                        )
                    ],
                ),
                timeout=5,
            )
            (result,) = reply.results
            assert result.WhichOneof("outcome") == "error"
            refusals.append((grpc.StatusCode(_code(result.error.code)).name, result.error.detail))
        assert refusals[0] == (
            "INVALID_ARGUMENT",
            "this deployment runs dense mode: a post covers the whole slot table and names its "
            "slots only in an aggregate phase (every aggregate slot, in order)",
        )
        assert refusals[1][0] == "INVALID_ARGUMENT"
        assert refusals[1][1].startswith("share block is 56 bytes; expected 2 × 4 int64")
        assert refusals[2][0] == "INVALID_ARGUMENT" and "routing field round_id" in refusals[2][1]
        assert coordinator.rounds[rid].accumulators.get(MESSAGES_PHASE) is None  # nothing kept
        # the honest posts: each a share of both slots; Bob's day total is Alice's message
        message = np.array([[0.5, -1.25, 2.0, 0.125]])
        assert alice.post(spec, MESSAGES_PHASE, [bob_slot], message)
        assert bob.post(spec, MESSAGES_PHASE, [alice_slot], 2 * message)
        coordinator.close_phase(rid, MESSAGES_PHASE)
        codec = bob.codec
        assert codec.decode(bob.fetch_ring(rid, MESSAGES_PHASE, [bob_slot])).tolist() == (
            message.tolist()
        )
        assert codec.decode(alice.fetch_ring(rid, MESSAGES_PHASE, [alice_slot])).tolist() == (
            (2 * message).tolist()
        )
    finally:
        stack.close()


def _code(value: int) -> tuple[int, str]:
    """The grpc.StatusCode value of a wire code number."""
    return next(c.value for c in grpc.StatusCode if c.value[0] == value)


def test_fetching_another_devices_slot_is_permission_denied(mailbox: Stack) -> None:
    rid = 900
    _open_probe_round(mailbox, rid)
    alice_id, bob_id = os.urandom(16), os.urandom(16)
    alice, _ = mailbox.connector.participant(alice_id)
    bob, _ = mailbox.connector.participant(bob_id)
    alice_slot, alice_other = alice.register(rid, [os.urandom(16), os.urandom(16)])
    (bob_slot,) = bob.register(rid, [os.urandom(16)])
    coordinator = mailbox.services["neighbourhood"].coordinator
    coordinator.close_registration(rid)
    coordinator.close_phase(rid, MESSAGES_PHASE)
    width = 1 + len(BASE_PARAMS)
    with pytest.raises(
        ss_errors.NotRegistrant,
        match=r"coordinator refused \(PERMISSION_DENIED\): slot [0-9a-f]{16} is registered "
        "to another participant",
    ):
        bob.fetch_ring(rid, MESSAGES_PHASE, [bob_slot, alice_slot])
    # the refusal changed nothing: the registrant still fetches its (empty) sums, in one batch
    both = alice.fetch_ring(rid, MESSAGES_PHASE, [alice_slot, alice_other])
    assert both.tolist() == [[0] * width] * 2
    # a retry of the identical request gets the identical reply; any other fetch is refused
    assert alice.fetch_ring(rid, MESSAGES_PHASE, [alice_slot, alice_other]).tolist() == (
        both.tolist()
    )
    with pytest.raises(ss_errors.AlreadyFetched, match=r"FAILED_PRECONDITION.*already fetched"):
        alice.fetch_ring(rid, MESSAGES_PHASE, [alice_slot])
    assert bob.fetch_ring(rid, MESSAGES_PHASE, [bob_slot]).shape == (1, width)


def test_the_peer_comes_from_the_certificate_not_the_body(mailbox: Stack) -> None:
    rid = 901
    _open_probe_round(mailbox, rid)
    alice_id, mallory_id = os.urandom(16), os.urandom(16)
    alice, _ = mailbox.connector.participant(alice_id)
    # Mallory sends a registration in Alice's name over her own certificate
    mallory_channel = mailbox.connector.channel(mallory_id)
    stub = pb_grpc.DeviceGatewayStub(mallory_channel)
    raw = RegisterRequest(alice_id, rid, os.urandom(8), b"sealed").to_bytes()
    details = []
    for claimed in (alice_id, mallory_id):
        reply = stub.RegisterSlots(
            pb.RegisterSlotsRequest(
                round_id=rid,
                registrations=[
                    pb.SlotRegistration(
                        device=common_pb2.DeviceId(value=claimed), slot_count=1, payload=raw
                    )
                ],
            ),
            timeout=5,
        )
        (result,) = reply.results
        assert result.WhichOneof("outcome") == "error"
        assert result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert result.error.reason == "NotRegistrant"
        details.append(result.error.detail)
    assert details == [
        "the entry names a device other than the one the client certificate authenticates",
        "the payload names a device other than its entry's",
    ]
    coordinator = mailbox.services["neighbourhood"].coordinator
    assert len(coordinator.rounds[rid].registry.table) == 0  # nothing was registered
    assert alice.register(rid, [os.urandom(16)])  # Alice herself still can


def test_device_with_a_certificate_from_another_ca_is_refused(
    mailbox: Stack, tmp_path: Path
) -> None:
    impostor = LocalCA.load_or_create(tmp_path / "impostor", "decentsim test CA")
    device = os.urandom(16)
    key, chain = impostor.issue_client_certificate(device.hex()).grpc_pem()[1:]
    channel = mailbox.device_channel((mailbox.ca.cert_pem, key, chain))
    waits: list[float] = []
    link = GatewayLink(channel, device, Role.NEIGHBOURHOOD, FAST_FAIL, sleep=waits.append)
    with pytest.raises(TransportError, match="GetDirectory failed with UNAVAILABLE after 2") as e:
        link(DirectoryRequest(0).to_bytes())
    assert e.value.code is grpc.StatusCode.UNAVAILABLE
    assert waits == [0.01]  # one backoff between the two attempts


def test_non_device_identities_are_refused_at_each_service(mailbox: Stack) -> None:
    aggregator_cert = tuple(mailbox.ca.issue_client_certificate("aggregator").grpc_pem())
    channel = mailbox.device_channel(aggregator_cert)
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.DeviceGatewayStub(channel).Heartbeat(pb.HeartbeatRequest(), timeout=5)
    assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "client certificate 'aggregator' is not a device identity" in e.value.details()
    # a device may not talk to the aggregator link
    device_cert = tuple(mailbox.ca.issue_client_certificate(os.urandom(16).hex()).grpc_pem())
    link = aggregator_pb2_grpc.AggregatorLinkStub(mailbox.link_channel(device_cert))
    req = aggregator_pb2.OpenRoundRequest(round_id=1, payload=OpenRound(1, bytes(32)).to_bytes())
    with pytest.raises(grpc.RpcError) as e:
        link.OpenRound(req, timeout=5)
    assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "may not use the aggregator link" in e.value.details()


def test_heartbeat_names_the_caller_only(mailbox: Stack) -> None:
    me, other = os.urandom(16), os.urandom(16)
    stub = pb_grpc.DeviceGatewayStub(mailbox.connector.channel(me))
    reply = stub.Heartbeat(
        pb.HeartbeatRequest(
            devices=[common_pb2.DeviceId(value=me), common_pb2.DeviceId(value=other)]
        ),
        timeout=5,
    )
    assert [d.value for d in reply.unknown_devices] == [other]
    assert reply.server_time_unix_ms > 0 and not reply.draining
    for call, req in ((stub.GetRound, pb.GetRoundRequest()), (stub.Enrol, pb.EnrolRequest())):
        with pytest.raises(grpc.RpcError) as e:
            call(req, timeout=5)
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "is not served by this gateway" in (e.value.details() or "")


def test_an_unreachable_aggregator_is_a_retryable_link_error() -> None:
    channel = grpc.insecure_channel("127.0.0.1:1")  # nothing listens on port 1
    link = AggregatorLinkClient(channel, Mode.MAILBOX, timeout_s=2.0)
    with pytest.raises(LinkUnavailable, match="aggregator link OpenRound failed with") as e:
        link(OpenRound(1, bytes(32)).to_bytes())
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    channel.close()


def test_oversized_requests_are_resource_exhausted(mailbox: Stack) -> None:
    device = os.urandom(16)
    pem = tuple(mailbox.ca.issue_client_certificate(device.hex()).grpc_pem())
    # a client that does not limit itself: the server refuses before parsing
    unlimited = mailbox.device_channel(pem, **{"grpc.max_send_message_length": -1})
    post = pb.SharePost(
        device=common_pb2.DeviceId(value=device), payload=bytes(DEVICE_MAX_REQUEST_BYTES + 1)
    )
    req = pb.PostSharesRequest(round=common_pb2.RoundRef(round_id=0, phase="m"), posts=[post])
    with pytest.raises(grpc.RpcError) as e:
        pb_grpc.DeviceGatewayStub(unlimited).PostShares(req, timeout=10)
    assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (e.value.details() or "")
    # one payload above the per-message limit inside a legal-sized request: per entry
    req.posts[0].payload = bytes(MAX_PAYLOAD_BYTES + 1)
    reply = pb_grpc.DeviceGatewayStub(unlimited).PostShares(req, timeout=10)
    (result,) = reply.results
    assert result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"exceeds MAX_PAYLOAD_BYTES ({MAX_PAYLOAD_BYTES})" in result.error.detail


def test_every_protocol_error_maps_to_a_specific_status() -> None:
    expected = {
        ss_errors.NotRegistrant: grpc.StatusCode.PERMISSION_DENIED,
        ss_errors.SlotAlreadyRegistered: grpc.StatusCode.ALREADY_EXISTS,
        ss_errors.ConflictingSubmission: grpc.StatusCode.ALREADY_EXISTS,
        ss_errors.UnknownSlot: grpc.StatusCode.NOT_FOUND,
        ss_errors.UnknownPhase: grpc.StatusCode.NOT_FOUND,
        ss_errors.PhaseClosed: grpc.StatusCode.FAILED_PRECONDITION,
        ss_errors.PhaseNotReleased: grpc.StatusCode.FAILED_PRECONDITION,
        ss_errors.AlreadyFetched: grpc.StatusCode.FAILED_PRECONDITION,
        ss_errors.WrongLength: grpc.StatusCode.INVALID_ARGUMENT,
        ss_errors.AuthenticationFailed: grpc.StatusCode.INVALID_ARGUMENT,
        ss_errors.OverflowBoundError: grpc.StatusCode.INVALID_ARGUMENT,
        ss_errors.AgreementError: grpc.StatusCode.ABORTED,
    }
    for cls, code in expected.items():
        assert status_of(cls("x")) is code, cls.__name__
    every = [
        c
        for c in vars(ss_errors).values()
        if isinstance(c, type) and issubclass(c, ss_errors.SecureSumError)
    ]
    assert all(status_of(c("x")) is not grpc.StatusCode.UNKNOWN for c in every)


def _relay_chunks(
    raw: bytes, round_id: int, post_count: int, chunk_bytes: int
) -> list[aggregator_pb2.RelayChunk]:
    return [
        aggregator_pb2.RelayChunk(
            round=common_pb2.RoundRef(round_id=round_id, phase="observations"),
            mode=common_pb2.MODE_MAILBOX,
            post_count=post_count,
            item_count=0,
            fragment=header,
            payload=data,
        )
        for header, data in fragments(raw, chunk_bytes)
    ]


def test_link_streams_fragments_and_checks_routing_fields(mailbox: Stack) -> None:
    rid = 902
    spec = RoundSpec(
        rid, (PhaseSpec("observations", 2, SlotKind.AGGREGATE, 1, ("global/day/902",)),)
    )
    mailbox.services["aggregates"].open_round(spec)
    cert = tuple(mailbox.ca.issue_client_certificate("coordinator").grpc_pem())
    stub = aggregator_pb2_grpc.AggregatorLinkStub(mailbox.link_channel(cert))
    meta = ((DEPLOYMENT_METADATA, "aggregates"),)
    raw = RelayMailbox(rid, "observations", (), (), ()).to_bytes()
    assert len(raw) > 20
    # many small fragments reassemble into one relay; A's answer comes back as fragments too
    chunks = _relay_chunks(raw, rid, 0, chunk_bytes=7)
    assert len(chunks) > 2
    answer = b"".join(c.payload for c in stub.RelaySealedBatch(iter(chunks), metadata=meta))
    assert decode(answer) == RelayReceipt(0, 0, 0)
    cases = [
        (_relay_chunks(raw, rid, 3, 7), "routing field post_count (3) disagrees"),
        (_relay_chunks(raw, rid, 0, 7)[::-1], "bad fragment stream: fragment"),
        (_relay_chunks(raw, rid + 1, 0, 7), "routing field round_id (903) disagrees"),
    ]
    for bad, message in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.RelaySealedBatch(iter(bad), metadata=meta, timeout=5))
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert message in (e.value.details() or "")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.RelaySealedBatch(iter(chunks), metadata=((DEPLOYMENT_METADATA, "x"),)))
    assert e.value.code() is grpc.StatusCode.NOT_FOUND


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"simulated {self._code.name}"


def test_retries_back_off_exponentially_on_unavailable_only() -> None:
    policy = RetryPolicy(attempts=4, timeout_s=1.5, initial_backoff_s=0.5, jitter=0.0)
    outcomes: list[object] = [
        _Failure(grpc.StatusCode.UNAVAILABLE),
        _Failure(grpc.StatusCode.DEADLINE_EXCEEDED),
        b"ok",
    ]
    timeouts: list[float] = []
    waits: list[float] = []

    def call(timeout: float) -> bytes:
        timeouts.append(timeout)
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        assert isinstance(out, bytes)
        return out

    assert call_with_retries(call, policy, "Probe", waits.append) == b"ok"
    assert waits == [0.5, 1.0] and timeouts == [1.5] * 3
    outcomes[:] = [_Failure(grpc.StatusCode.INVALID_ARGUMENT)]
    with pytest.raises(TransportError, match="Probe failed with INVALID_ARGUMENT: simulated"):
        call_with_retries(call, policy, "Probe", waits.append)
    assert waits == [0.5, 1.0]  # not retried
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)
