"""The posting modes as transport-free state machines: device, coordinator C, aggregator A.

Parties exchange only serialized :mod:`messages` (bytes). Devices talk only to C
(``CoordinatorServer.handle_device``); C talks to A through a ``Callable[[bytes], bytes]``
link (``AggregatorServer.handle``). :class:`InMemoryNetwork` wires them for tests and benches;
a gRPC adapter wires the same objects over the network.

Round lifecycle (per server): ``open_round`` → registrations → ``close_registration`` →
posts per phase → ``close_phase`` (relays, surviving-set agreement) → releases (registrants
fetch pseudonym sums; C opens aggregate sums). See ``LEAKAGE.md`` for what each mode reveals.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from . import errors
from .accumulator import KEY_BYTES, ShareAccumulator, key_set_digest, keys_from_bytes
from .config import Deployment, Mode, PhaseSpec, RoundSpec, SlotKind
from .envelope import OVERHEAD, KeyPair, box_open, box_seal, open_envelope, seal
from .errors import (
    AgreementError,
    ConflictingSubmission,
    MessageError,
    NotRegistrant,
    PhaseClosed,
    PhaseError,
    RegistrationError,
    SecureSumError,
    UnknownPhase,
    WrongLength,
)
from .fixed_point import FixedPointCodec
from .messages import (
    AggregateRequest,
    AggregateShares,
    Agreed,
    CloseRegistration,
    DirectoryRequest,
    DirectoryResponse,
    ErrorReply,
    FetchReply,
    FetchRequest,
    FetchResponse,
    KeySetOffer,
    KeySetReply,
    MailboxPost,
    Message,
    OpenRound,
    PostReceipt,
    RegisterRequest,
    RegisterResponse,
    RelayFetch,
    RelayMailbox,
    RelayReceipt,
    RelayRegister,
    RelayShuffled,
    ShuffledForC,
    ShuffledPost,
    SurvivingSet,
    decode,
)
from .sharing import SEED_BYTES, expand_seeds, new_seed, split_rows, split_with_seed
from .slots import (
    DEVICE_ID_BYTES,
    SLOT_ID_BYTES,
    Registry,
    SlotTable,
    aggregate_slot,
    as_id_matrix,
    pseudonym_slot,
)

log = logging.getLogger(__name__)

INFO_REGISTER = b"decentsim/v1/register"
INFO_REGISTER_ACK = b"decentsim/v1/register-ack"
INFO_MAILBOX = b"decentsim/v1/mailbox-seed"
INFO_OUTER = b"decentsim/v1/shuffled-outer"
INFO_ITEM_C = b"decentsim/v1/item-for-c"
INFO_ITEM_A = b"decentsim/v1/item-for-a"
INFO_FETCH = b"decentsim/v1/fetch"
INFO_FETCH_REPLY = b"decentsim/v1/fetch-reply"
SECRET_BYTES = 32
CID_BYTES = 16
_DIGEST = 32

#: a permutation source: n -> a uniformly random permutation of range(n)
Permutation = Callable[[int], npt.NDArray[np.int64]]


class InsecurePlaintextWarning(UserWarning):
    """The ``plaintext`` mode is in use: servers see every raw value."""


def csprng_permutation(n: int) -> npt.NDArray[np.int64]:
    """A uniformly random permutation from the OS CSPRNG (argsort of 64-bit random keys).

    Ties among n 64-bit keys have probability below n²/2^65, so the permutation is uniform
    up to that negligible bias; no numpy RNG is involved.
    """
    keys = np.frombuffer(os.urandom(8 * n), dtype="<u8")
    return np.argsort(keys, kind="stable").astype(np.int64)


_warned_roles: set[str] = set()


def _warn_plaintext(who: str) -> None:
    msg = (
        f"{who}: secure-sum mode 'plaintext' is INSECURE — servers receive raw values. "
        "Use it only as a baseline or audit control, never in a deployment."
    )
    warnings.warn(msg, InsecurePlaintextWarning, stacklevel=3)
    if who not in _warned_roles:  # once per role in the log; the warning itself always fires
        _warned_roles.add(who)
        log.warning(msg)


def post_header(device_id: bytes, round_id: int, phase: str) -> bytes:
    """The bytes binding a post to (device, round, phase)."""
    return device_id + round_id.to_bytes(8, "big") + phase.encode()


def unit_key(device_id: bytes, round_id: int, phase: str) -> bytes:
    """The 16-byte idempotency key of a mailbox post, identical at both servers."""
    h = hashlib.sha256(b"decentsim/unit/v1" + post_header(device_id, round_id, phase))
    return h.digest()[:KEY_BYTES]


def phase_aad(round_id: int, phase: str) -> bytes:
    """AAD binding shuffled items to their (round, phase) but to no sender."""
    return round_id.to_bytes(8, "big") + phase.encode()


def fetch_aad(device_id: bytes, round_id: int, phase: str, slot_id: bytes) -> bytes:
    """AAD of a fetch request."""
    return post_header(device_id, round_id, phase) + slot_id


def fetch_tag(secret: bytes, round_id: int, phase: str, slot_id: bytes) -> bytes:
    """The registrant's proof of its fetch secret (only it and A hold the secret)."""
    msg = b"decentsim/fetch/v1" + phase_aad(round_id, phase) + b"\x00" + slot_id
    return hmac.new(secret, msg, hashlib.sha256).digest()


def spec_digest(spec: RoundSpec) -> bytes:
    """A digest of a round spec, so C and A can check they run the same round."""
    parts = [spec.round_id.to_bytes(8, "big")]
    for p in spec.phases:
        parts += [p.name.encode(), b"\x00", p.kind.value.encode(), b"\x00"]
        parts += [p.dim.to_bytes(4, "big"), p.items_per_device.to_bytes(4, "big")]
        parts += [n.encode() + b"\x00" for n in p.aggregate_slots]
    return hashlib.sha256(b"decentsim/round-spec/v1" + b"".join(parts)).digest()


