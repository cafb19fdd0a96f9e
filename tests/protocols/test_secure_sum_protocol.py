"""Posting modes end to end over the in-memory transport: sums, dropouts, replays, refusals."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocols.secure_sum.protocol as protocol_module
from protocols.secure_sum import (
    AlreadyFetched,
    AuthenticationFailed,
    ConflictingSubmission,
    DeviceClient,
    EncodingError,
    FixedPointCodec,
    InMemoryNetwork,
    InsecurePlaintextWarning,
    InvalidSlotName,
    MessageError,
    Mode,
    NotRegistrant,
    OverflowBoundError,
    PartialGroup,
    PhaseClosed,
    PhaseError,
    PhaseNotReleased,
    PhaseSpec,
    RegistrationError,
    RoundSpec,
    SlotAlreadyRegistered,
    SlotKind,
    UnknownPhase,
    UnknownSlot,
    WrongLength,
    group_sum,
)
from protocols.secure_sum.messages import (
    Agreed,
    DirectoryRequest,
    FetchRequest,
    KeySetReply,
    MailboxPost,
    RelayMailbox,
    RelayReceipt,
    RelayRegister,
    RelayShuffled,
    ShuffledForC,
    ShuffledPost,
    decode,
)
from protocols.secure_sum.protocol import CID_BYTES
from protocols.secure_sum.slots import SLOT_ID_BYTES

ROUND = 7
SECURE = [Mode.MAILBOX, Mode.SHUFFLED, Mode.DENSE]


def make_net(mode: Mode, **kw) -> InMemoryNetwork:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecurePlaintextWarning)
        return InMemoryNetwork(mode, **kw)


class World:
    """A round with a pseudonym phase and an aggregate phase; every device owns one slot."""

    def __init__(
        self,
        mode: Mode,
        n: int,
        dim: int = 3,
        k: int = 2,
        codec: FixedPointCodec | None = None,
        secrets: bool = False,
        **kw,
    ) -> None:
        self.net = make_net(mode, codec=codec, **kw)
        self.spec = RoundSpec(
            ROUND,
            (
                PhaseSpec("messages", dim, SlotKind.PSEUDONYM, k),
                PhaseSpec("obs", dim, SlotKind.AGGREGATE, 1, ("global/day/7", "region/BK/day/7")),
            ),
        )
        self.net.open_round(self.spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecurePlaintextWarning)
            # secrets: deterministic clients, every random choice derived from a participant secret
            self.devices = [
                self.net.device(secret=os.urandom(32) if secrets else None) for _ in range(n)
            ]
        self.slots = [d.register(ROUND, [os.urandom(16)])[0] for d in self.devices]
        self.net.coordinator.close_registration(ROUND)
        self.codec = self.net.deployment.codec
        self.dim = dim
        self.c = self.net.coordinator

    def ring_sums(self, posts: list[tuple[int, list[int], np.ndarray]]) -> np.ndarray:
        """Expected ring sums per device slot for (device, target devices, values) posts."""
        idx = np.array([t for _, ts, _ in posts for t in ts], dtype=np.int64)
        rows = [self.codec.encode(v) for _, _, v in posts]
        enc = np.concatenate(rows) if rows else np.zeros((0, self.dim), dtype=np.int64)
        return group_sum(idx, enc, len(self.devices))[0]

    def post(self, i: int, targets: list[int], values: np.ndarray) -> bool:
        return self.devices[i].post(self.spec, "messages", [self.slots[t] for t in targets], values)

    def fetch_all(self, who: list[int] | None = None) -> np.ndarray:
        who = list(range(len(self.devices))) if who is None else who
        return np.concatenate(
            [self.devices[i].fetch_ring(ROUND, "messages", [self.slots[i]]) for i in who]
        )


def server_state(net: InMemoryNetwork) -> tuple:
    """A digest of every piece of server state, to prove refusals change nothing."""
    out = []
    for server in (net.coordinator, net.aggregator):
        for rid, rnd in sorted(server.rounds.items()):
            out.append((rid, rnd.registration_open, rnd.registry.table.id_bytes()))
            out.append(
                tuple(
                    sorted(
                        (d, r.request_digest, r.reply, tuple(sorted(r.fetches.items())))
                        for d, r in rnd.registry._participants.items()
                    )
                )
            )
            out.append(tuple(sorted(rnd.closed)))
            for name, box in sorted(rnd.outbox.items()):
                out.append((name, tuple(box)))
            for name, acc in sorted(rnd.accumulators.items()):
                slot, share = acc.rows()
                out.append(
                    (
                        name,
                        acc.state,
                        acc.unit_count,
                        hashlib.sha256(slot.tobytes() + share.tobytes()).hexdigest(),
                    )
                )
    return tuple(out)


# -- exact sums (property-based) ---------------------------------------------------------------
@st.composite
def scenario(draw: st.DrawFn, max_devices: int) -> tuple[int, int, int, list]:
    n = draw(st.integers(1, max_devices))
    dim = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    value = st.one_of(
        st.sampled_from([0.0, 1000.0, -1000.0, 2.0**-20, -(2.0**-20)]),
        st.floats(-1000.0, 1000.0, allow_nan=False),
    )
    posts = []
    for i in range(n):
        m = draw(st.integers(0, k))
        targets = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
        vals = draw(st.lists(st.lists(value, min_size=dim, max_size=dim), min_size=m, max_size=m))
        posts.append((i, targets, np.array(vals, dtype=np.float64).reshape(m, dim)))
    return n, dim, k, posts


def _check_exact(mode: Mode, sc: tuple[int, int, int, list]) -> None:
    n, dim, k, posts = sc
    codec = FixedPointCodec(frac_bits=20, max_abs=1000.0, max_summands=4096)
    w = World(mode, n, dim=dim, k=k, codec=codec)
    for i, targets, vals in posts:
        w.post(i, targets, vals)
        w.devices[i].post(w.spec, "obs", ["global/day/7"] * len(vals[:1]), vals[:1])
    w.c.close_phase(ROUND, "messages")
    w.c.close_phase(ROUND, "obs")
    np.testing.assert_array_equal(w.fetch_all(), w.ring_sums(posts))
    expected_obs = sum(
        (codec.encode(v[:1]).sum(axis=0) for _, _, v in posts), np.zeros(dim, dtype=np.int64)
    )
    opened = w.c.open_aggregates_ring(ROUND, "obs")
    np.testing.assert_array_equal(opened["global/day/7"], expected_obs)
    np.testing.assert_array_equal(opened["region/BK/day/7"], np.zeros(dim, dtype=np.int64))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(6))
def test_mailbox_sums_exact(sc) -> None:
    _check_exact(Mode.MAILBOX, sc)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(4))
def test_shuffled_sums_exact(sc) -> None:
    _check_exact(Mode.SHUFFLED, sc)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(6))
def test_dense_sums_exact(sc) -> None:
    _check_exact(Mode.DENSE, sc)


def test_plaintext_sums_exact_and_warns() -> None:
    with pytest.warns(InsecurePlaintextWarning, match="INSECURE"):
        InMemoryNetwork(Mode.PLAINTEXT)
    w = World(Mode.PLAINTEXT, 3)
    posts = [(0, [1, 2], np.array([[1.0, 2, 3], [-4, 5, 6]])), (1, [2], np.array([[0.5, 0, -1]]))]
    for p in posts:
        w.post(*p)
    w.c.close_phase(ROUND, "messages")
    np.testing.assert_array_equal(w.fetch_all(), w.ring_sums(posts))


def test_boundary_values_at_the_overflow_bound() -> None:
    # ceil(2^20 · 2^40) · 7 < 2^63: seven maximal contributions must sum exactly, either sign
    codec = FixedPointCodec(frac_bits=40, max_abs=2.0**20, max_summands=7)
    for sign in (1.0, -1.0):
        w = World(Mode.MAILBOX, 7, dim=1, k=1, codec=codec)
        for i in range(7):
            w.devices[i].post(w.spec, "obs", ["global/day/7"], [[sign * 2.0**20]])
        w.c.close_phase(ROUND, "obs")
        assert w.c.open_aggregates(ROUND, "obs")["global/day/7"].tolist() == [sign * 7 * 2**20]


def test_overflow_detected_and_state_unchanged() -> None:
    codec = FixedPointCodec(frac_bits=16, max_abs=10.0, max_summands=3)
    w = World(Mode.MAILBOX, 4, dim=1, k=1, codec=codec)
    for i in range(3):
        w.devices[i].post(w.spec, "obs", ["global/day/7"], [[1.0]])
    before = server_state(w.net)
    with pytest.raises(OverflowBoundError, match="max_summands=3"):
        w.devices[3].post(w.spec, "obs", ["global/day/7"], [[1.0]])
    assert server_state(w.net) == before
    with pytest.raises(EncodingError, match="exceeds max_abs"):
        w.devices[3].post(w.spec, "obs", ["global/day/7"], [[10.5]])


# -- dropouts --------------------------------------------------------------------------------
def _drop_relayed_part(victim: bytes) -> Callable[[bytes], bytes]:
    """A C→A filter that loses one device's A-part (mailbox) or outer envelope (shuffled)."""

    def f(raw: bytes) -> bytes:
        m = decode(raw)
        if isinstance(m, RelayMailbox):
            keep = [i for i, d in enumerate(m.device_ids) if d != victim]
            return RelayMailbox(
                m.round_id,
                m.phase,
                *(
                    tuple(col[i] for i in keep)
                    for col in (m.device_ids, m.slot_ids, m.sealed_for_a)
                ),
            ).to_bytes()
        if isinstance(m, RelayShuffled):
            keep = [i for i, d in enumerate(m.device_ids) if d != victim]
            return RelayShuffled(
                m.round_id,
                m.phase,
                tuple(m.device_ids[i] for i in keep),
                tuple(m.outers[i] for i in keep),
                m.items_for_a,
            ).to_bytes()
        return raw

    return f


