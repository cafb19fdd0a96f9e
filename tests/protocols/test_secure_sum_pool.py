"""Participants hosting pools of devices, deterministic (crash-safe) clients, idempotent
registration and batched fetches, end to end over the in-memory transport."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.secure_sum import (
    AlreadyFetched,
    AlreadyRegistered,
    AuthenticationFailed,
    DeviceClient,
    FixedPointCodec,
    InMemoryNetwork,
    InsecurePlaintextWarning,
    MessageError,
    Mode,
    NotRegistrant,
    OverflowBoundError,
    PhaseSpec,
    RoundSpec,
    SecureSumError,
    SlotAlreadyRegistered,
    SlotKind,
    UnknownSlot,
    WrongLength,
    group_sum,
)
from protocols.secure_sum import protocol as protocol_module
from protocols.secure_sum.envelope import HEADER_BYTES, KEY_ID_BYTES, open_envelope
from protocols.secure_sum.messages import (
    ErrorReply,
    FetchReply,
    FetchRequest,
    MailboxPost,
    RegisterRequest,
    RelayFetch,
    RelayMailbox,
    ShuffledPost,
    decode,
)
from protocols.secure_sum.protocol import INFO_MAILBOX, post_header
from protocols.secure_sum.slots import SLOT_ID_BYTES as S

ROUND = 11
K = 2  # items_per_device of the pseudonym phase
DIM = 3
SECURE = [Mode.MAILBOX, Mode.SHUFFLED]
ALL = [*SECURE, Mode.PLAINTEXT]
AGG_SLOT = "global/day/1"


def make_net(mode: Mode, **kw) -> InMemoryNetwork:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecurePlaintextWarning)
        return InMemoryNetwork(mode, **kw)


def spec() -> RoundSpec:
    return RoundSpec(
        ROUND,
        (
            PhaseSpec("messages", DIM, SlotKind.PSEUDONYM, K),
            PhaseSpec("obs", DIM, SlotKind.AGGREGATE, 1, (AGG_SLOT,)),
        ),
    )


class Pools:
    """One round; participant ``p`` hosts ``sizes[p]`` devices, one beacon (slot) per device;
    registration is closed unless ``close`` is False."""

    def __init__(
        self, mode: Mode, sizes: list[int], secrets: bool = False, close: bool = True, **kw
    ) -> None:
        self.net = make_net(mode, **kw)
        self.spec = spec()
        self.net.open_round(self.spec)
        self.sizes = sizes
        self.ids = [os.urandom(16) for _ in sizes]
        self.secrets = [os.urandom(32) if secrets else None for _ in sizes]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecurePlaintextWarning)
            self.clients = [
                self.net.device(d, devices=m, secret=s)
                for d, m, s in zip(self.ids, sizes, self.secrets, strict=True)
            ]
        self.rpis = [[os.urandom(16) for _ in range(m)] for m in sizes]
        self.slots = [c.register(ROUND, r) for c, r in zip(self.clients, self.rpis, strict=True)]
        self.all_slots = [s for group in self.slots for s in group]
        self.c = self.net.coordinator
        self.codec = self.net.deployment.codec
        if close:
            self.c.close_registration(ROUND)

    def fetch_all(self) -> np.ndarray:
        """Every participant fetches all its slots in one request: ``(all slots, DIM)``."""
        return np.concatenate(
            [
                c.fetch_ring(ROUND, "messages", s)
                for c, s in zip(self.clients, self.slots, strict=True)
            ]
        )

    def client(
        self,
        p: int,
        send: Callable[[bytes], bytes] | None = None,
        secret: bytes | None = None,
    ) -> DeviceClient:
        """A fresh client object for participant ``p`` (a restart): its id, device count and
        secret (unless another is given), optionally with a send hook."""

        def default(raw: bytes) -> bytes:
            return self.c.handle_device(raw, self.ids[p])

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecurePlaintextWarning)
            return DeviceClient(
                self.ids[p],
                self.net.deployment,
                send or default,
                self.net.directory_cache,
                self.sizes[p],
                secret or self.secrets[p],
            )


def state(net: InMemoryNetwork) -> str:
    """A digest of all server state (registrations, replies, outboxes, shares)."""
    h = hashlib.sha256()
    for server in (net.coordinator, net.aggregator):
        for rid, rnd in sorted(server.rounds.items()):
            h.update(repr((rid, rnd.registration_open, rnd.registry.table.id_bytes())).encode())
            for d, r in sorted(rnd.registry._participants.items()):
                h.update(d + r.request_digest + r.reply)
                h.update(repr(sorted(r.fetches.items())).encode())
            h.update(repr(sorted(rnd.closed)).encode())
            for name, box in sorted(rnd.outbox.items()):
                h.update(name.encode() + repr(sorted(box.items())).encode())
            for name, acc in sorted(rnd.accumulators.items()):
                slot, share = acc.rows()
                h.update(name.encode() + acc.state.value.encode() + slot.tobytes())
                h.update(share.tobytes())
    return h.hexdigest()


# -- pools: posts of m × k items, sums exact ---------------------------------------------------
@pytest.mark.parametrize("mode", ALL)
def test_pool_posts_of_different_sizes_sum_exactly(mode: Mode) -> None:
    sizes = [1, 3, 2, 1]
    w = Pools(mode, sizes, tap=True)
    gen = np.random.default_rng(5)  # test data, not secrets
    n_slots = len(w.all_slots)
    targets, values, obs = [], [], []
    for p, m in enumerate(sizes):
        n = int(gen.integers(0, m * K + 1))  # from an empty post to a full one
        t = gen.integers(0, n_slots, n)
        v = gen.uniform(-50.0, 50.0, (n, DIM))
        raw = w.clients[p].build_post(w.spec, "messages", [w.all_slots[i] for i in t], v)
        msg = decode(raw)
        if isinstance(msg, ShuffledPost):
            assert len(msg.items_for_a) == m * K
        else:
            assert isinstance(msg, MailboxPost)
            assert len(msg.slot_ids) == S * m * K and len(msg.share_c) == 8 * m * K * DIM
        assert w.clients[p].post(w.spec, "messages", [w.all_slots[i] for i in t], v)
        o = gen.uniform(-5.0, 5.0, (m, DIM))  # one observation per hosted device
        w.clients[p].post(w.spec, "obs", [AGG_SLOT] * m, o)
        targets.append(t)
        values.append(v)
        obs.append(o)
    report = w.c.close_phase(ROUND, "messages")
    w.c.close_phase(ROUND, "obs")
    assert report.surviving == (len(sizes) if mode is not Mode.SHUFFLED else sum(sizes) * K)
    if mode is not Mode.SHUFFLED:
        relay = next(
            decode(r)
            for link, r, _ in w.net.log
            if link == "c->a" and isinstance(decode(r), RelayMailbox)
        )
        assert sorted(len(s) // S for s in relay.slot_ids) == sorted(m * K for m in sizes)
    for server in (w.c, w.net.aggregator):
        assert len(server.share_rows(ROUND, "messages")[0]) == sum(sizes) * K
    expected = group_sum(
        np.concatenate(targets).astype(np.int64), w.codec.encode(np.concatenate(values)), n_slots
    )[0]
    got = np.concatenate(
        [c.fetch_ring(ROUND, "messages", s) for c, s in zip(w.clients, w.slots, strict=True)]
    )
    assert got.shape == (n_slots, DIM)
    np.testing.assert_array_equal(got, expected)
    opened = w.c.open_aggregates_ring(ROUND, "obs")[AGG_SLOT]
    np.testing.assert_array_equal(opened, w.codec.encode(np.concatenate(obs)).sum(axis=0))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mix_of_pool_sizes_sums_exactly(data) -> None:
    """Random pool sizes, post fill levels, targets and values (mailbox; the shuffled and
    plaintext modes run the fixed scenario above)."""
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    w = Pools(Mode.MAILBOX, sizes)
    n_slots = len(w.all_slots)
    value = st.floats(-1000.0, 1000.0, allow_nan=False)
    targets, rows = [], []
    for p, m in enumerate(sizes):
        n = data.draw(st.integers(0, m * K))
        t = data.draw(st.lists(st.integers(0, n_slots - 1), min_size=n, max_size=n))
        v = np.array(
            data.draw(
                st.lists(st.lists(value, min_size=DIM, max_size=DIM), min_size=n, max_size=n)
            ),
            dtype=np.float64,
        ).reshape(n, DIM)
        w.clients[p].post(w.spec, "messages", [w.all_slots[i] for i in t], v)
        targets += t
        rows.append(v)
    w.c.close_phase(ROUND, "messages")
    expected = group_sum(
        np.array(targets, dtype=np.int64), w.codec.encode(np.concatenate(rows)), n_slots
    )[0]
    np.testing.assert_array_equal(w.fetch_all(), expected)


def test_item_positions_are_random_so_they_hide_dummies_and_pool_devices() -> None:
    """Plaintext shows the values, so the one real (nonzero) item's position is visible: over
    many builds it must move around the 8 positions of a 4-device post (with dummies always
    last it would sit at 0; with a fixed order, at one place)."""
    w = Pools(Mode.PLAINTEXT, [4, 1])
    positions = set()
    for _ in range(24):
        raw = w.client(0).build_post(w.spec, "messages", [w.all_slots[4]], np.ones((1, DIM)))
        shares = np.frombuffer(MailboxPost.from_bytes(raw).share_c, dtype="<i8")
        rows = np.flatnonzero(shares.reshape(4 * K, DIM).any(axis=1))
        assert len(rows) == 1
        positions.add(int(rows[0]))
    assert len(positions) >= 3  # uniform over 8: fewer than 3 in 24 draws has p < 1e-12


@pytest.mark.parametrize("mode", ALL)
def test_item_counts_refused_with_the_numbers_state_unchanged(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = Pools(mode, [2, 3])
    dev = w.clients[0]
    before = state(w.net)
    with pytest.raises(WrongLength, match=r"5 items exceed items_per_device=2 × devices=2"):
        dev.post(w.spec, "messages", [w.all_slots[0]] * 5, np.ones((5, DIM)))
    raw = dev.build_post(w.spec, "messages", [w.all_slots[1]], np.ones((1, DIM)))
    msg = decode(raw)
    if isinstance(msg, MailboxPost):  # 3 items: not a multiple of items_per_device=2
        bad = MailboxPost(
            msg.device_id,
            msg.round_id,
            msg.phase,
            msg.dim,
            msg.slot_ids[: 3 * S],
            msg.share_c[: 8 * 3 * DIM],
            msg.sealed_for_a,
        )
        empty = MailboxPost(
            msg.device_id, msg.round_id, msg.phase, msg.dim, b"", b"", msg.sealed_for_a
        )
    else:
        assert isinstance(msg, ShuffledPost)
        bad = ShuffledPost(
            msg.device_id, msg.round_id, msg.phase, msg.outer_for_a, msg.items_for_a[:3]
        )
        empty = ShuffledPost(msg.device_id, msg.round_id, msg.phase, msg.outer_for_a, ())
        with pytest.raises(WrongLength, match="outer envelope is"):
            w.c.handle_device(
                ShuffledPost(
                    msg.device_id, msg.round_id, msg.phase, msg.outer_for_a, msg.items_for_a[:2]
                ).to_bytes(),
                dev.device_id,
            )
    with pytest.raises(WrongLength, match=r"m × items_per_device=2 .* post has 3"):
        w.c.handle_device(bad.to_bytes(), dev.device_id)
    with pytest.raises(WrongLength, match="post has 0"):
        w.c.handle_device(empty.to_bytes(), dev.device_id)
    # above the bound: refused by C, and by the client before it builds anything
    monkeypatch.setattr(protocol_module, "MAX_ITEMS_PER_POST", 4)
    with pytest.raises(WrongLength, match="post has 6 items, more than MAX_ITEMS_PER_POST=4"):
        w.clients[1].post(w.spec, "messages", [w.all_slots[0]], np.ones((1, DIM)))
    monkeypatch.undo()
    big = w.clients[1].build_post(w.spec, "messages", [w.all_slots[0]], np.ones((1, DIM)))
    monkeypatch.setattr(protocol_module, "MAX_ITEMS_PER_POST", 4)
    with pytest.raises(WrongLength, match="post has 6 items, more than MAX_ITEMS_PER_POST=4"):
        w.c.handle_device(big, w.ids[1])
    assert state(w.net) == before
    with pytest.raises(SecureSumError, match="at least one device"):
        DeviceClient(os.urandom(16), w.net.deployment, w.c.handle_device, devices=0)


@pytest.mark.parametrize("mode", SECURE)
def test_aggregator_refuses_oversized_posts_in_a_relay(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checks the bound itself: C relays posts it accepted, A counts the oversized ones out
    and the surviving set excludes them at both servers."""
    w = Pools(mode, [1, 3, 1])
    posts = [(p, [p], np.full((1, DIM), p + 1.0)) for p in range(3)]
    for p, t, v in posts:
        w.clients[p].post(w.spec, "messages", [w.all_slots[i] for i in t], v)
    monkeypatch.setattr(protocol_module, "MAX_ITEMS_PER_POST", 4)  # participant 1 posts 6
    report = w.c.close_phase(ROUND, "messages")
    monkeypatch.undo()
    # mailbox: one post refused; shuffled: its outer envelope (A accepts its A-items, which it
    # cannot tie to the post, but C never gets their C-halves, so they do not survive)
    assert report.rejected_by_aggregator == 1
    assert report.surviving == (2 if mode is Mode.MAILBOX else 2 * K)
    got = np.concatenate(
        [c.fetch_ring(ROUND, "messages", s) for c, s in zip(w.clients, w.slots, strict=True)]
    )
    expected = np.zeros((5, DIM), dtype=np.int64)
    for p in (0, 2):
        expected[p] = w.codec.encode(posts[p][2])[0]
    np.testing.assert_array_equal(got, expected)