def item_c_bytes(dim: int) -> int:
    """Size of one sealed C-item in shuffled mode: cid ‖ slot ‖ share."""
    return OVERHEAD + CID_BYTES + SLOT_ID_BYTES + 8 * dim


ITEM_A_BYTES = OVERHEAD + CID_BYTES + SLOT_ID_BYTES + SEED_BYTES


def _check_device_id(device_id: bytes) -> None:
    if len(device_id) != DEVICE_ID_BYTES:
        raise WrongLength(f"device id must be {DEVICE_ID_BYTES} bytes, got {len(device_id)}")


def _raise_if_error(raw: bytes) -> Message:
    msg = decode(raw)
    if isinstance(msg, ErrorReply):
        cls = getattr(errors, msg.error, None)
        if not (isinstance(cls, type) and issubclass(cls, SecureSumError)):
            cls = SecureSumError
        raise cls(f"aggregator refused: {msg.detail}")
    return msg


def _expect(raw: bytes, cls: type[Message]) -> Message:
    msg = _raise_if_error(raw)
    if not isinstance(msg, cls):
        raise MessageError(f"expected {cls.__name__}, got {type(msg).__name__}")
    return msg


@dataclass
class _Round:
    """One server's state for one round."""

    spec: RoundSpec
    registry: Registry = field(default_factory=Registry)
    registration_open: bool = True
    accumulators: dict[str, ShareAccumulator] = field(default_factory=dict)
    tables: dict[str, SlotTable] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    #: C only: what to relay to A at close, by unit key (dict keeps arrival order)
    outbox: dict[str, dict[bytes, tuple[bytes, ...]]] = field(default_factory=dict)
    #: C only: phases whose relay to A completed (a retried close skips it)
    relayed: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def phase(self, name: str) -> PhaseSpec:
        return self.spec.phase(name)

    def table(self, name: str) -> SlotTable:
        p = self.phase(name)
        if name not in self.tables:
            if p.kind is SlotKind.PSEUDONYM:
                if self.registration_open:
                    raise PhaseError(
                        f"phase {name!r} sums into pseudonym slots; close registration first"
                    )
                self.tables[name] = self.registry.table
            else:
                self.tables[name] = SlotTable(p.aggregate_ids())
        return self.tables[name]