@pytest.mark.parametrize("mode", SECURE)
def test_dropouts_at_every_phase(mode: Mode) -> None:
    w = World(mode, 6, k=2)
    vals = {i: np.array([[i, 1.0, -2.0], [0.5, -i, 3.0]]) for i in range(6)}
    targets = {i: [(i + 1) % 6, (i + 3) % 6] for i in range(6)}
    # device 0: dropped before posting; device 1: post reached C, its A-bound part was lost;
    # device 2: excluded by C at the deadline; device 3: drops before fetching its sum
    for i in (1, 2, 3, 4, 5):
        w.post(i, targets[i], vals[i])
    w.net.c_to_a_filter = _drop_relayed_part(w.devices[1].device_id)
    assert w.c.exclude_device(ROUND, "messages", w.devices[2].device_id)
    report = w.c.close_phase(ROUND, "messages")
    w.net.c_to_a_filter = None
    surviving = [(i, targets[i], vals[i]) for i in (3, 4, 5)]
    assert report.surviving == (3 * 2 if mode is Mode.SHUFFLED else 3)
    expected = w.ring_sums(surviving)
    fetchers = [0, 1, 2, 4, 5]
    np.testing.assert_array_equal(w.fetch_all(fetchers), expected[fetchers])


def test_shuffled_lost_return_item_is_excluded_exactly() -> None:
    w = World(Mode.SHUFFLED, 4, k=2)
    posts = [
        (i, [(i + 1) % 4, (i + 2) % 4], np.array([[i + 1.0, 2, 3], [-1, i, 0.25]]))
        for i in range(4)
    ]
    for p in posts:
        w.post(*p)

    def lose_one(raw: bytes) -> bytes:
        m = decode(raw)
        if isinstance(m, ShuffledForC):
            return ShuffledForC(
                m.round_id, m.phase, m.items_for_c[1:], m.accepted, m.replayed, m.rejected
            ).to_bytes()
        return raw

    w.net.a_to_c_filter = lose_one
    report = w.c.close_phase(ROUND, "messages")
    assert report.surviving == 7 and report.accepted_by_aggregator == 8
    missing = (w.ring_sums(posts) - w.fetch_all()).sum(axis=0)
    # exactly one posted item is missing, nothing else
    items = [w.codec.encode(row) for _, _, v in posts for row in v]
    assert sum(np.array_equal(missing, it) for it in items) >= 1


