"""Fuzzing the coordinator's device gateway over real gRPC with mutual TLS.

An in-process aggregator and coordinator service run a two-day round schedule (mailbox, and
dense: the same messages under its own rules) for two enrolled credentials: Alice (honest) and
Mallory (honest in her own steps, but she also sends thousands of random and malformed
requests). Every refusal must come back with a specific
status code (per entry in batched RPCs, else as the call's status) and a message naming the
problem, never UNKNOWN or INTERNAL; afterwards the servers are intact: each step completes,
the neighbourhood sums and the opened aggregates are exactly the honest posts, and the
databases and view logs hold exactly the honest run.

The fuzzing is seeded (``FUZZ_SEED`` overrides the seed, to explore other inputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aggregator.service import AggregatorService, aggregator_init
from contract.runspec import RunSpec
from contract.schedule import MESSAGES_PHASE, OBSERVATIONS_PHASE, round_specs
from contract.wire import deployment_from_pb
from coordinator.service import MAX_UNITS_PER_CREDENTIAL, CoordinatorService, coordinator_init
from identity.enrolment import build_enrolment_csr
from identity.pki import generate_private_key
from proto.decentsim.v1 import common_pb2
from proto.decentsim.v1 import device_pb2 as pb
from proto.decentsim.v1 import device_pb2_grpc as pb_grpc
from proto.limits import MAX_ENTRIES_PER_BATCH, MAX_PAYLOAD_BYTES, Channel, channel_options
from protocols.secure_sum import DeviceClient, Mode, RoundSpec
from protocols.secure_sum import errors as ss_errors
from protocols.secure_sum.messages import (
    DirectoryRequest,
    DirectoryResponse,
    FetchRequest,
    MailboxPost,
    Message,
    PostReceipt,
    RegisterRequest,
    ShuffledPost,
    decode,
)
from protocols.secure_sum.slots import SLOT_ID_BYTES as S
from transport.grpc.client import GatewayLink, RetryPolicy, Role

DAYS = 2
ITEMS = 4
SC = grpc.StatusCode
#: Status codes no refusal may carry: they mean an unhandled server error.
NEVER = {SC.UNKNOWN, SC.INTERNAL, SC.OK}
POLICY = RetryPolicy(attempts=2, timeout_s=20.0, initial_backoff_s=0.05, jitter=0.0)

#: what a malformed payload is refused for: it does not decode, is another message type, or its
#: routing fields (round, phase, device, counts) disagree with the request's
#: (a whole-call refusal prefixes the error class: "MessageError: ...")
MALFORMED = (
    r"^(MessageError: )?"
    r"(payload is not decodable: |payload is a \w+; this RPC carries |routing field )"
)


# -- servers and credentials -------------------------------------------------------------------
@dataclass
class Credential:
    """An enrolled credential: its channel, stub and participant clients."""

    credential_id: str
    channel: grpc.Channel
    stub: pb_grpc.DeviceGatewayStub
    pid: bytes
    nbhd: DeviceClient
    aggr: DeviceClient


@dataclass
class Federation:
    """The running servers and what the test needs to talk to them."""

    root: Path
    svc: CoordinatorService
    aggregator: AggregatorService
    target: str
    enrol_stub: pb_grpc.DeviceGatewayStub
    ca_pem: bytes
    channels: list[grpc.Channel]

    def credential(self, token: str) -> Credential:
        """Enrol with ``token`` (one participant) and connect with the issued certificate."""
        key = generate_private_key()
        reply = self.enrol_stub.Enrol(_enrol_request(token, key_csr(key)), timeout=20)
        assert len(reply.devices) == 1
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert = x509.load_der_x509_certificate(reply.client_certificate_der)
        creds = grpc.ssl_channel_credentials(
            self.ca_pem, key_pem, cert.public_bytes(serialization.Encoding.PEM)
        )
        channel = grpc.secure_channel(self.target, creds, options=channel_options(Channel.DEVICE))
        self.channels.append(channel)
        deployments = {d.deployment_id: deployment_from_pb(d) for d in reply.deployments}
        pid = bytes(reply.devices[0].value)
        nbhd = GatewayLink(channel, pid, Role.NEIGHBOURHOOD, POLICY)
        aggr = GatewayLink(channel, pid, Role.AGGREGATES, POLICY)
        return Credential(
            reply.credential_id,
            channel,
            pb_grpc.DeviceGatewayStub(channel),
            pid,
            DeviceClient(pid, deployments["neighbourhood"], nbhd),
            DeviceClient(pid, deployments["aggregates"], aggr),
        )


def key_csr(key: Any) -> bytes:
    """A DER CSR for ``key`` (as the device agent builds it)."""
    pem = build_enrolment_csr(key)
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _enrol_request(token: str, csr_der: bytes, count: int = 1) -> pb.EnrolRequest:
    """An Enrol request for ``count`` participants."""
    return pb.EnrolRequest(token=token, csr_der=csr_der, device_count=count, agent_version="1")


@pytest.fixture(params=[Mode.MAILBOX, Mode.DENSE], ids=lambda m: m.value)
def federation(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Federation]:
    """A real aggregator and coordinator service (mailbox or dense mode) on loopback ports."""
    mode = request.param
    c_dir, a_dir = tmp_path / "c", tmp_path / "a"
    c_export = coordinator_init(c_dir, ("localhost", "127.0.0.1"))
    a_export = aggregator_init(a_dir, ("localhost", "127.0.0.1"))
    aggregator = AggregatorService(a_dir, mode, c_export)
    a_port = aggregator.serve("127.0.0.1:0")
    spec = RunSpec(
        population="synthetic:300",
        days=DAYS,
        pools=2,
        items_per_device=ITEMS,
        advertising_intervals=BEACONS,
        step_timeout_s=30,
        mode=mode.value,
    )
    svc = CoordinatorService(c_dir, spec, f"127.0.0.1:{a_port}", a_export)
    port, enrol_port = svc.serve("127.0.0.1:0", "127.0.0.1:0")
    ca_pem = (c_export / "ca.pem").read_bytes()
    enrol_channel = grpc.secure_channel(
        f"127.0.0.1:{enrol_port}", grpc.ssl_channel_credentials(ca_pem)
    )
    fed = Federation(
        tmp_path,
        svc,
        aggregator,
        f"127.0.0.1:{port}",
        pb_grpc.DeviceGatewayStub(enrol_channel),
        ca_pem,
        [enrol_channel],
    )
    try:
        yield fed
    finally:
        for channel in fed.channels:
            channel.close()
        svc.stop()
        aggregator.stop()


# -- checking refusals -------------------------------------------------------------------------
@dataclass
class Tally:
    """How many refusals were checked, by status code."""

    counts: dict[str, int]

    def add(self, code: SC) -> None:
        """Count one checked refusal."""
        self.counts[code.name] = self.counts.get(code.name, 0) + 1

    @property
    def total(self) -> int:
        """Refusals checked in all."""
        return sum(self.counts.values())


def _code(number: int) -> SC:
    """The status code of a status number."""
    return next(c for c in SC if c.value[0] == number)


def check_entries(
    tally: Tally,
    results: Sequence[Any],
    expected: dict[SC, str],
    what: str,
) -> None:
    """Every per-entry result is a refusal with an expected code and a message matching it."""
    for k, result in enumerate(results):
        assert result.WhichOneof("outcome") == "error", f"{what}[{k}] was accepted"
        code = _code(result.error.code)
        assert code not in NEVER, f"{what}[{k}]: {code.name}: {result.error.detail}"
        assert code in expected, f"{what}[{k}]: unexpected {code.name}: {result.error.detail}"
        assert result.error.reason, f"{what}[{k}] has no reason"
        assert re.search(expected[code], result.error.detail), (
            f"{what}[{k}]: {code.name} detail {result.error.detail!r} does not match "
            f"{expected[code]!r}"
        )
        tally.add(code)


def check_call(tally: Tally, call: Callable[[], Any], expected: dict[SC, str], what: str) -> None:
    """The call fails as a whole with an expected code and a message matching it."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    code, detail = info.value.code(), info.value.details() or ""
    assert code not in NEVER, f"{what}: {code.name}: {detail}"
    assert code in expected, f"{what}: unexpected {code.name}: {detail}"
    assert re.search(expected[code], detail), f"{what}: {detail!r} !~ {expected[code]!r}"
    tally.add(code)