def test_ragged_relay_with_replays_and_a_malformed_post() -> None:
    """A relay mixing post lengths, every post twice, and one post cut to a non-multiple of k."""
    w = Pools(Mode.MAILBOX, [3, 1, 2])
    vals = [
        np.arange(m * K * DIM, dtype=np.float64).reshape(m * K, DIM) + p
        for p, m in enumerate(w.sizes)
    ]
    tgts = [[(p + j) % 6 for j in range(m * K)] for p, m in enumerate(w.sizes)]
    for p in range(3):
        w.clients[p].post(w.spec, "messages", [w.all_slots[i] for i in tgts[p]], vals[p])
    victim = w.ids[2]

    def mangle(raw: bytes) -> bytes:
        m = decode(raw)
        if not isinstance(m, RelayMailbox):
            return raw
        slot_ids = tuple(
            s[:-S] if d == victim else s for d, s in zip(m.device_ids, m.slot_ids, strict=True)
        )
        return RelayMailbox(
            m.round_id, m.phase, m.device_ids * 2, slot_ids * 2, m.sealed_for_a * 2
        ).to_bytes()

    w.net.c_to_a_filter = mangle
    report = w.c.close_phase(ROUND, "messages")
    assert (report.accepted_by_aggregator, report.rejected_by_aggregator) == (2, 2)
    assert report.surviving == 2
    keep = [0, 1]
    expected = group_sum(
        np.array([t for p in keep for t in tgts[p]], dtype=np.int64),
        w.codec.encode(np.concatenate([vals[p] for p in keep])),
        6,
    )[0]
    got = np.concatenate(
        [c.fetch_ring(ROUND, "messages", s) for c, s in zip(w.clients, w.slots, strict=True)]
    )
    np.testing.assert_array_equal(got, expected)