class _Server:
    """State shared by C and A: the rounds and their accumulators."""

    role = "server"

    def __init__(self, keypair: KeyPair, deployment: Deployment) -> None:
        self.keypair = keypair
        self.deployment = deployment
        self.codec = deployment.codec
        self.rounds: dict[int, _Round] = {}
        if deployment.mode is Mode.PLAINTEXT:
            _warn_plaintext(self.role)

    def _open(self, spec: RoundSpec) -> None:
        if spec.round_id in self.rounds:
            raise PhaseError(f"round {spec.round_id} is already open")
        self.rounds[spec.round_id] = _Round(spec)

    def _round(self, round_id: int) -> _Round:
        rnd = self.rounds.get(round_id)
        if rnd is None:
            raise UnknownPhase(f"round {round_id} is not open on the {self.role}")
        return rnd

    def _accumulator(self, rnd: _Round, phase: str) -> ShareAccumulator:
        acc = rnd.accumulators.get(phase)
        if acc is None:
            p = rnd.phase(phase)
            acc = ShareAccumulator(len(rnd.table(phase)), p.dim, self.codec)
            rnd.accumulators[phase] = acc
        return acc

    def _check_open(self, rnd: _Round, phase: str) -> None:
        rnd.phase(phase)
        if phase in rnd.closed:
            raise PhaseClosed(f"round {rnd.spec.round_id} phase {phase!r} is closed")

    def share_rows(
        self, round_id: int, phase: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """This server's stored (slot index, share) rows of a phase — its whole view of shares."""
        acc = self._accumulator(self._round(round_id), phase)
        return acc.rows()


class AggregatorServer(_Server):
    """The aggregator A: holds one share of everything; reachable only through C."""

    role = "aggregator"

    def __init__(
        self,
        keypair: KeyPair,
        deployment: Deployment,
        permutation: Permutation = csprng_permutation,
    ) -> None:
        super().__init__(keypair, deployment)
        self.permutation = permutation

    def open_round(self, spec: RoundSpec) -> None:
        """A's operator opens a round from its own copy of the spec."""
        self._open(spec)

    def handle(self, raw: bytes) -> bytes:
        """Serve one request from C; refusals come back as :class:`ErrorReply`."""
        try:
            msg = decode(raw)
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise MessageError(f"the aggregator does not serve {type(msg).__name__}")
            return handler(self, msg).to_bytes()
        except SecureSumError as err:
            return ErrorReply(type(err).__name__, str(err)).to_bytes()

    def _on_open_round(self, m: OpenRound) -> Message:
        if spec_digest(self._round(m.round_id).spec) != m.spec_digest:
            raise AgreementError(f"round {m.round_id}: C and A hold different round specs")
        return Agreed(m.spec_digest)

    def _on_register(self, m: RelayRegister) -> Message:
        rnd = self._round(m.round_id)
        if not rnd.registration_open:
            raise PhaseClosed(f"round {m.round_id}: registration is closed")
        _check_device_id(m.device_id)
        aad = post_header(m.device_id, m.round_id, "")
        inner = open_envelope(self.keypair, m.sealed_for_a, INFO_REGISTER, aad)
        if len(inner) != SECRET_BYTES + _DIGEST:
            raise WrongLength(f"registration secret block has {len(inner)} bytes")
        secret, digest = inner[:SECRET_BYTES], inner[SECRET_BYTES:]
        if not hmac.compare_digest(digest, hashlib.sha256(m.slot_ids).digest()):
            raise NotRegistrant("relayed slot list differs from the one the device sealed")
        slots = [bytes(r) for r in as_id_matrix(m.slot_ids)]
        rnd.registry.register(m.device_id, slots, secret)
        return RegisterResponse(box_seal(secret, b"registered" + digest, INFO_REGISTER_ACK, aad))

    def _on_close_registration(self, m: CloseRegistration) -> Message:
        rnd = self._round(m.round_id)
        digest = hashlib.sha256(b"".join(rnd.registry.table.ids)).digest()
        if digest != m.directory_digest:
            raise AgreementError(f"round {m.round_id}: C and A hold different registrations")
        rnd.registration_open = False
        return Agreed(digest)

    def _on_mailbox(self, m: RelayMailbox) -> Message:
        rnd = self._round(m.round_id)
        self._check_open(rnd, m.phase)
        p = rnd.phase(m.phase)
        acc = self._accumulator(rnd, m.phase)
        table = rnd.table(m.phase)
        if not len(m.device_ids) == len(m.slot_ids) == len(m.sealed_for_a):
            raise MessageError("relay lists have different lengths")
        k, plaintext = p.items_per_device, self.deployment.mode is Mode.PLAINTEXT
        # one public-key open per post is inherent; everything after it is batched
        ok = np.zeros(len(m.device_ids), dtype=bool)
        seeds: list[bytes] = []
        for i, (device, slot_ids, sealed) in enumerate(
            zip(m.device_ids, m.slot_ids, m.sealed_for_a, strict=True)
        ):
            if len(device) != DEVICE_ID_BYTES or len(slot_ids) != k * SLOT_ID_BYTES:
                continue
            if plaintext:
                ok[i] = True
                continue
            header = post_header(device, m.round_id, m.phase)
            try:
                inner = open_envelope(self.keypair, sealed, INFO_MAILBOX, header)
            except SecureSumError as err:
                log.info("aggregator refused a relayed post: %s", type(err).__name__)
                continue
            # the device bound its slot list into the sealed part: C cannot redirect shares
            if len(inner) == SEED_BYTES + _DIGEST and hmac.compare_digest(
                inner[SEED_BYTES:], hashlib.sha256(header + slot_ids).digest()
            ):
                ok[i] = True
                seeds.append(inner[:SEED_BYTES])
        good = np.flatnonzero(ok)
        ids = as_id_matrix(b"".join([m.slot_ids[i] for i in good.tolist()]))
        slot_idx, known = table.find(ids)
        unit_known = known.reshape(-1, k).all(axis=1)
        if plaintext:
            shares = np.zeros((len(good) * k, p.dim), dtype=np.int64)
        else:
            shares = expand_seeds(seeds, k * p.dim).reshape(-1, p.dim)
        use = np.repeat(unit_known, k)
        keys = b"".join(
            [unit_key(m.device_ids[i], m.round_id, m.phase) for i in good[unit_known].tolist()]
        )
        res = acc.submit_many(keys, slot_idx[use], shares[use])
        rejected = len(m.device_ids) - int(unit_known.sum()) + res.conflicting + res.over_bound
        return RelayReceipt(res.accepted, res.replayed, rejected)

    def _on_shuffled(self, m: RelayShuffled) -> Message:
        rnd = self._round(m.round_id)
        self._check_open(rnd, m.phase)
        p = rnd.phase(m.phase)
        acc = self._accumulator(rnd, m.phase)
        if len(m.device_ids) != len(m.outers):
            raise MessageError("relay lists have different lengths")
        k, size_c = p.items_per_device, item_c_bytes(p.dim)
        # 1) outer envelopes: A knows each sender here, but the C-items inside are opaque to it
        blobs: list[bytes] = []
        rejected = 0
        for device, outer in zip(m.device_ids, m.outers, strict=True):
            try:
                blob = open_envelope(
                    self.keypair, outer, INFO_OUTER, post_header(device, m.round_id, m.phase)
                )
            except SecureSumError as err:
                rejected += 1
                log.info("aggregator dropped an outer envelope: %s", type(err).__name__)
                continue
            if len(blob) != k * size_c:
                rejected += 1
                continue
            blobs.append(blob)
        joined = b"".join(blobs)
        items_c = [joined[i : i + size_c] for i in range(0, len(joined), size_c)]
        # the whole phase's batch, in a CSPRNG order independent of the senders
        shuffled = tuple(map(items_c.__getitem__, self.permutation(len(items_c)).tolist()))
        # 2) A-items, already shuffled by C: A sees slot and seed, never the sender
        result = _accept_items(
            acc,
            rnd.table(m.phase),
            self.keypair,
            m.items_for_a,
            INFO_ITEM_A,
            phase_aad(m.round_id, m.phase),
            SEED_BYTES,
            lambda seeds: expand_seeds(seeds, p.dim),
        )
        rejected += result.rejected
        return ShuffledForC(
            m.round_id, m.phase, shuffled, result.accepted, result.replayed, rejected
        )

    def _on_key_offer(self, m: KeySetOffer) -> Message:
        rnd = self._round(m.round_id)
        rnd.phase(m.phase)
        rnd.closed.add(m.phase)
        acc = self._accumulator(rnd, m.phase)
        acc.close()
        own = acc.key_digest()
        keys = b"" if own == m.digest else acc.sorted_keys().tobytes()
        return KeySetReply(own, keys)

    def _on_surviving(self, m: SurvivingSet) -> Message:
        rnd = self._round(m.round_id)
        if m.phase not in rnd.closed:
            raise PhaseError(f"phase {m.phase!r} must be closed before agreement")
        acc = self._accumulator(rnd, m.phase)
        surviving = acc.sorted_keys() if not m.keys else keys_from_bytes(m.keys)
        return Agreed(acc.agree(surviving, expected=m.digest))

    def _on_aggregates(self, m: AggregateRequest) -> Message:
        rnd = self._round(m.round_id)
        if rnd.phase(m.phase).kind is not SlotKind.AGGREGATE:
            raise RegistrationError(
                f"phase {m.phase!r} sums pseudonym slots; only registrants fetch"
            )
        acc = self._accumulator(rnd, m.phase)
        sums, counts = acc.released_sums(np.arange(acc.n_slots))
        return AggregateShares(sums.astype("<i8").tobytes(), counts.astype("<i8").tobytes())

    def _on_fetch(self, m: RelayFetch) -> Message:
        rnd = self._round(m.round_id)
        if rnd.phase(m.phase).kind is not SlotKind.PSEUDONYM:
            raise RegistrationError(f"phase {m.phase!r} has no pseudonym slots to fetch")
        acc = self._accumulator(rnd, m.phase)
        acc.sums()  # nothing is released before agreement
        reg = rnd.registry.authorize_fetch(m.device_id, m.slot_id, m.phase)
        aad = fetch_aad(m.device_id, m.round_id, m.phase, m.slot_id)
        tag = open_envelope(self.keypair, m.sealed_for_a, INFO_FETCH, aad)
        assert reg.fetch_secret is not None
        if not hmac.compare_digest(
            tag, fetch_tag(reg.fetch_secret, m.round_id, m.phase, m.slot_id)
        ):
            raise NotRegistrant("fetch proof does not match the registrant's secret")
        rows, _ = acc.released_sums(np.array([rnd.registry.table.index(m.slot_id)]))
        box = box_seal(reg.fetch_secret, rows[0].astype("<i8").tobytes(), INFO_FETCH_REPLY, aad)
        reg.fetched.add(m.phase)
        return FetchReply(box)

    _handlers: dict[type, Callable[[AggregatorServer, Message], Message]] = {  # noqa: RUF012
        OpenRound: _on_open_round,
        RelayRegister: _on_register,
        CloseRegistration: _on_close_registration,
        RelayMailbox: _on_mailbox,
        RelayShuffled: _on_shuffled,
        KeySetOffer: _on_key_offer,
        SurvivingSet: _on_surviving,
        AggregateRequest: _on_aggregates,
        RelayFetch: _on_fetch,
    }


def _accept_items(
    acc: ShareAccumulator,
    table: SlotTable,
    keypair: KeyPair,
    envelopes: Sequence[bytes],
    info: bytes,
    aad: bytes,
    payload_bytes: int,
    to_shares: Callable[[bytes], npt.NDArray[np.int64]],
) -> RelayReceipt:
    """Open shuffled single items (cid ‖ slot ‖ payload) and submit the valid ones as a batch.

    One public-key open per item is inherent; parsing, slot lookup and accumulation are
    vectorized over the batch.
    """
    want = CID_BYTES + SLOT_ID_BYTES + payload_bytes
    plains: list[bytes] = []
    for env in envelopes:
        try:
            plain = open_envelope(keypair, env, info, aad)
        except SecureSumError:
            continue
        if len(plain) == want:
            plains.append(plain)
    rejected = len(envelopes) - len(plains)
    mat = np.frombuffer(b"".join(plains), dtype=np.uint8).reshape(-1, want)
    idx, ok = table.find(mat[:, CID_BYTES : CID_BYTES + SLOT_ID_BYTES])
    rejected += int((~ok).sum())
    good = mat[ok]
    shares = to_shares(good[:, CID_BYTES + SLOT_ID_BYTES :].tobytes())
    res = acc.submit_many(good[:, :CID_BYTES].tobytes(), idx[ok], shares)
    return RelayReceipt(res.accepted, res.replayed, rejected + res.conflicting + res.over_bound)


@dataclass(frozen=True)
class PhaseReport:
    """What closing a phase did: units relayed/accepted by A and the surviving count."""

    relayed: int
    accepted_by_aggregator: int
    rejected_by_aggregator: int
    accepted_by_coordinator: int
    surviving: int
    digest: bytes


class CoordinatorServer(_Server):
    """The coordinator C: the only party devices talk to; holds the other share."""

    role = "coordinator"

    def __init__(
        self,
        keypair: KeyPair,
        deployment: Deployment,
        aggregator: Callable[[bytes], bytes],
        permutation: Permutation = csprng_permutation,
    ) -> None:
        super().__init__(keypair, deployment)
        self._to_a = aggregator
        self.permutation = permutation

    def _ask(self, msg: Message, expect: type[Message]) -> Message:
        return _expect(self._to_a(msg.to_bytes()), expect)

    # -- orchestration ----------------------------------------------------------------------
    def open_round(self, spec: RoundSpec) -> None:
        """Open a round here and check that A opened the same spec."""
        self._ask(OpenRound(spec.round_id, spec_digest(spec)), Agreed)
        self._open(spec)

    def close_registration(self, round_id: int) -> None:
        """End registration: both servers freeze the same slot directory."""
        rnd = self._round(round_id)
        digest = hashlib.sha256(b"".join(rnd.registry.table.ids)).digest()
        self._ask(CloseRegistration(round_id, digest), Agreed)
        rnd.registration_open = False

    def exclude_device(self, round_id: int, phase: str, device_id: bytes) -> bool:
        """Drop a device's post before the phase closes (e.g. it broke the deadline).

        Its A-part is never relayed, so the surviving set excludes it at both servers.
        Returns whether a post was dropped.
        """
        rnd = self._round(round_id)
        self._check_open(rnd, phase)
        return rnd.outbox.get(phase, {}).pop(unit_key(device_id, round_id, phase), None) is not None

    def close_phase(self, round_id: int, phase: str) -> PhaseReport:
        """Close a phase: relay to A, (shuffled) collect C-items, agree on the surviving set.

        Posts are refused from the first call on. If the link to A fails midway, calling
        ``close_phase`` again resumes: the relay is idempotent at A (replays are ignored) and
        the agreement is idempotent at both servers.

        Raises:
            PhaseClosed: the phase was already closed and its surviving set agreed.
        """
        rnd = self._round(round_id)
        p = rnd.phase(phase)
        acc = self._accumulator(rnd, phase)
        if acc.surviving_digest is not None:
            raise PhaseClosed(f"round {round_id} phase {phase!r} is already closed and agreed")
        rnd.closed.add(phase)
        outbox = list(rnd.outbox.get(phase, {}).values())
        if phase not in rnd.relayed:
            rnd.relayed[phase] = self._relay(rnd, p, acc, outbox)
        accepted_a, rejected_a, accepted_c = rnd.relayed[phase]
        surviving, digest = self._agree(rnd, phase, acc)
        return PhaseReport(len(outbox), accepted_a, rejected_a, accepted_c, surviving, digest)

    def _relay(
        self,
        rnd: _Round,
        p: PhaseSpec,
        acc: ShareAccumulator,
        outbox: list[tuple[bytes, ...]],
    ) -> tuple[int, int, int]:
        """Send the phase's A-bound material; returns (accepted by A, rejected by A, C units)."""
        round_id, phase = rnd.spec.round_id, p.name
        if self.deployment.mode is not Mode.SHUFFLED:
            relay_m = RelayMailbox(
                round_id,
                phase,
                tuple(e[0] for e in outbox),
                tuple(e[1] for e in outbox),
                tuple(e[2] for e in outbox),
            )
            receipt = self._ask(relay_m, RelayReceipt)
            assert isinstance(receipt, RelayReceipt)
            return receipt.accepted, receipt.rejected, acc.unit_count
        items_a = [it for entry in outbox for it in entry[2]]
        # the whole phase's A-items, in a CSPRNG order independent of the senders
        relay = RelayShuffled(
            round_id,
            phase,
            tuple(e[0] for e in outbox),
            tuple(e[1] for e in outbox),
            tuple(map(items_a.__getitem__, self.permutation(len(items_a)).tolist())),
        )
        back = self._ask(relay, ShuffledForC)
        assert isinstance(back, ShuffledForC)
        _accept_items(
            acc,
            rnd.table(phase),
            self.keypair,
            back.items_for_c,
            INFO_ITEM_C,
            phase_aad(round_id, phase),
            8 * p.dim,
            lambda payload: np.frombuffer(payload, dtype="<i8").astype(np.int64).reshape(-1, p.dim),
        )
        return back.accepted, back.rejected, acc.unit_count

    def _agree(self, rnd: _Round, phase: str, acc: ShareAccumulator) -> tuple[int, bytes]:
        acc.close()
        own = acc.sorted_keys()
        own_digest = acc.key_digest()
        reply = self._ask(KeySetOffer(rnd.spec.round_id, phase, own_digest), KeySetReply)
        assert isinstance(reply, KeySetReply)
        if reply.digest == own_digest:
            common, proposal = own, b""
        else:
            common = np.intersect1d(own, keys_from_bytes(reply.keys))
            proposal = common.tobytes()
        digest = key_set_digest(common)
        agreed = self._ask(SurvivingSet(rnd.spec.round_id, phase, proposal, digest), Agreed)
        assert isinstance(agreed, Agreed)
        if agreed.digest != digest:
            raise AgreementError("the aggregator agreed on a different surviving set")
        acc.agree(common, expected=digest)
        return len(common), digest

    def open_aggregates(self, round_id: int, phase: str) -> dict[str, npt.NDArray[np.float64]]:
        """Open the sums of an agreed aggregate phase: ``{slot name: decoded vector}``."""
        ring = self.open_aggregates_ring(round_id, phase)
        return {name: self.codec.decode(v) for name, v in ring.items()}

    def open_aggregates_ring(self, round_id: int, phase: str) -> dict[str, npt.NDArray[np.int64]]:
        """Like :meth:`open_aggregates` but the exact ring sums (int64)."""
        rnd = self._round(round_id)
        p = rnd.phase(phase)
        if p.kind is not SlotKind.AGGREGATE:
            raise RegistrationError(f"phase {phase!r} sums pseudonym slots; only registrants fetch")
        acc = self._accumulator(rnd, phase)
        sums, counts = acc.released_sums(np.arange(acc.n_slots))
        a = self._ask(AggregateRequest(round_id, phase), AggregateShares)
        assert isinstance(a, AggregateShares)
        a_sums = np.frombuffer(a.sums, dtype="<i8").astype(np.int64).reshape(sums.shape)
        a_counts = np.frombuffer(a.counts, dtype="<i8").astype(np.int64)
        if not np.array_equal(a_counts, counts):
            raise AgreementError("per-slot summand counts differ between the servers")
        # a sum outside count × max_encoded means an out-of-range contribution or a wrap
        total = self.codec.check_sum(sums + a_sums, counts)
        return {name: total[i] for i, name in enumerate(p.aggregate_slots)}

    # -- device-facing ----------------------------------------------------------------------
    def handle_device(self, raw: bytes, peer: bytes) -> bytes:
        """Serve one device request. ``peer`` is the device id the transport authenticated.

        Raises:
            SecureSumError: a specific subclass for every refusal; state is unchanged.
        """
        msg = decode(raw)
        claimed = getattr(msg, "device_id", peer)
        if not hmac.compare_digest(claimed, peer):
            raise NotRegistrant("the request names a device other than the authenticated peer")
        if isinstance(msg, RegisterRequest):
            return self._register(msg).to_bytes()
        if isinstance(msg, DirectoryRequest):
            return self._directory(msg).to_bytes()
        if isinstance(msg, MailboxPost):
            return self._post_mailbox(msg).to_bytes()
        if isinstance(msg, ShuffledPost):
            return self._post_shuffled(msg).to_bytes()
        if isinstance(msg, FetchRequest):
            return self._fetch(msg).to_bytes()
        raise MessageError(f"devices may not send {type(msg).__name__}")

    def _register(self, m: RegisterRequest) -> Message:
        rnd = self._round(m.round_id)
        if not rnd.registration_open:
            raise PhaseClosed(f"round {m.round_id}: registration is closed")
        _check_device_id(m.device_id)
        slots = [bytes(r) for r in as_id_matrix(m.slot_ids)]
        rnd.registry.table.check_new(slots)
        # A registers first: if it refuses, C's registry is untouched
        resp = self._ask(
            RelayRegister(m.device_id, m.round_id, m.slot_ids, m.sealed_for_a), RegisterResponse
        )
        rnd.registry.register(m.device_id, slots)
        return resp

    def _directory(self, m: DirectoryRequest) -> Message:
        rnd = self._round(m.round_id)
        if rnd.registration_open:
            raise PhaseError(
                f"round {m.round_id}: the slot directory is final only after registration"
            )
        return DirectoryResponse(b"".join(rnd.registry.table.ids))

    def _post_mailbox(self, m: MailboxPost) -> Message:
        if self.deployment.mode is Mode.SHUFFLED:
            raise MessageError("this deployment runs shuffled mode; mailbox posts are refused")
        rnd = self._round(m.round_id)
        self._check_open(rnd, m.phase)
        _check_device_id(m.device_id)
        p = rnd.phase(m.phase)
        if m.dim != p.dim:
            raise WrongLength(f"phase {m.phase!r} has dim {p.dim}, post has {m.dim}")
        ids = as_id_matrix(m.slot_ids)
        if len(ids) != p.items_per_device:
            raise WrongLength(
                f"phase {m.phase!r} takes exactly {p.items_per_device} items per device, "
                f"post has {len(ids)}"
            )
        if len(m.share_c) != 8 * p.items_per_device * p.dim:
            raise WrongLength(
                f"share block is {len(m.share_c)} bytes; expected {p.items_per_device} × {p.dim} "
                "int64"
            )
        plaintext = self.deployment.mode is Mode.PLAINTEXT
        if plaintext == bool(m.sealed_for_a):
            raise MessageError("sealed A-part must be present in mailbox mode, absent in plaintext")
        slot_idx = rnd.table(m.phase).lookup(ids)
        shares = np.frombuffer(m.share_c, dtype="<i8").astype(np.int64).reshape(-1, p.dim)
        key = unit_key(m.device_id, m.round_id, m.phase)
        fresh = self._accumulator(rnd, m.phase).submit(key, slot_idx, shares)
        if fresh:
            rnd.outbox.setdefault(m.phase, {})[key] = (m.device_id, m.slot_ids, m.sealed_for_a)
        return PostReceipt(int(fresh))

    def _post_shuffled(self, m: ShuffledPost) -> Message:
        if self.deployment.mode is not Mode.SHUFFLED:
            raise MessageError(f"this deployment runs {self.deployment.mode.value} mode")
        rnd = self._round(m.round_id)
        self._check_open(rnd, m.phase)
        _check_device_id(m.device_id)
        p = rnd.phase(m.phase)
        rnd.table(m.phase)  # pseudonym phases need the directory frozen before posts
        k = p.items_per_device
        if len(m.items_for_a) != k or any(len(e) != ITEM_A_BYTES for e in m.items_for_a):
            raise WrongLength(
                f"phase {m.phase!r} takes exactly {k} A-items of {ITEM_A_BYTES} bytes"
            )
        if len(m.outer_for_a) != OVERHEAD + k * item_c_bytes(p.dim):
            raise WrongLength(
                f"outer envelope is {len(m.outer_for_a)} bytes; expected "
                f"{OVERHEAD + k * item_c_bytes(p.dim)} for {k} items of dim {p.dim}"
            )
        key = unit_key(m.device_id, m.round_id, m.phase)
        entry = (m.device_id, m.outer_for_a, m.items_for_a)
        box = rnd.outbox.setdefault(m.phase, {})
        if key in box:
            if box[key] != entry:
                raise ConflictingSubmission(
                    "a different post for this (device, round, phase) was already accepted"
                )
            return PostReceipt(0)
        box[key] = entry
        return PostReceipt(1)

    def _fetch(self, m: FetchRequest) -> Message:
        rnd = self._round(m.round_id)
        p = rnd.phase(m.phase)
        if p.kind is not SlotKind.PSEUDONYM:
            raise RegistrationError(f"phase {m.phase!r} has no pseudonym slots to fetch")
        acc = self._accumulator(rnd, m.phase)
        acc.sums()  # nothing is released before agreement
        reg = rnd.registry.authorize_fetch(m.device_id, m.slot_id, m.phase)
        rows, _ = acc.released_sums(np.array([rnd.registry.table.index(m.slot_id)]))
        reply = self._ask(
            RelayFetch(m.device_id, m.round_id, m.phase, m.slot_id, m.sealed_for_a), FetchReply
        )
        assert isinstance(reply, FetchReply)
        reg.fetched.add(m.phase)  # only once A has answered: a refused fetch changes nothing
        return FetchResponse(rows[0].astype("<i8").tobytes(), reply.box)


class DeviceClient:
    """A device's side of the protocol; ``send`` delivers bytes to C and returns its reply."""

    def __init__(
        self,
        device_id: bytes,
        deployment: Deployment,
        send: Callable[[bytes], bytes],
        directory_cache: dict[int, SlotTable] | None = None,
    ) -> None:
        """``directory_cache`` may be shared by the devices of one pool (the directory is public
        and identical for everyone), so a pool fetches each round's directory once."""
        _check_device_id(device_id)
        self.device_id = device_id
        self.deployment = deployment
        self.codec = deployment.codec
        self._send = send
        self._secrets: dict[int, bytes] = {}
        self._directory: dict[int, SlotTable] = {} if directory_cache is None else directory_cache
        self._aggregate_tables: dict[tuple[int, str], SlotTable] = {}
        self._outbox: dict[tuple[int, str], bytes] = {}
        if deployment.mode is Mode.PLAINTEXT:
            _warn_plaintext("device")

    def register(self, round_id: int, rpis: Sequence[bytes]) -> list[bytes]:
        """Register the pseudonym slots of this device's own beacons (RPIs) for a round.

        Raises:
            RegistrationError: A's acknowledgement does not verify (C cannot forge it).
        """
        slots = [pseudonym_slot(r, round_id, self.deployment.deployment_key) for r in rpis]
        secret = self._secrets.setdefault(round_id, os.urandom(SECRET_BYTES))
        slot_ids = b"".join(slots)
        digest = hashlib.sha256(slot_ids).digest()
        aad = post_header(self.device_id, round_id, "")
        sealed = seal(self.deployment.aggregator_public, secret + digest, INFO_REGISTER, aad)
        req = RegisterRequest(self.device_id, round_id, slot_ids, sealed)
        resp = RegisterResponse.from_bytes(self._send(req.to_bytes()))
        ack = box_open(secret, resp.ack_from_a, INFO_REGISTER_ACK, aad)
        if ack != b"registered" + digest:
            raise RegistrationError("the aggregator acknowledged a different slot list")
        return slots

    def directory(self, round_id: int) -> SlotTable:
        """The round's registered pseudonym slots (cached after the first request)."""
        if round_id not in self._directory:
            resp = DirectoryResponse.from_bytes(self._send(DirectoryRequest(round_id).to_bytes()))
            self._directory[round_id] = SlotTable(bytes(r) for r in as_id_matrix(resp.slot_ids))
        return self._directory[round_id]

    def _slot_pool(self, spec: RoundSpec, p: PhaseSpec) -> SlotTable:
        if p.kind is SlotKind.PSEUDONYM:
            return self.directory(spec.round_id)
        key = (spec.round_id, p.name)
        if key not in self._aggregate_tables:
            self._aggregate_tables[key] = SlotTable(p.aggregate_ids())
        return self._aggregate_tables[key]

    def build_post(
        self,
        spec: RoundSpec,
        phase: str,
        slots: Sequence[bytes | str],
        values: npt.ArrayLike,
    ) -> bytes:
        """Encode, pad, share and seal a post (no sending): the bytes to send to C.

        ``values`` has shape ``(len(slots), dim)``; at most ``items_per_device`` rows. Missing
        rows are zero-valued dummies to random slots of the phase, so every post has the
        same size and item count.

        Raises:
            WrongLength: wrong shape, or more items than ``items_per_device``.
            EncodingError: a value outside the codec's range.
        """
        p = spec.phase(phase)
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != p.dim or x.shape[0] != len(slots):
            raise WrongLength(
                f"values must have shape ({len(slots)}, {p.dim}) for phase {phase!r}, got {x.shape}"
            )
        if len(slots) > p.items_per_device:
            raise WrongLength(
                f"{len(slots)} items exceed items_per_device={p.items_per_device} of {phase!r}"
            )
        ids = [aggregate_slot(s) if isinstance(s, str) else s for s in slots]
        pool = self._slot_pool(spec, p)
        # checked here too: in shuffled mode C cannot see slots, and a bad item would only be
        # dropped silently by the receiving server at close
        pool.lookup(as_id_matrix(b"".join(ids)))
        n_dummy = p.items_per_device - len(ids)
        if n_dummy and not pool:
            raise WrongLength(f"phase {phase!r} has no slots to pad with dummies")
        pick = np.frombuffer(os.urandom(8 * n_dummy), dtype="<u8") % max(len(pool), 1)
        ids += pool.ids_at(pick.tolist())
        encoded = np.zeros((p.items_per_device, p.dim), dtype=np.int64)
        encoded[: len(slots)] = self.codec.encode(x)
        slot_ids = b"".join(ids)
        as_id_matrix(slot_ids)
        rid = spec.round_id
        if self.deployment.mode is Mode.SHUFFLED:
            return self._shuffled_post(rid, phase, slot_ids, encoded).to_bytes()
        if self.deployment.mode is Mode.PLAINTEXT:
            share_c, sealed = encoded, b""
        else:
            seed = new_seed()
            share_c = split_with_seed(encoded, seed)
            header = post_header(self.device_id, rid, phase)
            digest = hashlib.sha256(header + slot_ids).digest()
            sealed = seal(self.deployment.aggregator_public, seed + digest, INFO_MAILBOX, header)
        return MailboxPost(
            self.device_id, rid, phase, p.dim, slot_ids, share_c.astype("<i8").tobytes(), sealed
        ).to_bytes()

    def _shuffled_post(
        self, round_id: int, phase: str, slot_ids: bytes, encoded: npt.NDArray[np.int64]
    ) -> ShuffledPost:
        k = encoded.shape[0]
        seeds = [new_seed() for _ in range(k)]
        cids = self._new_cids(k)
        share_c = split_rows(encoded, seeds).astype("<i8")
        aad = phase_aad(round_id, phase)
        c_pub, a_pub = self.deployment.coordinator_public, self.deployment.aggregator_public
        slot = [slot_ids[i * SLOT_ID_BYTES : (i + 1) * SLOT_ID_BYTES] for i in range(k)]
        inner_c = b"".join(
            seal(c_pub, cids[i] + slot[i] + share_c[i].tobytes(), INFO_ITEM_C, aad)
            for i in range(k)
        )
        items_a = tuple(
            seal(a_pub, cids[i] + slot[i] + seeds[i], INFO_ITEM_A, aad) for i in range(k)
        )
        outer = seal(a_pub, inner_c, INFO_OUTER, post_header(self.device_id, round_id, phase))
        return ShuffledPost(self.device_id, round_id, phase, outer, items_a)

    def _new_cids(self, k: int) -> list[bytes]:
        """Fresh random contribution ids: they must carry nothing about the sender."""
        return [os.urandom(CID_BYTES) for _ in range(k)]

    def post(
        self, spec: RoundSpec, phase: str, slots: Sequence[bytes | str], values: npt.ArrayLike
    ) -> bool:
        """Build, remember and send a post; returns False if C saw it already (a replay)."""
        raw = self.build_post(spec, phase, slots, values)
        self._outbox[(spec.round_id, phase)] = raw
        return self._deliver(raw)

    def resend(self, round_id: int, phase: str) -> bool:
        """Retry the remembered post byte for byte (safe: C counts it once).

        Raises:
            PhaseError: this device has not posted in that round and phase.
        """
        raw = self._outbox.get((round_id, phase))
        if raw is None:
            raise PhaseError(f"no post to resend for round {round_id} phase {phase!r}")
        return self._deliver(raw)

    def _deliver(self, raw: bytes) -> bool:
        return bool(PostReceipt.from_bytes(self._send(raw)).fresh)

    def fetch(self, round_id: int, phase: str, slot_id: bytes) -> npt.NDArray[np.float64]:
        """Fetch and decode the sum of one of this device's registered slots."""
        return self.codec.decode(self.fetch_ring(round_id, phase, slot_id))

    def fetch_ring(self, round_id: int, phase: str, slot_id: bytes) -> npt.NDArray[np.int64]:
        """Fetch the exact ring sum of one of this device's registered slots."""
        secret = self._secrets.get(round_id)
        if secret is None:
            raise RegistrationError(f"this device registered no slots in round {round_id}")
        aad = fetch_aad(self.device_id, round_id, phase, slot_id)
        tag = fetch_tag(secret, round_id, phase, slot_id)
        sealed = seal(self.deployment.aggregator_public, tag, INFO_FETCH, aad)
        raw = self._send(FetchRequest(self.device_id, round_id, phase, slot_id, sealed).to_bytes())
        resp = FetchResponse.from_bytes(raw)
        a = box_open(secret, resp.box_from_a, INFO_FETCH_REPLY, aad)
        c_sum = np.frombuffer(resp.share_sum_c, dtype="<i8").astype(np.int64)
        a_sum = np.frombuffer(a, dtype="<i8").astype(np.int64)
        if c_sum.shape != a_sum.shape:
            raise WrongLength("the two servers' share sums have different lengths")
        # the device is not told the count; max_summands bounds any honest sum
        return self.codec.check_sum(c_sum + a_sum)


class InMemoryNetwork:
    """C, A and devices wired by byte-level links, with optional traffic taps and faults.

    ``c_to_a_filter`` / ``a_to_c_filter`` may rewrite (drop, duplicate, corrupt) any C→A request
    or A→C reply — the tests' fault injectors.
    ``tap`` records every (link, request, response) triple — what each server saw.
    """

    def __init__(
        self,
        mode: Mode,
        codec: FixedPointCodec | None = None,
        deployment_key: bytes = b"",
        tap: bool = False,
        c_permutation: Permutation = csprng_permutation,
        a_permutation: Permutation = csprng_permutation,
    ) -> None:
        self.c_keys, self.a_keys = KeyPair.generate(), KeyPair.generate()
        self.deployment = Deployment(
            mode,
            codec or FixedPointCodec(),
            self.c_keys.public,
            self.a_keys.public,
            deployment_key,
        )
        self.tap = tap
        #: the simulated devices form one pool and share the public slot directory
        self.directory_cache: dict[int, SlotTable] = {}
        self.log: list[tuple[str, bytes, bytes]] = []
        self.c_to_a_filter: Callable[[bytes], bytes] | None = None
        self.a_to_c_filter: Callable[[bytes], bytes] | None = None
        self.aggregator = AggregatorServer(self.a_keys, self.deployment, a_permutation)
        self.coordinator = CoordinatorServer(
            self.c_keys, self.deployment, self._c_to_a, c_permutation
        )

    def _c_to_a(self, raw: bytes) -> bytes:
        if self.c_to_a_filter is not None:
            raw = self.c_to_a_filter(raw)
        resp = self.aggregator.handle(raw)
        if self.a_to_c_filter is not None:
            resp = self.a_to_c_filter(resp)
        if self.tap:
            self.log.append(("c->a", raw, resp))
        return resp

    def device(self, device_id: bytes | None = None) -> DeviceClient:
        """A new device client (random 16-byte id unless given) linked to C."""
        did = device_id if device_id is not None else os.urandom(DEVICE_ID_BYTES)

        def send(raw: bytes) -> bytes:
            resp = self.coordinator.handle_device(raw, did)
            if self.tap:
                self.log.append(("device->c", raw, resp))
            return resp

        return DeviceClient(did, self.deployment, send, self.directory_cache)

    def open_round(self, spec: RoundSpec) -> None:
        """Both operators open the round (A from its own copy; C checks they match)."""
        self.aggregator.open_round(spec)
        self.coordinator.open_round(spec)