@pytest.mark.parametrize("mode", SECURE)
def test_tampered_relay_part_is_excluded_at_both_servers(mode: Mode) -> None:
    w = World(mode, 3, k=1)
    posts = [(i, [(i + 1) % 3], np.array([[float(i + 1), 0, 0]])) for i in range(3)]
    for p in posts:
        w.post(*p)
    victim = w.devices[0].device_id

    def tamper(raw: bytes) -> bytes:
        m = decode(raw)
        if isinstance(m, RelayMailbox):
            parts = list(m.sealed_for_a)
            i = m.device_ids.index(victim)
            parts[i] = parts[i][:-1] + bytes([parts[i][-1] ^ 1])
            return RelayMailbox(
                m.round_id, m.phase, m.device_ids, m.slot_ids, tuple(parts)
            ).to_bytes()
        if isinstance(m, RelayShuffled):
            outers = list(m.outers)
            i = m.device_ids.index(victim)
            outers[i] = outers[i][:60] + bytes([outers[i][60] ^ 1]) + outers[i][61:]
            return RelayShuffled(
                m.round_id, m.phase, m.device_ids, tuple(outers), m.items_for_a
            ).to_bytes()
        return raw

    w.net.c_to_a_filter = tamper
    report = w.c.close_phase(ROUND, "messages")
    assert report.rejected_by_aggregator == 1
    np.testing.assert_array_equal(w.fetch_all(), w.ring_sums(posts[1:]))


# -- retries and replays ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", SECURE)
def test_retries_and_replays_never_double_count(mode: Mode) -> None:
    w = World(mode, 3, k=1)
    posts = [(i, [(i + 1) % 3], np.array([[1.0, -1.0, float(i)]])) for i in range(3)]
    for p in posts:
        assert w.post(*p)
    assert not w.devices[0].resend(ROUND, "messages")  # a retry: accepted, counted once
    before = server_state(w.net)
    with pytest.raises(ConflictingSubmission, match="different"):
        w.post(0, [1], np.array([[9.0, 9.0, 9.0]]))
    assert server_state(w.net) == before

    def duplicate(raw: bytes) -> bytes:  # the relay replays everything twice
        m = decode(raw)
        if isinstance(m, RelayMailbox):
            return RelayMailbox(
                m.round_id, m.phase, m.device_ids * 2, m.slot_ids * 2, m.sealed_for_a * 2
            ).to_bytes()
        if isinstance(m, RelayShuffled):
            return RelayShuffled(
                m.round_id, m.phase, m.device_ids * 2, m.outers * 2, m.items_for_a * 2
            ).to_bytes()
        return raw

    w.net.c_to_a_filter = duplicate
    report = w.c.close_phase(ROUND, "messages")
    assert report.surviving == 3
    np.testing.assert_array_equal(w.fetch_all(), w.ring_sums(posts))


# -- refusals, each specific and leaving state unchanged -------------------------------------
@pytest.mark.parametrize("mode", [*SECURE, Mode.PLAINTEXT])
def test_bad_posts_rejected_state_unchanged(mode: Mode) -> None:
    w = World(mode, 3, k=2)
    w.post(0, [1], np.array([[1.0, 2.0, 3.0]]))
    before = server_state(w.net)
    dev = w.devices[1]
    with pytest.raises(WrongLength, match=r"shape \(1, 3\)"):
        dev.post(w.spec, "messages", [w.slots[0]], np.ones((1, 4)))
    with pytest.raises(WrongLength, match="exceed items_per_device=2"):
        dev.post(w.spec, "messages", [w.slots[0]] * 3, np.ones((3, 3)))
    with pytest.raises(UnknownSlot, match="unknown slot"):
        dev.post(w.spec, "messages", [os.urandom(SLOT_ID_BYTES)], np.ones((1, 3)))
    with pytest.raises(InvalidSlotName, match="invalid aggregate slot name"):
        dev.post(w.spec, "obs", ["global/day/07"], np.ones((1, 3)))
    with pytest.raises(UnknownSlot):
        dev.post(w.spec, "obs", ["global/day/8"], np.ones((1, 3)))  # valid name, not declared
    if mode is not Mode.SHUFFLED:
        raw = dev.build_post(w.spec, "messages", [w.slots[0]], np.ones((1, 3)))
        m = MailboxPost.from_bytes(raw)
        short = MailboxPost(
            m.device_id, m.round_id, m.phase, m.dim, m.slot_ids, m.share_c[:-8], m.sealed_for_a
        )
        with pytest.raises(WrongLength, match="share block"):
            w.c.handle_device(short.to_bytes(), dev.device_id)
    assert server_state(w.net) == before
    w.c.close_phase(ROUND, "messages")
    with pytest.raises(PhaseClosed, match="closed"):
        dev.post(w.spec, "messages", [w.slots[0]], np.ones((1, 3)))