# -- deterministic clients ---------------------------------------------------------------------
def _requests(w: Pools, client: DeviceClient, values: np.ndarray) -> tuple[bytes, bytes, bytes]:
    reg = client.build_registration(ROUND, w.rpis[0])
    post = client.build_post(w.spec, "messages", [w.all_slots[1], w.all_slots[0]], values)
    fetch = client.build_fetch(ROUND, "messages", w.slots[0])
    return reg, post, fetch


def _ephemerals(raw: bytes) -> set[bytes]:
    """The ephemeral public keys of every envelope in a request."""
    m = decode(raw)
    envs: list[bytes] = []
    if isinstance(m, ShuffledPost):
        envs = [m.outer_for_a, *m.items_for_a]
    elif isinstance(m, (MailboxPost, RegisterRequest, FetchRequest)):
        envs = [m.sealed_for_a]
    return {e[1 + KEY_ID_BYTES : HEADER_BYTES] for e in envs if e}


@pytest.mark.parametrize("mode", SECURE)
def test_same_secret_same_bytes_other_secret_or_content_shares_nothing(mode: Mode) -> None:
    w = Pools(mode, [2, 1], secrets=True)
    values = np.array([[1.5, -2.0, 3.0], [0.25, 0.0, -1.0]])
    first = _requests(w, w.clients[0], values)
    twin = _requests(w, w.client(0), values)  # a new object with the same id and secret
    assert first == twin
    other = _requests(w, w.client(0, secret=os.urandom(32)), values)  # same id, another secret
    for a, b in zip(first, other, strict=True):
        assert a != b
        assert not _ephemerals(a) & _ephemerals(b)
    # other content under the same secret: no envelope key, mask or contribution id reused
    changed = w.client(0).build_post(
        w.spec, "messages", [w.all_slots[1], w.all_slots[0]], values + 1.0
    )
    assert not _ephemerals(changed) & _ephemerals(first[1])
    if mode is Mode.MAILBOX:
        seeds = []
        for raw in (first[1], changed):
            m = MailboxPost.from_bytes(raw)
            header = post_header(m.device_id, ROUND, "messages")
            seeds.append(open_envelope(w.net.a_keys, m.sealed_for_a, INFO_MAILBOX, header)[:16])
        assert seeds[0] != seeds[1]
    # the derived envelopes still open, and the rebuilt requests are accepted as replays
    assert w.clients[0].post(w.spec, "messages", [w.all_slots[1], w.all_slots[0]], values)
    assert not w.client(0).post(w.spec, "messages", [w.all_slots[1], w.all_slots[0]], values)