def wait_step(stub: pb_grpc.DeviceGatewayStub, step: str, day: int) -> pb.RoundSchedule:
    """Long-poll GetRound until the run is at ``step`` of ``day``."""
    version, deadline = 0, time.time() + 30
    while time.time() < deadline:
        sched = stub.GetRound(pb.GetRoundRequest(newer_than=version, wait_ms=2000), timeout=10)
        if sched.step == step and sched.day == day:
            return sched
        version = sched.version
    raise AssertionError(f"the run never reached step {step!r} of day {day}")


# -- building requests -------------------------------------------------------------------------
def device(pid: bytes) -> common_pb2.DeviceId:
    """The wire id of a participant."""
    return common_pb2.DeviceId(value=pid)


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """A broken copy of a valid payload: truncated, extended, or with its header damaged."""
    how = rng.randrange(4)
    if how == 0:
        return raw[: rng.randrange(len(raw))]
    if how == 1:
        return raw + rng.randbytes(rng.randint(1, 64))
    if how == 2:  # a field's declared length (the u32 after the 4-byte header) grows
        (n,) = struct.unpack(">I", raw[4:8])
        return raw[:4] + struct.pack(">I", n + rng.randint(1, 1 << 20)) + raw[8:]
    # magic, version or message type damaged
    k = rng.randrange(4)
    return raw[:k] + bytes([raw[k] ^ rng.randint(1, 255)]) + raw[k + 1 :]


def junk(rng: random.Random) -> bytes:
    """Random bytes, sometimes behind a valid header (to get past the magic check)."""
    body = rng.randbytes(rng.randint(0, 200))
    if rng.random() < 0.5:
        return b"DS\x02" + bytes([rng.randint(1, 9)]) + body
    return body