@pytest.mark.parametrize("mode", SECURE)
def test_fetch_only_by_registrant_once_per_phase(mode: Mode) -> None:
    w = World(mode, 3, k=1)
    w.post(0, [1], np.array([[1.0, 2.0, 3.0]]))
    owner, thief = w.devices[1], w.devices[2]
    with pytest.raises(PhaseNotReleased):
        owner.fetch(ROUND, "messages", [w.slots[1]])
    w.c.close_phase(ROUND, "messages")
    before = server_state(w.net)
    with pytest.raises(NotRegistrant, match="registered to another participant"):
        thief.fetch(ROUND, "messages", [w.slots[1]])
    # a thief claiming the owner's id over its own authenticated channel
    impostor = DeviceClient(
        owner.device_id, w.net.deployment, lambda raw: w.c.handle_device(raw, thief.device_id)
    )
    impostor._secrets[ROUND] = os.urandom(32)
    with pytest.raises(NotRegistrant, match="authenticated peer"):
        impostor.fetch(ROUND, "messages", [w.slots[1]])
    # C itself forging the owner's fetch: it lacks the fetch secret, so A refuses
    forged = DeviceClient(
        owner.device_id, w.net.deployment, lambda raw: w.c.handle_device(raw, owner.device_id)
    )
    forged._secrets[ROUND] = os.urandom(32)
    with pytest.raises(NotRegistrant, match="fetch proof does not match"):
        forged.fetch(ROUND, "messages", [w.slots[1]])
    with pytest.raises(UnknownSlot):
        owner.fetch(ROUND, "messages", [os.urandom(SLOT_ID_BYTES)])
    assert server_state(w.net) == before
    assert owner.fetch(ROUND, "messages", [w.slots[1]]).tolist() == [[1.0, 2.0, 3.0]]
    # the identical request again (a retry after a lost reply) gets the same answer, and
    # changes nothing at either server
    answered = server_state(w.net)
    assert owner.fetch(ROUND, "messages", [w.slots[1]]).tolist() == [[1.0, 2.0, 3.0]]
    assert server_state(w.net) == answered
    # a different request for the same phase (here: a fresh envelope) is refused
    rebuilt = DeviceClient(
        owner.device_id, w.net.deployment, lambda raw: w.c.handle_device(raw, owner.device_id)
    )
    rebuilt._secrets[ROUND] = owner._secrets[ROUND]
    with pytest.raises(AlreadyFetched, match="different request"):
        rebuilt.fetch(ROUND, "messages", [w.slots[1]])
    assert server_state(w.net) == answered


def test_registration_refusals() -> None:
    w = make_net(Mode.MAILBOX)
    spec = RoundSpec(1, (PhaseSpec("messages", 2, SlotKind.PSEUDONYM, 1),))
    w.open_round(spec)
    a, b = w.device(), w.device()
    rpi = os.urandom(16)
    a.register(1, [rpi])
    before = server_state(w)
    with pytest.raises(SlotAlreadyRegistered, match="already registered"):
        b.register(1, [os.urandom(16), rpi])
    assert server_state(w) == before
    w.coordinator.close_registration(1)
    with pytest.raises(PhaseClosed, match="registration is closed"):
        b.register(1, [os.urandom(16)])


# -- what the servers see ----------------------------------------------------------------------
def _min_chi2_p(view: np.ndarray) -> float:
    """Smallest chi-square p-value over the 8 byte positions of int64 shares (and all bytes).

    Per position, so a mask that leaves some byte lanes structured (e.g. a 32-bit mask) fails.
    """
    from scipy.stats import chisquare

    lanes = np.ascontiguousarray(view, dtype="<i8").view(np.uint8).reshape(-1, 8)
    ps = [chisquare(np.bincount(lanes.ravel(), minlength=256)).pvalue]
    ps += [chisquare(np.bincount(lanes[:, j], minlength=256)).pvalue for j in range(8)]
    return float(min(ps))


@pytest.mark.parametrize(
    ("mode", "secrets"), [(Mode.PLAINTEXT, False), *((m, s) for m in SECURE for s in (False, True))]
)
def test_each_server_view_of_shares_is_uniform_unless_plaintext(mode: Mode, secrets: bool) -> None:
    w = World(mode, 40, dim=16, k=4, secrets=secrets)
    for i in range(40):  # highly structured data: small non-negative integers
        w.post(i, [(i + j) % 40 for j in range(4)], np.full((4, 16), float(i % 3)))
    w.c.close_phase(ROUND, "messages")
    c_view = w.c.share_rows(ROUND, "messages")[1]
    a_view = w.net.aggregator.share_rows(ROUND, "messages")[1]
    # 10 240 words, 1 280 per byte lane; dense: each of the 40 posts covers all 40 slots
    assert c_view.size == a_view.size == 40 * (40 if mode is Mode.DENSE else 4) * 16
    if mode is Mode.PLAINTEXT:
        # the control: C holds the raw values, A all-zero "shares"
        assert _min_chi2_p(c_view) < 1e-12 and _min_chi2_p(a_view) < 1e-12
    else:
        # 18 tests (9 per view) at 1e-6 each: a false alarm has probability < 2e-5 per run
        assert _min_chi2_p(c_view) > 1e-6
        assert _min_chi2_p(a_view) > 1e-6


def _fragment_match(known: dict[bytes, bytes], item: bytes) -> bytes | None:
    """The sender whose bytes share any 16-byte window with ``item`` (envelope ‖ plaintext).

    Catches any reuse across the unlinkability boundary: a repeated ephemeral key, a
    contribution id or share visible in the clear, an envelope forwarded unchanged, ….
    """
    windows = {item[i : i + 16] for i in range(len(item) - 15)}
    for sender, raw in known.items():
        if any(raw[i : i + 16] in windows for i in range(len(raw) - 15)):
            return sender
    return None