@pytest.mark.parametrize("mode", ALL)
def test_restart_resends_count_once_and_sums_are_exact(mode: Mode) -> None:
    w = Pools(mode, [2, 1, 1], secrets=True, close=False)
    # participant 0 crashes after its registration reached C; the restarted one re-registers
    before = state(w.net)
    restarted = w.client(0)
    assert restarted.register(ROUND, w.rpis[0]) == w.slots[0]
    assert state(w.net) == before
    w.c.close_registration(ROUND)
    posts = {
        0: ([0, 2, 3], np.array([[1.0, 2.0, 3.0], [-4.0, 0.5, 0.0], [7.0, 7.0, -7.0]])),
        1: ([1, 0], np.array([[0.125, -1.0, 2.0], [3.0, 3.0, 3.0]])),
        2: ([1], np.array([[-2.0, 10.0, 0.0]])),
    }
    for p, (t, v) in posts.items():
        assert w.clients[p].post(w.spec, "messages", [w.all_slots[i] for i in t], v)
    # a crash after the post reached C: the restarted participant rebuilds and resends it
    for p in (0, 2):
        t, v = posts[p]
        assert not w.client(p).post(w.spec, "messages", [w.all_slots[i] for i in t], v)
    report = w.c.close_phase(ROUND, "messages")
    assert report.surviving == (3 if mode is not Mode.SHUFFLED else 4 * K)
    expected = group_sum(
        np.array([i for t, _ in posts.values() for i in t], dtype=np.int64),
        w.codec.encode(np.concatenate([v for _, v in posts.values()])),
        4,
    )[0]
    # participant 0's fetch reaches both servers but the reply is lost in a crash
    lost: list[bytes] = []

    def crash_after_send(raw: bytes) -> bytes:
        lost.append(w.c.handle_device(raw, w.ids[0]))
        raise ConnectionError("participant crashed before reading the reply")

    with pytest.raises(ConnectionError):
        w.client(0, crash_after_send).fetch_ring(ROUND, "messages", w.slots[0])
    answered = state(w.net)
    # after the restart it fetches again: the identical request, the stored reply, no change
    retry = w.client(0).build_fetch(ROUND, "messages", w.slots[0])
    assert w.c.handle_device(retry, w.ids[0]) == lost[0]
    got = np.concatenate([w.client(p).fetch_ring(ROUND, "messages", w.slots[p]) for p in range(3)])
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(w.clients[0].fetch_ring(ROUND, "messages", w.slots[0]), got[:2])
    assert state(w.net) != answered  # participants 1 and 2 fetched for the first time