def structured(rng: random.Random, kind: type[Message], pid: bytes, rid: int, phase: str) -> bytes:
    """A well-formed ``kind`` message of participant ``pid`` with random contents: it decodes
    and its routing fields agree with the request, so the protocol's own checks must refuse it."""

    def ids() -> bytes:
        return rng.randbytes(S * rng.choice([0, 1, 2, 4, 8, 33]) + rng.choice([0, 0, 0, 7]))

    def blob() -> bytes:
        return rng.randbytes(rng.choice([0, 1, 16, 57, 105, 300]))

    if kind is RegisterRequest:
        return RegisterRequest(pid, rid, ids(), blob()).to_bytes()
    if kind is FetchRequest:
        return FetchRequest(pid, rid, phase, ids(), blob()).to_bytes()
    if kind is MailboxPost:
        slot_ids = ids()
        dim = rng.choice([0, 1, 3, 4, 5, 64, 48])
        words = (len(slot_ids) // S) * dim + rng.choice([0, 0, 1, -1])
        return MailboxPost(
            pid, rid, phase, dim, slot_ids, rng.randbytes(8 * max(words, 0)), blob()
        ).to_bytes()
    items = tuple(blob() for _ in range(rng.choice([0, 1, 4, 8])))
    return ShuffledPost(pid, rid, phase, blob(), items).to_bytes()


def wrong_dim_post(post: MailboxPost, rng: random.Random) -> MailboxPost:
    """The same post with a dim that disagrees with the phase (shares resized to match)."""
    items = len(post.slot_ids) // S
    dim = post.dim + rng.choice([-3, -1, 1, 5])
    return MailboxPost(
        post.device_id,
        post.round_id,
        post.phase,
        dim,
        post.slot_ids,
        rng.randbytes(8 * items * dim),
        post.sealed_for_a,
    )


def replaced(msg: Message, **changes: Any) -> bytes:
    """``msg`` with some fields changed, encoded."""
    fields = {**vars(msg), **changes}
    return type(msg)(**fields).to_bytes()


# -- fuzzing, RPC by RPC ----------------------------------------------------------------------
#: an entry acting for a participant the certificate's credential does not own
#: beacons each participant registers a day: one slot group, released only as its total
BEACONS = 2
NOT_YOURS = {SC.PERMISSION_DENIED: r"names a device other than"}
#: a well-formed message with random contents: refused by the protocol's own checks at C, or
#: by A (envelopes it cannot open, slot lists that differ from the sealed one)
STRUCTURED = {
    SC.INVALID_ARGUMENT: r"^(aggregator refused: (unsupported )?envelope|slot ids: \d+ bytes is "
    r"not a multiple of 8|a fetch names \d+\.\.\d+ slots|phase '\w+' (has dim|takes m × "
    r"items_per_device)|share block is \d+ bytes|sealed A-part must be present in mailbox mode|"
    r"this deployment runs (mailbox|dense) mode)",
    SC.NOT_FOUND: r"^(unknown slot [0-9a-f]{16} \(not registered|slot [0-9a-f]{16} is not "
    r"registered)",
    SC.PERMISSION_DENIED: r"^(aggregator refused: relayed slot list differs from the one the "
    r"device sealed|slot [0-9a-f]{16} is registered to another participant|round \d+: a "
    r"registration of \d+ slot\(s\) is not whole groups|the fetch names \d+ slot\(s\) of)",
}
#: a second, different post of the same participant in a round's phase
CONFLICT = {SC.ALREADY_EXISTS: r"different content was already accepted"}
#: a round that is not open (never opened, or long gone)
NOT_OPEN = {SC.NOT_FOUND: r"round \d+ is not open"}
#: a phase name the round does not have
NO_PHASE = {SC.NOT_FOUND: r"^round \d+ has no phase '.*'$"}
#: a fetch before the phase's surviving set is agreed
UNRELEASED = {SC.FAILED_PRECONDITION: r"^sums are released only after the surviving set is agreed"}
#: a registration whose slot list is not the one sealed to A (A checks the digest)
RESEALED = {
    SC.INVALID_ARGUMENT: r"slot ids: \d+ bytes is not a multiple of 8",
    SC.PERMISSION_DENIED: r"^(aggregator refused: relayed slot list differs from the one the "
    r"device sealed|round \d+: a registration of \d+ slot\(s\) is not whole groups of)",
}
#: an envelope for A that A cannot open: relayed, refused there, nothing recorded at C
UNSEALABLE = {
    SC.INVALID_ARGUMENT: r"^aggregator refused: (unsupported envelope version|envelope is \d+ "
    r"bytes|envelope was sealed to a different public key|envelope authentication failed|"
    r"envelope carries an invalid ephemeral public key)"
}


def batches(rng: random.Random, entries: list[Any]) -> Iterator[list[Any]]:
    """``entries`` in random order, cut into batches of 1..64."""
    rng.shuffle(entries)
    while entries:
        n = rng.randint(1, 64)
        yield entries[:n]
        entries = entries[n:]


@dataclass(frozen=True)
class Bad:
    """One malformed entry: its fields and the refusals it may get."""

    pid: bytes
    payload: bytes
    expected: dict[SC, str]
    count: int | None = None  # slot_count / item_count; None: the payload's own
    dim: int | None = None
    round_id: int | None = None  # the request's round (RegisterSlots); None: the payload's
    phase: str | None = None  # the request's phase; None: the payload's
    slot_ids: bytes | None = None  # FetchSums' routing copy; None: the payload's


def _own_count(payload: bytes) -> int:
    """The slot / item count a payload states (what an honest client routes it with)."""
    try:
        msg = decode(payload)
    except ss_errors.SecureSumError:
        return 1
    if isinstance(msg, ShuffledPost):
        return len(msg.items_for_a)
    return len(getattr(msg, "slot_ids", b"")) // S


def send_registrations(
    stub: pb_grpc.DeviceGatewayStub, rng: random.Random, tally: Tally, rid: int, bad: list[Bad]
) -> None:
    """Send ``bad`` registrations in random batches (one batch per round id asked for)."""
    by_round: dict[int, list[Bad]] = {}
    for b in bad:
        by_round.setdefault(rid if b.round_id is None else b.round_id, []).append(b)
    requests = [
        (
            pb.RegisterSlotsRequest(
                round_id=round_id,
                registrations=[
                    pb.SlotRegistration(
                        device=device(b.pid),
                        slot_count=_own_count(b.payload) if b.count is None else b.count,
                        payload=b.payload,
                    )
                    for b in batch
                ],
            ),
            batch,
        )
        for round_id, entries in by_round.items()
        for batch in batches(rng, entries)
    ]
    send_concurrently(stub.RegisterSlots, requests, "registrations", tally, "RegisterSlots")


def send_concurrently(
    rpc: Callable[..., Any],
    requests: list[tuple[Any, list[Bad]]],
    entries: str,
    tally: Tally,
    what: str,
) -> None:
    """Send batched requests from four threads at once; every entry must be refused as its
    ``Bad`` expects, answered in request order (the results name the entry's device)."""
    with futures.ThreadPoolExecutor(max_workers=4) as pool:
        replies = list(pool.map(lambda r: rpc(r[0], timeout=30), requests))
    for (req, batch), reply in zip(requests, replies, strict=True):
        sent = getattr(req, entries)
        assert len(reply.results) == len(batch) == len(sent)
        for b, entry, result in zip(batch, sent, reply.results, strict=True):
            assert result.device.value == b.pid
            if isinstance(entry, pb.SlotFetch):
                assert result.slot_ids == entry.slot_ids
            check_entries(tally, [result], b.expected, what)


def fuzz_enrolment(
    fed: Federation, rng: random.Random, tally: Tally, used: str, spare: str
) -> None:
    """Unknown and reused tokens, bad CSRs and counts; other RPCs without a certificate."""
    csr = key_csr(generate_private_key())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for _ in range(60):
        token = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 5, 43, 44, 80])))
        check_call(
            tally,
            lambda t=token: fed.enrol_stub.Enrol(_enrol_request(t, csr), timeout=10),
            {
                SC.PERMISSION_DENIED: r"^enrolment token (is not known to this coordinator|is "
                r"malformed)"
            },
            "Enrol(unknown token)",
        )
    for _ in range(20):
        check_call(
            tally,
            lambda: fed.enrol_stub.Enrol(_enrol_request(used, csr), timeout=10),
            {SC.PERMISSION_DENIED: r"enrolment token has already been used"},
            "Enrol(reused token)",
        )
    for _ in range(40):
        bad_csr = rng.choice([rng.randbytes(rng.randint(0, 300)), csr[: rng.randrange(len(csr))]])
        check_call(
            tally,
            lambda c=bad_csr: fed.enrol_stub.Enrol(_enrol_request(spare, c), timeout=10),
            {SC.INVALID_ARGUMENT: r"csr_der is not a DER certificate signing request"},
            "Enrol(bad CSR)",
        )
    for count in (0, MAX_UNITS_PER_CREDENTIAL + 1, 1 << 31, rng.randint(5000, 10**6)):
        check_call(
            tally,
            lambda n=count: fed.enrol_stub.Enrol(_enrol_request(spare, csr, n), timeout=10),
            {SC.INVALID_ARGUMENT: rf"device_count must be in 1\.\.{MAX_UNITS_PER_CREDENTIAL}"},
            "Enrol(bad count)",
        )
    for call, req in (
        (fed.enrol_stub.GetRound, pb.GetRoundRequest()),
        (fed.enrol_stub.Heartbeat, pb.HeartbeatRequest()),
        (fed.enrol_stub.RegisterSlots, pb.RegisterSlotsRequest(round_id=1)),
        (fed.enrol_stub.PostShares, pb.PostSharesRequest()),
        (fed.enrol_stub.FetchSums, pb.FetchSumsRequest()),
    ):
        check_call(
            tally,
            lambda c=call, r=req: c(r, timeout=10),
            {SC.UNAUTHENTICATED: r"no client certificate"},
            "no certificate",
        )