def _run_linkage(
    mode: Mode, n: int, c_permutation=None, secrets: bool = False
) -> tuple[float, float]:
    """Every device sends one item to the next device's slot; C then A try to name senders.

    Returns the fraction of slots whose sender C (resp. A) identifies from everything it saw:
    all device requests with their authenticated senders, all relay traffic, the plaintext of
    every envelope it can open, any byte fragment shared between an item and a sender's
    traffic, and, failing that, the order in which items reached it.
    """
    kw = {"tap": True}
    if c_permutation is not None:
        kw["c_permutation"] = c_permutation
        kw["a_permutation"] = c_permutation
    w = World(mode, n, k=1, secrets=secrets, **kw)
    for i in range(n):
        w.post(i, [(i + 1) % n], np.ones((1, 3)))
    w.c.close_phase(ROUND, "messages")
    truth = {w.slots[(i + 1) % n]: w.devices[i].device_id for i in range(n)}
    posts = [
        (decode(req), req)
        for link, req, _ in w.net.log
        if link == "device->c" and isinstance(decode(req), (MailboxPost, ShuffledPost))
    ]
    senders = [m.device_id for m, _ in posts]
    guess_c: dict[bytes, bytes] = {}
    guess_a: dict[bytes, bytes] = {}
    if mode is Mode.MAILBOX:
        for m, _ in posts:  # C reads the slot list of every post
            guess_c[m.slot_ids[:SLOT_ID_BYTES]] = m.device_id
        relay = next(
            decode(r)
            for link, r, _ in w.net.log
            if link == "c->a" and isinstance(decode(r), RelayMailbox)
        )
        for d, s in zip(relay.device_ids, relay.slot_ids, strict=True):
            guess_a[s[:SLOT_ID_BYTES]] = d
    else:
        from protocols.secure_sum.envelope import open_envelope
        from protocols.secure_sum.protocol import (
            INFO_ITEM_A,
            INFO_ITEM_C,
            INFO_OUTER,
            phase_aad,
            post_header,
        )

        aad = phase_aad(ROUND, "messages")
        back = next(
            decode(resp)
            for link, _, resp in w.net.log
            if link == "c->a" and isinstance(decode(resp), ShuffledForC)
        )
        relay = next(
            decode(r)
            for link, r, _ in w.net.log
            if link == "c->a" and isinstance(decode(r), RelayShuffled)
        )
        # C: every byte each sender sent it. A: each sender's id and outer envelope, sealed
        # and opened (A can open those).
        c_known = {m.device_id: req for m, req in posts}
        a_known = {
            d: d
            + outer
            + open_envelope(w.net.a_keys, outer, INFO_OUTER, post_header(d, ROUND, "messages"))
            for d, outer in zip(relay.device_ids, relay.outers, strict=True)
        }
        for pos, env in enumerate(back.items_for_c):
            plain = open_envelope(w.net.c_keys, env, INFO_ITEM_C, aad)
            slot = plain[CID_BYTES : CID_BYTES + SLOT_ID_BYTES]
            guess_c[slot] = _fragment_match(c_known, env + plain) or senders[pos % n]
        for pos, env in enumerate(relay.items_for_a):
            plain = open_envelope(w.net.a_keys, env, INFO_ITEM_A, aad)
            slot = plain[CID_BYTES : CID_BYTES + SLOT_ID_BYTES]
            guess_a[slot] = _fragment_match(a_known, env + plain) or relay.device_ids[pos % n]
    acc_c = np.mean([guess_c.get(s) == d for s, d in truth.items()])
    acc_a = np.mean([guess_a.get(s) == d for s, d in truth.items()])
    return float(acc_c), float(acc_a)


def test_linkage_attack_succeeds_in_mailbox_fails_in_shuffled() -> None:
    n = 32
    assert _run_linkage(Mode.MAILBOX, n) == (1.0, 1.0)
    # the same attack has teeth: without the servers' shuffles it names every sender
    identity = lambda m: np.arange(m, dtype=np.int64)  # noqa: E731
    assert _run_linkage(Mode.SHUFFLED, n, c_permutation=identity) == (1.0, 1.0)
    # with CSPRNG shuffles it is at chance: the correct guesses are the fixed points of a
    # uniform random permutation of 32 senders, ~Poisson(1); P(>= 8 fixed points) < 1.1e-5
    acc_c, acc_a = _run_linkage(Mode.SHUFFLED, n)
    assert acc_c <= 0.25 and acc_a <= 0.25
    # deterministic (secret-derived) ids, seeds and ephemeral keys are just as unlinkable
    acc_c, acc_a = _run_linkage(Mode.SHUFFLED, n, secrets=True)
    assert acc_c <= 0.25 and acc_a <= 0.25