# -- idempotent registration -------------------------------------------------------------------
def test_registration_is_once_per_participant_and_replays_are_answered() -> None:
    net = make_net(Mode.MAILBOX, tap=True)
    net.open_round(spec())
    a = net.device(devices=2)
    rpis = [os.urandom(16), os.urandom(16)]
    slots = a.register(ROUND, rpis)
    raw = a.build_registration(ROUND, rpis)
    first_reply = next(resp for link, req, resp in net.log if req == raw)
    before, relays = state(net), sum(link == "c->a" for link, _, _ in net.log)
    # the identical request again: the same reply, no relay to A, nothing changed
    assert a.register(ROUND, rpis) == slots
    assert net.coordinator.handle_device(raw, a.device_id) == first_reply
    assert state(net) == before
    assert sum(link == "c->a" for link, _, _ in net.log) == relays
    # the same participant with another request (other slots, or a freshly sealed part)
    with pytest.raises(AlreadyRegistered, match="already registered with a different request"):
        a.register(ROUND, [os.urandom(16)])
    again = DeviceClient(  # no secret: a new object seals afresh, so its request differs
        a.device_id, net.deployment, lambda r: net.coordinator.handle_device(r, a.device_id)
    )
    with pytest.raises(AlreadyRegistered, match="with a different request"):
        again.register(ROUND, rpis)
    # another participant's slot
    b = net.device()
    with pytest.raises(SlotAlreadyRegistered, match="already registered"):
        b.register(ROUND, [rpis[1]])
    assert state(net) == before
    # after registration closed, the identical resend is still answered
    net.coordinator.close_registration(ROUND)
    assert a.register(ROUND, rpis) == slots