def forged_seals(rng: random.Random, sealed: bytes) -> list[bytes]:
    """Envelopes A cannot open: too short, random, another key id, tampered, or re-keyed."""
    flip = rng.randrange(9, len(sealed))
    return [
        b"",
        rng.randbytes(40),
        rng.randbytes(len(sealed)),
        sealed[:1] + rng.randbytes(8) + sealed[9:],
        sealed[:flip] + bytes([sealed[flip] ^ 1]) + sealed[flip + 1 :],
        sealed[:9] + rng.randbytes(len(sealed) - 9),
        sealed[:-1],
    ]


def fuzz_registration(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    rid: int,
    mallory: Credential,
    alice: Credential,
    slot_a: bytes,
) -> None:
    """Malformed, misrouted and impersonating registrations while registration is open."""
    m, a = mallory.pid, alice.pid
    day_rpis = [rng.randbytes(16) for _ in range(BEACONS)]
    good = RegisterRequest.from_bytes(mallory.nbhd.build_registration(rid, day_rpis))
    raw = good.to_bytes()
    bad: list[Bad] = []
    bad += [Bad(m, junk(rng), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(600)]
    bad += [Bad(m, mutate(rng, raw), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(400)]
    bad += [Bad(m, structured(rng, RegisterRequest, m, rid, ""), STRUCTURED) for _ in range(150)]
    bad += [
        Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field slot_count"}, count=rng.choice([0, 1, 3]))
        for _ in range(20)
    ]
    bad += [
        Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field round_id"}, round_id=rid + k)
        for k in (1, 2, 7)
    ]
    for k in (1, 3, 1 << 40):
        later = mallory.nbhd.build_registration(rid + k, [rng.randbytes(16)])
        bad.append(Bad(m, later, NOT_OPEN, round_id=rid + k))
    bad += [
        Bad(a, alice.nbhd.build_registration(rid, [rng.randbytes(16)]), NOT_YOURS),
        Bad(rng.randbytes(16), raw, NOT_YOURS),
        Bad(rng.randbytes(rng.choice([0, 8, 32])), raw, NOT_YOURS),
        Bad(m, alice.nbhd.build_registration(rid, [rng.randbytes(16)]), NOT_YOURS),
    ]
    # A cannot open the fetch secret: refused there, C's registry untouched
    bad += [
        Bad(m, replaced(good, sealed_for_a=seal), UNSEALABLE)
        for seal in forged_seals(rng, good.sealed_for_a)
    ]
    bad += [
        Bad(m, replaced(good, slot_ids=rng.randbytes(S * k + r)), RESEALED)
        for k, r in ((0, 0), (0, 5), (1, 0), (1, 1), (2, 15), (3, 0))
    ]
    bad.append(
        Bad(
            m,
            replaced(good, slot_ids=slot_a + rng.randbytes(S)),
            {SC.ALREADY_EXISTS: r"^slot [0-9a-f]{16} is already registered$"},
        )
    )
    bad += [
        Bad(m, DirectoryRequest(rid).to_bytes(), {SC.INVALID_ARGUMENT: MALFORMED}, count=0),
        Bad(
            m,
            FetchRequest(m, rid, "messages", good.slot_ids, b"x").to_bytes(),
            {SC.INVALID_ARGUMENT: MALFORMED},
        ),
    ]
    send_registrations(stub, rng, tally, rid, bad)
    # Alice may resend her registration, but not register other slots
    other = alice.nbhd.build_registration(rid, [rng.randbytes(16)])
    reply = alice.stub.RegisterSlots(
        pb.RegisterSlotsRequest(
            round_id=rid,
            registrations=[pb.SlotRegistration(device=device(a), slot_count=1, payload=other)],
        ),
        timeout=20,
    )
    check_entries(
        tally,
        reply.results,
        {SC.FAILED_PRECONDITION: r"already registered with a different request this round"},
        "Alice",
    )
    # too many entries in one call
    too_many = pb.RegisterSlotsRequest(
        round_id=rid,
        registrations=[pb.SlotRegistration(device=device(m), payload=b"x")]
        * (MAX_ENTRIES_PER_BATCH + 1),
    )
    check_call(
        tally,
        lambda: stub.RegisterSlots(too_many, timeout=20),
        {SC.RESOURCE_EXHAUSTED: r"exceeds MAX_ENTRIES_PER_BATCH"},
        "RegisterSlots(too many)",
    )


def fuzz_directory(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    rid: int,
    registration_open: bool,
) -> None:
    """GetDirectory too early, for other rounds, and with bad payloads."""
    cases: list[tuple[int, bytes, dict[SC, str]]] = []
    if registration_open:
        early = {SC.FAILED_PRECONDITION: r"final only after registration"}
        cases += [(rid, DirectoryRequest(rid).to_bytes(), early)] * 5
    cases += [(rid + k, DirectoryRequest(rid + k).to_bytes(), NOT_OPEN) for k in (1, 2, 99)]
    cases += [(rid, DirectoryRequest(rid + 1).to_bytes(), {SC.INVALID_ARGUMENT: "routing"})]
    cases += [(rid, junk(rng), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(40)]
    for round_id, payload, expected in cases:
        check_call(
            tally,
            lambda r=round_id, p=payload: stub.GetDirectory(
                pb.GetDirectoryRequest(round_id=r, payload=p), timeout=10
            ),
            expected,
            "GetDirectory",
        )
    if registration_open:
        return
    # the real directory (both participants' slots), paged at random offsets and sizes
    ask = DirectoryRequest(rid).to_bytes()
    whole = stub.GetDirectory(pb.GetDirectoryRequest(round_id=rid, payload=ask), timeout=10)
    ids = DirectoryResponse.from_bytes(whole.payload).slot_ids
    assert whole.total_slots == len(ids) // S == 4
    assert whole.directory_digest == hashlib.sha256(ids).digest()
    for _ in range(20):
        start = rng.choice([0, 1, 3, 4, 5, 1 << 40, rng.randrange(1 << 64)])
        size = rng.choice([0, 1, 2, 1 << 31, rng.randrange(1 << 32)])
        page = stub.GetDirectory(
            pb.GetDirectoryRequest(round_id=rid, start=start, max_slots=size, payload=ask),
            timeout=10,
        )
        first = min(start, 4)
        last = 4 if size == 0 else min(4, first + size)
        assert (page.start, page.total_slots) == (first, 4)
        assert page.directory_digest == whole.directory_digest
        assert DirectoryResponse.from_bytes(page.payload).slot_ids == ids[S * first : S * last]


def send_posts(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    spec: RoundSpec,
    phase: str,
    bad: list[Bad],
    aggregates: bool,
) -> None:
    """Send ``bad`` posts in random batches, grouped by the (round, phase) of the request."""
    groups: dict[tuple[int, str], list[Bad]] = {}
    for b in bad:
        ref = (
            spec.round_id if b.round_id is None else b.round_id,
            phase if b.phase is None else b.phase,
        )
        groups.setdefault(ref, []).append(b)
    rpc = stub.SubmitAggregates if aggregates else stub.PostShares
    cls = pb.SubmitAggregatesRequest if aggregates else pb.PostSharesRequest
    requests = [
        (
            cls(
                round=common_pb2.RoundRef(round_id=round_id, phase=phase_name),
                posts=[
                    pb.SharePost(
                        device=device(b.pid),
                        item_count=_own_count(b.payload) if b.count is None else b.count,
                        dim=b.dim or 0,
                        payload=b.payload,
                    )
                    for b in batch
                ],
            ),
            batch,
        )
        for (round_id, phase_name), entries in groups.items()
        for batch in batches(rng, entries)
    ]
    what = "SubmitAggregates" if aggregates else "PostShares"
    send_concurrently(rpc, requests, "posts", tally, what)


def random_phase(rng: random.Random) -> str:
    """A phase name the round does not have (ASCII, or not)."""
    letters = "abcdefghijklmnopqrstuvwxyz/_é🙂"
    made = "".join(rng.choice(letters) for _ in range(rng.randint(1, 30)))
    return rng.choice(["", "Messages", "observations ", "messages\x00", "global/day/0", made])


def fuzz_posts(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    spec: RoundSpec,
    phase: str,
    mallory: Credential,
    alice: Credential,
    slots: list[bytes] | list[str],
) -> None:
    """Malformed, misrouted, impersonating, conflicting and oversized posts of ``phase``."""
    aggregates = phase == OBSERVATIONS_PHASE
    p = spec.phase(phase)
    client_m = mallory.aggr if aggregates else mallory.nbhd
    client_a = alice.aggr if aggregates else alice.nbhd
    m, a, rid = mallory.pid, alice.pid, spec.round_id
    # a dense post covers the whole table; in a pseudonym phase it names no slot (n = 0)
    dense = client_m.deployment.mode is Mode.DENSE
    names_slots = {SC.INVALID_ARGUMENT: r"^this deployment runs dense mode: a post covers"}
    values = np.ones((len(slots), p.dim))
    good = MailboxPost.from_bytes(client_m.build_post(spec, phase, slots, values))
    raw = good.to_bytes()
    n = len(good.slot_ids) // S
    bad: list[Bad] = []
    bad += [Bad(m, junk(rng), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(600)]
    bad += [Bad(m, mutate(rng, raw), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(400)]
    bad += [
        Bad(m, structured(rng, rng.choice([MailboxPost, ShuffledPost]), m, rid, phase), STRUCTURED)
        for _ in range(200)
    ]
    bad += [
        Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field item_count"}, count=n + k)
        for k in (-1, 1, 1000)
        if n + k >= 0
    ]
    bad += [
        Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field dim"}, dim=p.dim + k) for k in (-1, 1, 60)
    ]
    bad += [
        Bad(
            m,
            wrong_dim_post(good, rng).to_bytes(),
            {SC.INVALID_ARGUMENT: rf"^phase '{phase}' has dim {p.dim}, post has \d+$"},
        )
        for _ in range(10)
    ]
    bad += [
        Bad(
            m,
            replaced(good, share_c=good.share_c[:cut]),
            {SC.INVALID_ARGUMENT: r"share block is \d+ bytes; expected"},
        )
        for cut in (-8, -1, 0)
    ]
    # an item count that is no whole number of devices × items_per_device
    for extra in range(1, p.items_per_device, 2):  # (one item per device: any count is whole)
        ragged = replaced(
            good,
            slot_ids=good.slot_ids + good.slot_ids[: S * extra],
            share_c=good.share_c + good.share_c[: 8 * p.dim * extra],
        )
        whole = {SC.INVALID_ARGUMENT: r"takes m × items_per_device=\d+ items"}
        # (dense: a pseudonym post has no slot ids to extend, only its share block grows)
        grown = {SC.INVALID_ARGUMENT: r"^share block is \d+ bytes; expected"}
        bad.append(Bad(m, ragged, (grown if n == 0 else names_slots) if dense else whole))
    # rounds that are not open, with the request routed to them
    for k in (1, 5, 1 << 40):
        bad.append(Bad(m, replaced(good, round_id=rid + k), NOT_OPEN, round_id=rid + k))
    bad.append(Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field round_id"}, round_id=rid + 1))
    # phases the round does not have, routed consistently or not
    for _ in range(20):
        name = random_phase(rng)
        bad.append(Bad(m, replaced(good, phase=name), NO_PHASE, phase=name))
        bad.append(Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field phase"}, phase=name))
    # impersonation: Alice's post, or anyone else's id
    foreign = client_a.build_post(spec, phase, slots, values * 2)
    bad += [
        Bad(a, foreign, NOT_YOURS),
        Bad(m, foreign, NOT_YOURS),
        Bad(rng.randbytes(16), raw, NOT_YOURS),
        Bad(b"", raw, NOT_YOURS),
    ]
    # slots the round does not have
    for _ in range(5):
        stray = replaced(good, slot_ids=rng.randbytes(S * max(n, 1)))
        unknown = {SC.NOT_FOUND: r"^unknown slot [0-9a-f]{16} \(not registered"}
        bad.append(Bad(m, stray, names_slots if dense else unknown))
    send_posts(stub, rng, tally, spec, phase, bad, aggregates)

    # the other RPC does not carry this phase
    other = stub.PostShares if aggregates else stub.SubmitAggregates
    other_cls = pb.PostSharesRequest if aggregates else pb.SubmitAggregatesRequest
    reply = other(
        other_cls(
            round=common_pb2.RoundRef(round_id=rid, phase=phase),
            posts=[pb.SharePost(device=device(m), item_count=n, dim=p.dim, payload=raw)],
        ),
        timeout=20,
    )
    check_entries(
        tally,
        reply.results,
        {SC.NOT_FOUND: rf"^round {rid} has no phase '{phase}'$"},
        "wrong RPC",
    )
    # Alice: her replay is accepted once more (not fresh), a different post conflicts
    assert not client_a.resend(rid, phase)
    rpc_a = alice.stub.SubmitAggregates if aggregates else alice.stub.PostShares
    cls_a = pb.SubmitAggregatesRequest if aggregates else pb.PostSharesRequest
    reply = rpc_a(
        cls_a(
            round=common_pb2.RoundRef(round_id=rid, phase=phase),
            posts=[pb.SharePost(device=device(a), item_count=n, dim=p.dim, payload=foreign)],
        ),
        timeout=20,
    )
    check_entries(tally, reply.results, CONFLICT, "Alice's conflicting post")
    # a payload above the per-message limit, inside a legal request
    if not aggregates:
        huge = pb.PostSharesRequest(
            round=common_pb2.RoundRef(round_id=rid, phase=phase),
            posts=[pb.SharePost(device=device(m), payload=bytes(MAX_PAYLOAD_BYTES + 1))],
        )
        check_entries(
            tally,
            stub.PostShares(huge, timeout=30).results,
            {SC.RESOURCE_EXHAUSTED: rf"exceeds MAX_PAYLOAD_BYTES \({MAX_PAYLOAD_BYTES}\)"},
            "huge post",
        )


def fuzz_fetch_too_early(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    rid: int,
    mallory: Credential,
    slots_m: list[bytes],
) -> None:
    """Fetching before the phase's surviving set is agreed is refused (and burns nothing)."""
    for slots in ([slots_m[0]], [slots_m[1]], slots_m[::-1]):
        raw = mallory.nbhd.build_fetch(rid, MESSAGES_PHASE, slots)
        send_fetches(
            stub,
            rng,
            tally,
            rid,
            [Bad(mallory.pid, raw, UNRELEASED)],
        )


def send_fetches(
    stub: pb_grpc.DeviceGatewayStub, rng: random.Random, tally: Tally, rid: int, bad: list[Bad]
) -> None:
    """Send ``bad`` fetches in random batches, grouped by the request's phase."""
    groups: dict[str, list[Bad]] = {}
    for b in bad:
        groups.setdefault(MESSAGES_PHASE if b.phase is None else b.phase, []).append(b)
    requests = [
        (
            pb.FetchSumsRequest(
                round=common_pb2.RoundRef(round_id=rid, phase=phase),
                fetches=[
                    pb.SlotFetch(
                        device=device(b.pid),
                        slot_ids=_own_slot_ids(b.payload) if b.slot_ids is None else b.slot_ids,
                        payload=b.payload,
                    )
                    for b in batch
                ],
            ),
            batch,
        )
        for phase, entries in groups.items()
        for batch in batches(rng, entries)
    ]
    send_concurrently(stub.FetchSums, requests, "fetches", tally, "FetchSums")


def _own_slot_ids(payload: bytes) -> bytes:
    """The slot ids a fetch payload names (what an honest client routes it with)."""
    try:
        return bytes(getattr(decode(payload), "slot_ids", b""))
    except ss_errors.SecureSumError:
        return b""


def fuzz_fetches(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    rid: int,
    mallory: Credential,
    alice: Credential,
    slots_m: list[bytes],
    slot_a: bytes,
) -> None:
    """Malformed fetches, fetches of others' or unknown slots, and a forged proof."""
    m, a = mallory.pid, alice.pid
    good = FetchRequest.from_bytes(mallory.nbhd.build_fetch(rid, MESSAGES_PHASE, slots_m))
    raw = good.to_bytes()
    bad: list[Bad] = []
    bad += [Bad(m, junk(rng), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(400)]
    bad += [Bad(m, mutate(rng, raw), {SC.INVALID_ARGUMENT: MALFORMED}) for _ in range(300)]
    bad += [
        Bad(m, structured(rng, FetchRequest, m, rid, MESSAGES_PHASE), STRUCTURED)
        for _ in range(150)
    ]
    bad += [
        Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field slot_ids"}, slot_ids=rng.randbytes(S))
        for _ in range(10)
    ]
    for slots in ([rng.randbytes(S)], [slots_m[0], rng.randbytes(S)]):
        stray = mallory.nbhd.build_fetch(rid, MESSAGES_PHASE, slots)
        bad.append(Bad(m, stray, {SC.NOT_FOUND: r"^slot [0-9a-f]{16} is not registered$"}))
    for slots in ([slot_a], [slots_m[0], slot_a]):
        theirs = mallory.nbhd.build_fetch(rid, MESSAGES_PHASE, slots)
        bad.append(Bad(m, theirs, {SC.PERMISSION_DENIED: r"registered to another participant"}))
    # one beacon's slot of Mallory's own day: part of a group, so no sum is released
    for slots in ([slots_m[0]], [slots_m[1]]):
        part = mallory.nbhd.build_fetch(rid, MESSAGES_PHASE, slots)
        bad.append(Bad(m, part, {SC.PERMISSION_DENIED: r"only whole groups' totals"}))
    bad += [
        Bad(
            m,
            replaced(good, slot_ids=ids),
            {SC.INVALID_ARGUMENT: r"a fetch names \d+\.\.\d+ slots|is not a multiple of 8"},
        )
        for ids in (rng.randbytes(15), rng.randbytes(33))
    ]
    # naming no slot asks for all of Mallory's, but the sealed proof binds the list it named
    # (as its envelope's AAD): A refuses the swap, and nothing is recorded
    bad.append(
        Bad(
            m,
            replaced(good, slot_ids=b""),
            {SC.INVALID_ARGUMENT: r"^aggregator refused: envelope authentication failed"},
        )
    )
    for _ in range(10):
        name = random_phase(rng)
        bad.append(Bad(m, replaced(good, phase=name), NO_PHASE, phase=name))
        bad.append(Bad(m, raw, {SC.INVALID_ARGUMENT: r"routing field phase"}, phase=name))
    bad += [
        Bad(a, alice.nbhd.build_fetch(rid, MESSAGES_PHASE, [slot_a]), NOT_YOURS),
        Bad(rng.randbytes(16), raw, NOT_YOURS),
    ]
    # A refuses a forged proof of the fetch secret; nothing is recorded at C
    bad += [
        Bad(m, replaced(good, sealed_for_a=seal), UNSEALABLE)
        for seal in forged_seals(rng, good.sealed_for_a)
    ]
    send_fetches(stub, rng, tally, rid, bad)
    # another round
    for k in (1, 4):
        later = replaced(good, round_id=rid + k)
        req = pb.FetchSumsRequest(
            round=common_pb2.RoundRef(round_id=rid + k, phase=MESSAGES_PHASE),
            fetches=[pb.SlotFetch(device=device(m), slot_ids=good.slot_ids, payload=later)],
        )
        check_entries(tally, stub.FetchSums(req, timeout=20).results, NOT_OPEN, "FetchSums")


def fuzz_late(
    stub: pb_grpc.DeviceGatewayStub,
    rng: random.Random,
    tally: Tally,
    spec: RoundSpec,
    mallory: Credential,
) -> None:
    """Registering after registration closed, posting after the messages phase closed."""
    rid = spec.round_id
    late = mallory.nbhd.build_registration(rid, [rng.randbytes(16)])
    send_registrations(
        stub,
        rng,
        tally,
        rid,
        [Bad(mallory.pid, late, {SC.FAILED_PRECONDITION: r"already registered with a different"})],
    )
    slots = [bytes(r) for r in [mallory.nbhd.directory(rid).id_matrix()[0]]]
    post = mallory.nbhd.build_post(spec, MESSAGES_PHASE, slots, np.full((1, 4), 2.0))
    send_posts(
        stub,
        rng,
        tally,
        spec,
        MESSAGES_PHASE,
        [
            Bad(
                mallory.pid,
                post,
                {SC.FAILED_PRECONDITION: rf"^round {rid} phase 'messages' is closed$"},
            )
        ],
        aggregates=False,
    )


# -- the state afterwards ----------------------------------------------------------------------
def check_state(
    fed: Federation, expected_y: list[np.ndarray], alice: Credential, mallory: Credential
) -> None:
    """The committed run holds exactly the honest contributions; nothing else was recorded."""
    svc = fed.svc
    y = svc.aggregates(0)
    assert y.shape[0] == DAYS
    for day in range(DAYS):
        np.testing.assert_array_equal(y[day].reshape(-1), expected_y[day])
    db = svc.db
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rounds = db.execute("SELECT round_id, day, status FROM rounds ORDER BY round_id").fetchall()
    assert rounds == [(d + 1, d, "committed") for d in range(DAYS)]
    days = db.execute(
        "SELECT day, surviving_messages, surviving_observations FROM days ORDER BY day"
    ).fetchall()
    # day 1: Mallory's posts carried seeds A could not open; she dropped out of both phases
    assert days == [(0, 2, 2), (1, 1, 1)]
    units = dict(db.execute("SELECT credential, units FROM credentials").fetchall())
    assert units == {alice.credential_id: alice.pid, mallory.credential_id: mallory.pid}
    (loss,) = db.execute("SELECT loss FROM epochs WHERE epoch = 0").fetchone()
    assert loss == float(y[:, 0, :, 0].sum())  # total new infections (values, not tangents)
    # the coordinator's view: only the two participants' accepted entries, no abort or dropout
    lines = (fed.root / "c" / "views" / "coordinator.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    assert not [e for e in events if e["event"] in ("abort", "dropout")]
    accepted = {(e["event"], e["round"], e["participant"]) for e in events if "participant" in e}
    honest = {alice.pid.hex(), mallory.pid.hex()}
    for rpc in ("RegisterSlots", "PostShares", "FetchSums", "SubmitAggregates"):
        for rid in range(1, DAYS + 1):
            assert {p for e, r, p in accepted if e == rpc and r == rid} == honest, (rpc, rid)
    # the aggregator agreed on each phase of each round once
    a_db = sqlite3.connect(fed.root / "a" / "aggregator.sqlite3")
    try:
        agreed = a_db.execute(
            "SELECT deployment, round_id, phase FROM agreements ORDER BY round_id, deployment"
        ).fetchall()
    finally:
        a_db.close()
    assert agreed == [
        row
        for rid in range(1, DAYS + 1)
        for row in (("aggregates", rid, OBSERVATIONS_PHASE), ("neighbourhood", rid, MESSAGES_PHASE))
    ]


# -- the test ----------------------------------------------------------------------------------
def post_spoiled(
    stub: pb_grpc.DeviceGatewayStub,
    client: DeviceClient,
    spec: RoundSpec,
    phase: str,
    slots: Sequence[bytes | str],
    values: np.ndarray,
) -> None:
    """Post with the A-bound seed tampered: C cannot tell (it is sealed to A) and accepts it;
    A refuses it when the phase closes, so the post drops out of the surviving set."""
    post = MailboxPost.from_bytes(client.build_post(spec, phase, slots, values))
    seal = post.sealed_for_a
    spoiled = replaced(post, sealed_for_a=seal[:-1] + bytes([seal[-1] ^ 0x80]))
    entry = pb.SharePost(
        device=device(post.device_id),
        item_count=len(post.slot_ids) // S,
        dim=post.dim,
        payload=spoiled,
    )
    ref = common_pb2.RoundRef(round_id=spec.round_id, phase=phase)
    if phase == OBSERVATIONS_PHASE:
        reply = stub.SubmitAggregates(
            pb.SubmitAggregatesRequest(round=ref, posts=[entry]), timeout=20
        )
    else:
        reply = stub.PostShares(pb.PostSharesRequest(round=ref, posts=[entry]), timeout=20)
    (result,) = reply.results
    assert PostReceipt.from_bytes(result.payload).fresh == 1
    # the honest post it replaced now conflicts
    with pytest.raises(ss_errors.ConflictingSubmission, match="ALREADY_EXISTS"):
        client.post(spec, phase, slots, values)


def test_malformed_requests_are_refused_specifically_and_the_run_stays_intact(
    federation: Federation,
) -> None:
    """Day 0: Mallory fuzzes every RPC between the honest steps. Day 1: her posts carry
    tampered seeds for A. Both days complete with exactly the honest sums."""
    fed, svc = federation, federation.svc
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "20240917")))
    tally = Tally({})
    tokens = svc.mint_tokens(3)
    alice = fed.credential(tokens[0])
    mallory = fed.credential(tokens[1])
    spare_token = tokens[2]  # refused redemptions must not burn it (redeemed at the end)
    stub = mallory.stub
    fuzz_enrolment(fed, rng, tally, tokens[0], spare_token)

    values_a = np.array([[0.5, 1.25, -2.0, 3.0]])
    values_m = np.array([[1.0, -0.75, 0.125, 8.0]])
    zero = np.zeros((1, 4))
    obs_dim = round_specs(1, 0, ITEMS, BEACONS)[1].phases[0].dim
    expected_y = []
    for day in range(DAYS):
        fuzzing, spoiling = day == 0, day == 1
        rid = wait_step(stub, "register", day).round_id
        spec_m, spec_o = round_specs(rid, day, ITEMS, BEACONS)

        # -- register: Alice, then Mallory's garbage, then Mallory (which ends the step) ----
        slots_a = alice.nbhd.register(rid, [rng.randbytes(16), rng.randbytes(16)])
        rpis_m = [rng.randbytes(16), rng.randbytes(16)]
        if fuzzing:
            fuzz_registration(stub, rng, tally, rid, mallory, alice, slots_a[0])
            fuzz_directory(stub, rng, tally, rid, registration_open=True)
        slots_m = mallory.nbhd.register(rid, rpis_m)
        assert mallory.nbhd.register(rid, rpis_m) == slots_m  # an identical resend

        # -- messages: each posts to the other's first slot --------------------------------
        wait_step(stub, "messages", day)
        if spoiling:  # first, so that Alice's post ends the step
            post_spoiled(stub, mallory.nbhd, spec_m, MESSAGES_PHASE, [slots_a[0]], values_m)
        assert alice.nbhd.post(spec_m, MESSAGES_PHASE, [slots_m[0]], values_a)
        if fuzzing:
            fuzz_directory(stub, rng, tally, rid, registration_open=False)
            fuzz_fetch_too_early(stub, rng, tally, rid, mallory, slots_m)
            fuzz_posts(stub, rng, tally, spec_m, MESSAGES_PHASE, mallory, alice, [slots_m[0]])
            assert mallory.nbhd.post(spec_m, MESSAGES_PHASE, [slots_a[0]], values_m)

        # -- fetch: each gets exactly the other's surviving message ------------------------
        wait_step(stub, "fetch", day)
        codec = alice.nbhd.codec
        # one row: the total of Alice's day (her two beacons' slots are one group)
        got_a = alice.nbhd.fetch_ring(rid, MESSAGES_PHASE, slots_a, BEACONS)
        np.testing.assert_array_equal(codec.decode(got_a), zero if spoiling else values_m)
        if fuzzing:
            fuzz_fetches(stub, rng, tally, rid, mallory, alice, slots_m, slots_a[0])
            fuzz_late(stub, rng, tally, spec_m, mallory)
        got_m = mallory.nbhd.fetch_ring(rid, MESSAGES_PHASE, slots_m, BEACONS)
        np.testing.assert_array_equal(codec.decode(got_m), values_a)
        # Alice's identical retry gets the identical reply; any other fetch is refused
        np.testing.assert_array_equal(
            alice.nbhd.fetch_ring(rid, MESSAGES_PHASE, slots_a, BEACONS), got_a
        )
        with pytest.raises(ss_errors.AlreadyFetched, match="FAILED_PRECONDITION"):
            alice.nbhd.fetch_ring(rid, MESSAGES_PHASE, slots_a[::-1], BEACONS)

        # -- observations: the aggregate is the surviving participants' sum ----------------
        wait_step(stub, "observations", day)
        name = f"global/day/{day}"
        y_a = np.array([[rng.randint(-64, 64) / 4 for _ in range(obs_dim)]])
        y_m = np.array([[rng.randint(-64, 64) / 4 for _ in range(obs_dim)]])
        if spoiling:
            post_spoiled(stub, mallory.aggr, spec_o, OBSERVATIONS_PHASE, [name], y_m)
            expected_y.append(y_a[0])
        assert alice.aggr.post(spec_o, OBSERVATIONS_PHASE, [name], y_a)
        if fuzzing:
            fuzz_posts(stub, rng, tally, spec_o, OBSERVATIONS_PHASE, mallory, alice, [name])
            assert mallory.aggr.post(spec_o, OBSERVATIONS_PHASE, [name], y_m)
            expected_y.append((y_a + y_m)[0])

    assert svc.finished.wait(30), "the run did not finish"
    check_state(fed, expected_y, alice, mallory)
    assert tally.total >= 2000, tally.counts
    assert set(tally.counts) == {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "ALREADY_EXISTS",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
    }, tally.counts
    # the bad-CSR and bad-count attempts did not burn the spare token
    late = fed.enrol_stub.Enrol(
        _enrol_request(spare_token, key_csr(generate_private_key())), timeout=20
    )
    assert len(late.devices) == 1
    assert svc.db.execute("SELECT COUNT(*) FROM credentials").fetchone()[0] == 3