def test_linkage_attack_catches_a_leaky_contribution_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The byte-fragment part of the attack has teeth too: ids derived from the sender leak."""
    monkeypatch.setattr(DeviceClient, "_new_cids", lambda self, k, choices: [self.device_id] * k)
    # each server finds the sender's id inside the items it opens
    assert _run_linkage(Mode.SHUFFLED, 16) == (1.0, 1.0)


# -- more refusals, each specific and leaving every server's state unchanged ----------------
@pytest.mark.parametrize("mode", [*SECURE, Mode.PLAINTEXT])
def test_device_request_refusals_leave_state_unchanged(mode: Mode) -> None:
    w = World(mode, 3, k=1)
    w.post(0, [1], np.array([[1.0, 2.0, 3.0]]))
    dev = w.devices[1]
    raw = dev.build_post(w.spec, "messages", [w.slots[0]], np.ones((1, 3)))
    other = SECURE[0] if mode is not SECURE[0] else SECURE[1]
    wrong_mode = (
        World(other, 1, k=1).devices[0].build_post(w.spec, "obs", ["global/day/7"], np.ones((1, 3)))
    )
    before = server_state(w.net)
    cases = [
        (MessageError, "bad magic", b"garbage", dev.device_id),
        (MessageError, "truncated", raw[:-9], dev.device_id),
        (MessageError, "trailing bytes", raw + b"\x00", dev.device_id),
        (NotRegistrant, "authenticated peer", raw, w.devices[2].device_id),
        (MessageError, "mode", wrong_mode, decode(wrong_mode).device_id),
        (UnknownPhase, "round 99", DirectoryRequest(99).to_bytes(), dev.device_id),
    ]
    for exc, msg, payload, peer in cases:
        with pytest.raises(exc, match=msg):
            w.c.handle_device(payload, peer)
        assert server_state(w.net) == before, msg
    with pytest.raises(UnknownPhase, match="no phase 'nope'"):
        dev.post(w.spec, "nope", [w.slots[0]], np.ones((1, 3)))
    assert server_state(w.net) == before


def test_registration_tampering_refused_state_unchanged() -> None:
    net = make_net(Mode.SHUFFLED)
    spec = RoundSpec(1, (PhaseSpec("messages", 2, SlotKind.PSEUDONYM, 1),))
    net.open_round(spec)
    a, b = net.device(), net.device()
    a.register(1, [os.urandom(16)])
    before = server_state(net)

    def redirect(raw: bytes) -> bytes:  # C swaps the slot list it relays to A
        m = decode(raw)
        if isinstance(m, RelayRegister):
            return RelayRegister(
                m.device_id, m.round_id, os.urandom(SLOT_ID_BYTES), m.sealed_for_a
            ).to_bytes()
        return raw

    net.c_to_a_filter = redirect
    with pytest.raises(NotRegistrant, match="differs from the one the device sealed"):
        b.register(1, [os.urandom(16)])
    assert server_state(net) == before

    def flip(raw: bytes) -> bytes:  # a tampered sealed registration secret
        m = decode(raw)
        if isinstance(m, RelayRegister):
            sealed = m.sealed_for_a[:-1] + bytes([m.sealed_for_a[-1] ^ 1])
            return RelayRegister(m.device_id, m.round_id, m.slot_ids, sealed).to_bytes()
        return raw

    net.c_to_a_filter = flip
    with pytest.raises(AuthenticationFailed, match="aggregator refused"):
        b.register(1, [os.urandom(16)])
    assert server_state(net) == before
    net.c_to_a_filter = None
    with pytest.raises(PhaseError, match="final only after registration"):
        b.directory(1)
    assert server_state(net) == before


# -- closing a phase survives a broken link ----------------------------------------------------
@pytest.mark.parametrize(
    ("mode", "lost"),
    [
        (Mode.MAILBOX, RelayReceipt),
        (Mode.SHUFFLED, ShuffledForC),
        *((m, t) for m in SECURE for t in (KeySetReply, Agreed)),
    ],
)
def test_close_phase_resumes_after_a_lost_reply(mode: Mode, lost: type) -> None:
    w = World(mode, 4, k=2)
    posts = [(i, [(i + 1) % 4, (i + 2) % 4], np.full((2, 3), i - 1.5)) for i in range(4)]
    for p in posts:
        w.post(*p)
    dropped: list[int] = []

    def lose_once(raw: bytes) -> bytes:
        if not dropped and isinstance(decode(raw), lost):
            dropped.append(1)
            return b""  # the reply never arrives intact
        return raw

    w.net.a_to_c_filter = lose_once
    with pytest.raises(MessageError, match="bad magic"):
        w.c.close_phase(ROUND, "messages")
    with pytest.raises(PhaseClosed):  # posts stay refused while the close is pending
        w.post(0, [1], np.ones((1, 3)))
    with pytest.raises(PhaseNotReleased):
        w.devices[1].fetch(ROUND, "messages", [w.slots[1]])
    report = w.c.close_phase(ROUND, "messages")
    assert report.surviving == (8 if mode is Mode.SHUFFLED else 4)
    np.testing.assert_array_equal(w.fetch_all(), w.ring_sums(posts))
    with pytest.raises(PhaseClosed, match="already closed and agreed"):
        w.c.close_phase(ROUND, "messages")


# -- overflow: withheld, never wrapped --------------------------------------------------------
def test_shuffled_slot_over_the_summand_bound_is_withheld() -> None:
    codec = FixedPointCodec(frac_bits=16, max_abs=10.0, max_summands=3)
    w = World(Mode.SHUFFLED, 6, k=1, codec=codec)
    for i in range(1, 5):  # four items to device 0's slot (bound: 3); one to device 1's
        w.post(i, [0], np.ones((1, 3)))
    w.post(5, [1], np.full((1, 3), 2.0))
    w.c.close_phase(ROUND, "messages")
    before = server_state(w.net)
    with pytest.raises(OverflowBoundError, match="withheld"):
        w.devices[0].fetch(ROUND, "messages", [w.slots[0]])
    assert server_state(w.net) == before  # a refused fetch is not spent
    assert w.devices[1].fetch(ROUND, "messages", [w.slots[1]]).tolist() == [[2.0, 2.0, 2.0]]


@pytest.mark.parametrize("mode", SECURE)
def test_out_of_range_contribution_is_refused_at_decode(mode: Mode) -> None:
    codec = FixedPointCodec(frac_bits=16, max_abs=10.0, max_summands=4)
    w = World(mode, 3, k=1, codec=codec)
    # a malicious device skips the range check (its codec allows 1e6); servers cannot see it
    evil_codec = FixedPointCodec(frac_bits=16, max_abs=1e6, max_summands=1)
    evil = DeviceClient(
        w.devices[2].device_id,
        replace(w.net.deployment, codec=evil_codec),
        lambda raw: w.c.handle_device(raw, w.devices[2].device_id),
        w.net.directory_cache,
    )
    evil.post(w.spec, "messages", [w.slots[0]], np.full((1, 3), 5e5))
    evil.post(w.spec, "obs", ["global/day/7"], np.full((1, 3), 5e5))
    w.post(1, [0], np.ones((1, 3)))
    w.c.close_phase(ROUND, "messages")
    w.c.close_phase(ROUND, "obs")
    with pytest.raises(OverflowBoundError, match="refusing to decode"):
        w.devices[0].fetch(ROUND, "messages", [w.slots[0]])
    with pytest.raises(OverflowBoundError, match="refusing to decode"):
        w.c.open_aggregates(ROUND, "obs")


def test_shuffled_lost_a_item_is_excluded_exactly() -> None:
    w = World(Mode.SHUFFLED, 4, k=1)
    posts = [(i, [(i + 1) % 4], np.array([[i + 1.0, 10.0 * i, -1]])) for i in range(4)]
    for p in posts:
        w.post(*p)

    def lose_one(raw: bytes) -> bytes:
        m = decode(raw)
        if isinstance(m, RelayShuffled):
            return RelayShuffled(
                m.round_id, m.phase, m.device_ids, m.outers, m.items_for_a[1:]
            ).to_bytes()
        return raw

    w.net.c_to_a_filter = lose_one
    report = w.c.close_phase(ROUND, "messages")
    assert report.surviving == 3 and report.accepted_by_coordinator == 4
    got, full = w.fetch_all(), w.ring_sums(posts)
    # exactly one slot lost exactly its one contribution; the others are exact
    assert (got != full).any(axis=1).sum() == 1
    assert (got == 0).all(axis=1).sum() == 1


def test_a_round_the_aggregator_lost_is_void_at_the_coordinator() -> None:
    """A restarted aggregator holds no round: C's next call for it raises RoundLost (the
    attempt is void), while a round C never opened stays an ordinary UnknownRound."""
    from protocols.secure_sum import AggregatorServer, RoundLost, UnknownRound

    net = InMemoryNetwork(Mode.MAILBOX)
    spec = RoundSpec(5, (PhaseSpec("obs", 2, SlotKind.AGGREGATE, 1, ("global/day/0",)),))
    net.open_round(spec)
    net.aggregator = AggregatorServer(net.a_keys, net.deployment)  # the restart: state gone
    with pytest.raises(RoundLost, match="round 5 is open here but not at the aggregator"):
        net.coordinator.close_registration(5)
    with pytest.raises(UnknownRound, match="round 6 is not open on the coordinator"):
        net.coordinator.close_registration(6)


# -- slot groups: a device learns its day's total, never a beacon's ----------------------------
class GroupWorld:
    """A round whose pseudonym phase groups ``g`` slots: each device registers ``g`` beacons."""

    def __init__(
        self, mode: Mode, n: int, g: int, min_cohort: int = 0, items: int = 4, **kw
    ) -> None:
        self.net = make_net(mode, **kw)
        self.net.coordinator.min_cohort = self.net.aggregator.min_cohort = min_cohort
        self.g = g
        self.spec = RoundSpec(
            ROUND, (PhaseSpec("messages", 2, SlotKind.PSEUDONYM, items, group_slots=g),)
        )
        self.net.open_round(self.spec)
        self.devices = [self.net.device() for _ in range(n)]
        self.slots = [d.register(ROUND, [os.urandom(16) for _ in range(g)]) for d in self.devices]
        self.net.coordinator.close_registration(ROUND)


@pytest.mark.parametrize("mode", SECURE)
def test_a_fetch_releases_only_a_whole_group_total_once(mode: Mode) -> None:
    w = GroupWorld(mode, 3, g=3)
    # device 0 heard device 2's beacons 0 and 2; device 1 heard beacon 1
    w.devices[0].post(
        w.spec, "messages", [w.slots[2][0], w.slots[2][2]], np.array([[1.0, 2.0], [0.5, 0.25]])
    )
    w.devices[1].post(w.spec, "messages", [w.slots[2][1]], np.array([[4.0, -1.0]]))
    w.net.coordinator.close_phase(ROUND, "messages")
    owner = w.devices[2]
    before = server_state(w.net)
    # one beacon's slot, or two of three: part of the group, nothing released; nothing recorded
    for part in ([w.slots[2][0]], w.slots[2][:2], [w.slots[2][1]]):
        with pytest.raises(PartialGroup, match="only whole groups' totals are released"):
            owner.fetch(ROUND, "messages", part, 1)  # the client claims groups of one
        with pytest.raises(PartialGroup, match="do not make whole groups of 3"):
            owner.fetch(ROUND, "messages", part, 3)
    assert server_state(w.net) == before
    # the whole group: one row, the day's total
    total = owner.fetch(ROUND, "messages", w.slots[2], 3)
    assert total.tolist() == [[5.5, 1.25]]
    answered = server_state(w.net)
    # the identical request again gets the same total; any other grouping of the phase is refused
    assert owner.fetch(ROUND, "messages", w.slots[2], 3).tolist() == [[5.5, 1.25]]
    assert server_state(w.net) == answered
    with pytest.raises(AlreadyFetched):
        owner.fetch(ROUND, "messages", w.slots[2][::-1], 3)
    with pytest.raises(PartialGroup):  # a part after the whole: still refused as a part
        owner.fetch(ROUND, "messages", w.slots[2][:1], 1)
    assert server_state(w.net) == answered
    # a device with no contacts gets an exact zero total
    assert w.devices[0].fetch(ROUND, "messages", w.slots[0], 3).tolist() == [[0.0, 0.0]]


def test_a_registration_must_hold_whole_groups() -> None:
    net = make_net(Mode.MAILBOX)
    spec = RoundSpec(ROUND, (PhaseSpec("messages", 2, SlotKind.PSEUDONYM, 4, group_slots=3),))
    net.open_round(spec)
    device = net.device()
    before = server_state(net)
    for n in (1, 2, 4):
        with pytest.raises(
            PartialGroup, match=f"a registration of {n} slot\\(s\\) is not whole groups of 3"
        ):
            device.register(ROUND, [os.urandom(16) for _ in range(n)])
    assert server_state(net) == before  # neither C nor A registered anything
    assert len(device.register(ROUND, [os.urandom(16) for _ in range(6)])) == 6  # two groups


def test_a_dense_post_past_its_word_bound_is_refused_at_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A table of slots × dim words past MAX_DENSE_WORDS would not fit one payload: the device
    refuses to build the post, naming the bound and the modes that scale."""
    w = World(Mode.DENSE, 4, k=1)
    monkeypatch.setattr(protocol_module, "MAX_DENSE_WORDS", 4 * 3 - 1)  # 4 slots × dim 3
    with pytest.raises(WrongLength, match="MAX_DENSE_WORDS=11: use mailbox or shuffled"):
        w.devices[0].build_post(w.spec, "messages", [w.slots[1]], np.ones((1, 3)))