def test_registration_retried_after_a_lost_link_reply_reaches_agreement() -> None:
    """A registered, its reply to C was lost: the participant's resend is answered by A's
    stored reply, so both servers hold the registration and agree on the directory."""
    net = make_net(Mode.SHUFFLED)
    net.open_round(spec())
    dev = net.device(secret=os.urandom(32))
    dropped: list[int] = []

    def lose_first(raw: bytes) -> bytes:
        if not dropped:
            dropped.append(1)
            return b""
        return raw

    net.a_to_c_filter = lose_first
    rpi = os.urandom(16)
    with pytest.raises(MessageError, match="bad magic"):
        dev.register(ROUND, [rpi])
    assert len(net.aggregator.rounds[ROUND].registry.table) == 1
    assert len(net.coordinator.rounds[ROUND].registry.table) == 0
    restarted = DeviceClient(
        dev.device_id,
        net.deployment,
        lambda r: net.coordinator.handle_device(r, dev.device_id),
        secret=dev._secret,
    )
    assert len(restarted.register(ROUND, [rpi])) == 1
    net.coordinator.close_registration(ROUND)  # raises AgreementError if the registries differ


# -- batched fetch -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", SECURE)
def test_batched_fetch_refusals_release_nothing(
    mode: Mode, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = Pools(mode, [3, 1], tap=True)
    w.clients[1].post(
        w.spec, "messages", w.all_slots[:2], np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    )
    w.c.close_phase(ROUND, "messages")
    owner = w.clients[0]
    before = state(w.net)
    cases = [
        (NotRegistrant, "registered to another participant", [w.all_slots[0], w.all_slots[3]]),
        (UnknownSlot, "not registered", [w.all_slots[0], os.urandom(S)]),
        (MessageError, "more than once", [w.all_slots[0], w.all_slots[0]]),
        (WrongLength, "at least one slot \\(None: every registered slot\\)", []),
    ]
    for exc, msg, slots in cases:
        with pytest.raises(exc, match=msg):
            owner.fetch_ring(ROUND, "messages", slots)
        assert state(w.net) == before, msg
    with pytest.raises(TypeError, match="wrap a single slot in a list"):
        owner.fetch_ring(ROUND, "messages", w.all_slots[0])
    three = owner.build_fetch(ROUND, "messages", w.slots[0])
    monkeypatch.setattr(protocol_module, "MAX_SLOTS_PER_FETCH", 2)
    for attempt in (
        lambda: owner.fetch_ring(ROUND, "messages", w.slots[0][::-1]),  # the client checks
        lambda: w.c.handle_device(three, owner.device_id),  # and so does C
    ):
        with pytest.raises(WrongLength, match=r"0\.\.2 slots \(MAX_SLOTS_PER_FETCH; 0: every"):
            attempt()
    monkeypatch.undo()
    assert state(w.net) == before

    # C swaps the slot list it relays (a subset of the owner's slots): the sealed proof binds
    # the whole list, so A refuses
    def swap(raw: bytes) -> bytes:
        m = decode(raw)
        if isinstance(m, RelayFetch):
            return RelayFetch(
                m.device_id, m.round_id, m.phase, m.slot_ids[:S], m.sealed_for_a
            ).to_bytes()
        return raw

    w.net.c_to_a_filter = swap
    with pytest.raises(AuthenticationFailed, match="aggregator refused"):
        owner.fetch_ring(ROUND, "messages", w.slots[0])
    w.net.c_to_a_filter = None
    assert state(w.net) == before
    got = owner.fetch_ring(ROUND, "messages", w.slots[0][::-1])  # any order, all at once
    assert got.shape == (3, DIM)
    enc = w.codec.encode(np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(got, enc[::-1])
    # one fetch per (participant, round, phase): another list is refused, at C ...
    with pytest.raises(AlreadyFetched, match="different request"):
        owner.fetch_ring(ROUND, "messages", w.slots[0][:1])
    # ... and at A, should C relay it anyway
    other = w.client(0)
    other._secrets[ROUND] = owner._secrets[ROUND]
    forged = FetchRequest.from_bytes(other.build_fetch(ROUND, "messages", w.slots[0][:1]))
    relay = RelayFetch(
        forged.device_id, ROUND, "messages", forged.slot_ids, forged.sealed_for_a
    ).to_bytes()
    refusal = decode(w.net.aggregator.handle(relay))
    assert isinstance(refusal, ErrorReply) and refusal.error == "AlreadyFetched"


@pytest.mark.parametrize("mode", SECURE)
def test_fetch_retried_after_a_lost_link_reply(mode: Mode) -> None:
    """A answered (and recorded) the fetch but its reply to C was lost; the participant's retry
    is answered from A's stored reply: the identical box, the exact sums."""
    w = Pools(mode, [2, 1])
    w.clients[1].post(w.spec, "messages", [w.all_slots[1]], np.array([[9.0, -9.0, 0.5]]))
    w.c.close_phase(ROUND, "messages")
    boxes: list[bytes] = []

    def lose_first_fetch_reply(raw: bytes) -> bytes:
        m = decode(raw)
        if isinstance(m, FetchReply):
            boxes.append(m.box)
            if len(boxes) == 1:
                return b""
        return raw

    w.net.a_to_c_filter = lose_first_fetch_reply
    with pytest.raises(MessageError, match="bad magic"):
        w.clients[0].fetch_ring(ROUND, "messages", w.slots[0])
    got = w.clients[0].fetch_ring(ROUND, "messages", w.slots[0])
    assert boxes[0] == boxes[1]
    np.testing.assert_array_equal(
        got, w.codec.encode(np.array([[0.0, 0.0, 0.0], [9.0, -9.0, 0.5]]))
    )


def test_fetch_of_an_overflowed_slot_is_withheld_for_the_whole_batch() -> None:
    codec = FixedPointCodec(frac_bits=16, max_abs=10.0, max_summands=2)
    w = Pools(Mode.SHUFFLED, [2, 1, 1, 1], codec=codec)  # mailbox C refuses at post time
    for p in (1, 2, 3):  # three summands to participant 0's first slot (bound: 2); full posts,
        # so no dummy lands anywhere else
        slots = [w.all_slots[0], w.all_slots[p + 1]]
        w.clients[p].post(w.spec, "messages", slots, np.ones((2, DIM)))
    w.c.close_phase(ROUND, "messages")
    before = state(w.net)
    with pytest.raises(OverflowBoundError, match="withheld"):
        w.clients[0].fetch_ring(ROUND, "messages", w.slots[0])
    assert state(w.net) == before  # nothing recorded: a refused fetch is not spent
    np.testing.assert_array_equal(
        w.clients[0].fetch_ring(ROUND, "messages", w.slots[0][1:]), np.zeros((1, DIM))
    )