def test_dense_mode_refuses_a_minimum_cohort() -> None:
    """Dense servers hold no per-slot counts to enforce a cohort with: asking for one fails at
    configuration, never silently unenforced."""
    net = make_net(Mode.DENSE)
    for server in (net.coordinator, net.aggregator):
        with pytest.raises(ValueError, match="dense mode hides"):
            server.min_cohort = 2
        server.min_cohort = 1  # 0 and 1: off
        assert server.min_cohort == 1


@pytest.mark.parametrize("mode", [Mode.MAILBOX, Mode.SHUFFLED])
def test_the_minimum_cohort_counts_a_group(mode: Mode) -> None:
    """Three contacts spread over a group's three slots: no slot reaches a cohort of 2, the
    group does, so its total is released; a group of one contact is suppressed (one item per
    device: no padding dummies)."""
    w = GroupWorld(mode, 5, g=3, min_cohort=2, items=1)
    for i, slot in ((0, w.slots[4][0]), (1, w.slots[4][1]), (2, w.slots[4][2]), (3, w.slots[0][1])):
        w.devices[i].post(w.spec, "messages", [slot], np.array([[1.0, 1.0]]))
    w.net.coordinator.close_phase(ROUND, "messages")
    assert w.devices[4].fetch(ROUND, "messages", w.slots[4], 3).tolist() == [[3.0, 3.0]]
    assert w.devices[0].fetch(ROUND, "messages", w.slots[0], 3).tolist() == [[0.0, 0.0]]


def test_a_group_over_the_summand_bound_is_withheld() -> None:
    """A group's total is one released sum: more summands in it than max_summands withhold it,
    though each slot alone is within the bound (two items per device: no dummies)."""
    w = GroupWorld(Mode.MAILBOX, 4, g=2, items=2, codec=FixedPointCodec(16, 64.0, 5))
    for i in range(3):  # 3 summands in each of device 3's two slots, 6 in its group
        w.devices[i].post(w.spec, "messages", [w.slots[3][0], w.slots[3][1]], np.ones((2, 2)))
    w.net.coordinator.close_phase(ROUND, "messages")
    with pytest.raises(OverflowBoundError, match="group\\(s\\) hold more than max_summands=5"):
        w.devices[3].fetch(ROUND, "messages", w.slots[3], 2)


@pytest.mark.parametrize("mode", SECURE)
def test_a_fetch_naming_no_slot_gets_every_registered_group(mode: Mode) -> None:
    """A pool registers its devices' days (here two groups of 2) and fetches them all with a
    request that names no slot: one total per group, in registration order; the request
    carries no slot id. A participant that registered nothing is refused."""
    net = make_net(mode)
    spec = RoundSpec(ROUND, (PhaseSpec("messages", 2, SlotKind.PSEUDONYM, 2, group_slots=2),))
    net.open_round(spec)
    owner, poster, late = net.device(devices=2), net.device(), net.device()
    days = owner.register(ROUND, [os.urandom(16) for _ in range(4)])
    poster.register(ROUND, [os.urandom(16), os.urandom(16)])
    net.coordinator.close_registration(ROUND)
    poster.post(spec, "messages", [days[1], days[2]], np.array([[1.0, 0.5], [2.0, 4.0]]))
    net.coordinator.close_phase(ROUND, "messages")
    raw = owner.build_fetch(ROUND, "messages", None)
    assert FetchRequest.from_bytes(raw).slot_ids == b""
    assert owner.fetch(ROUND, "messages", None, 2).tolist() == [[1.0, 0.5], [2.0, 4.0]]
    before = server_state(net)
    with pytest.raises(RegistrationError, match="registered no slots in round 7"):
        late.fetch(ROUND, "messages", None, 2)
    late._registered[ROUND] = 2  # as if it had registered: the servers refuse it
    late._secrets[ROUND] = os.urandom(32)
    with pytest.raises(NotRegistrant, match="registered no slots this round"):
        late.fetch(ROUND, "messages", None, 2)
    assert server_state(net) == before


def test_a_mailbox_relay_is_taken_a_slice_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A expands and adds a relay a slice of posts at a time (bounded memory for a million
    phones): the sums are exact across slices, a tampered post in one slice is excluded at both
    servers, and a relay naming a unit twice is taken whole (its copy counts as a replay)."""
    assert protocol_module._slices(np.array([3, 1, 1, 5, 2]), 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    monkeypatch.setattr(protocol_module, "RELAY_SLICE_ITEMS", 2)
    w = World(Mode.MAILBOX, 6, k=1)
    posts = [(i, [(i + 1) % 6], np.array([[float(i + 1), -0.5, 0.25]])) for i in range(6)]
    for p in posts:
        w.post(*p)
    victim = w.devices[3].device_id

    def tamper(raw: bytes) -> bytes:
        m = decode(raw)
        if not isinstance(m, RelayMailbox):
            return raw
        parts = list(m.sealed_for_a)
        at = m.device_ids.index(victim)
        parts[at] = parts[at][:-1] + bytes([parts[at][-1] ^ 1])
        return RelayMailbox(m.round_id, m.phase, m.device_ids, m.slot_ids, tuple(parts)).to_bytes()

    w.net.c_to_a_filter = tamper
    report = w.c.close_phase(ROUND, "messages")
    assert (report.accepted_by_aggregator, report.rejected_by_aggregator) == (5, 1)
    np.testing.assert_array_equal(w.fetch_all(), w.ring_sums(posts[:3] + posts[4:]))
    # a relay naming a unit twice (identical copies) is taken whole: the copy is a replay
    w2 = World(Mode.MAILBOX, 4, k=1)
    for i in range(4):
        w2.post(i, [(i + 1) % 4], np.array([[1.0, 2.0, 3.0]]))
    seen: list[RelayReceipt] = []

    def twice(raw: bytes) -> bytes:
        m = decode(raw)
        if not isinstance(m, RelayMailbox):
            return raw
        return RelayMailbox(
            m.round_id,
            m.phase,
            (*m.device_ids, m.device_ids[0]),
            (*m.slot_ids, m.slot_ids[0]),
            (*m.sealed_for_a, m.sealed_for_a[0]),
        ).to_bytes()

    def receipt(raw: bytes) -> bytes:
        reply = decode(raw)
        if isinstance(reply, RelayReceipt):
            seen.append(reply)
        return raw

    w2.net.c_to_a_filter, w2.net.a_to_c_filter = twice, receipt
    w2.c.close_phase(ROUND, "messages")
    assert [(r.accepted, r.replayed, r.rejected) for r in seen] == [(4, 1, 0)]
