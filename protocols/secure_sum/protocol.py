"""The posting modes as transport-free state machines: device, coordinator C, aggregator A.

Parties exchange only serialized :mod:`messages` (bytes). Devices talk only to C
(``CoordinatorServer.handle_device``); C talks to A through a ``Callable[[bytes], bytes]``
link (``AggregatorServer.handle``). :class:`InMemoryNetwork` wires them for tests and benches;
a gRPC adapter wires the same objects over the network.

Round lifecycle (per server): ``open_round`` → registrations → ``close_registration`` →
posts per phase → ``close_phase`` (relays, surviving-set agreement) → releases (registrants
fetch pseudonym sums; C opens aggregate sums). See ``LEAKAGE.md`` for what each mode reveals.

A *participant* is one 16-byte id: a phone (a pool of one device) or a process hosting ``m``
devices, which registers, posts ``m × items_per_device`` items and fetches as one party. Every
write is idempotent per (participant, round[, phase]): the identical request is answered again
(a replay), a different one is refused. A participant holding a persisted secret
(``DeviceClient(secret=...)``) derives every random choice of a request from it, so after a
crash it rebuilds the same request byte for byte and the servers see a replay.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from . import errors
from .accumulator import (
    KEY_BYTES,
    DenseAccumulator,
    ShareAccumulator,
    key_set_digest,
    keys_from_bytes,
)
from .config import Deployment, Mode, PhaseSpec, RoundSpec, SlotKind
from .dp import DPConfig, NoiseRng, check_headroom, check_noisy_sum, noisy_share_sums
from .envelope import OVERHEAD, KeyPair, box_open, box_seal, hkdf_sha256, open_envelope, seal
from .errors import (
    AgreementError,
    ConflictingSubmission,
    MessageError,
    NotRegistrant,
    OverflowBoundError,
    PartialGroup,
    PhaseClosed,
    PhaseError,
    RegistrationError,
    RoundLost,
    SecureSumError,
    UnknownRound,
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
from .sharing import (
    PRG_IV,
    SEED_BYTES,
    aes_ctr_keystream,
    expand_seed_runs,
    expand_seeds,
    mask_in_place,
    split_rows,
    split_with_seed,
)
from .slots import (
    DEPLOYMENT_KEY_BYTES,
    DEVICE_ID_BYTES,
    RPI_BYTES,
    SLOT_ID_BYTES,
    Registry,
    SlotTable,
    aggregate_slot,
    as_id_matrix,
    pseudonym_slots,
)

log = logging.getLogger(__name__)

INFO_REGISTER = b"decentsim/v1/register"
INFO_REGISTER_ACK = b"decentsim/v1/register-ack"
INFO_MAILBOX = b"decentsim/v1/mailbox-seed"
INFO_OUTER = b"decentsim/v1/shuffled-outer"
INFO_ITEM_C = b"decentsim/v1/item-for-c"
INFO_ITEM_A = b"decentsim/v1/item-for-a"
INFO_FETCH = b"decentsim/v2/fetch"
INFO_FETCH_REPLY = b"decentsim/v2/fetch-reply"
SECRET_BYTES = 32
#: bytes of a participant's persisted secret (``DeviceClient(secret=...)``)
PARTICIPANT_SECRET_BYTES = 32
CID_BYTES = 16
_DIGEST = 32
#: most items in one post (a participant hosting m devices posts m × items_per_device)
MAX_ITEMS_PER_POST = 2**22
#: Most ring words (slots × dim) of one dense post: 32 MiB of C-shares, inside the transport's
#: payload limit (``proto.limits.MAX_PAYLOAD_BYTES``, 40 MiB)
MAX_DENSE_WORDS = 2**22
#: most slots in one fetch request
MAX_SLOTS_PER_FETCH = 2**22
#: most items A expands and adds at once from a mailbox relay (a million phones' posts are
#: taken a slice at a time: memory for one slice's shares, not the relay's gigabytes)
RELAY_SLICE_ITEMS = 2**21
_DERIVE_LABEL = b"decentsim/participant-derive/v1"
_REQUEST_LABEL = b"decentsim/request-digest/v1"
_NOISE_LABEL = b"decentsim/agg-noise/v1"
#: bytes of a server's persisted noise secret (``_Server.noise_secret``)
NOISE_SECRET_BYTES = 32

#: a permutation source: n -> a uniformly random permutation of range(n)
Permutation = Callable[[int], npt.NDArray[np.int64]]
#: ``observer(direction, peer, raw)``: told of every message a server receives (``"in"``) or
#: sends (``"out"``); ``peer`` is a participant id in hex, ``"coordinator"`` or
#: ``"aggregator"``. The audit's sealed transcript (``contract.transcript``) is one.
Observer = Callable[[str, str, bytes], None]


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


def _slot_list_digest(slot_ids: bytes) -> bytes:
    """Count (u32) and SHA-256 of a concatenated slot list: binds the whole list, fixed size."""
    n = len(slot_ids) // SLOT_ID_BYTES
    return n.to_bytes(4, "big") + hashlib.sha256(b"decentsim/slot-list/v1" + slot_ids).digest()


def fetch_aad(device_id: bytes, round_id: int, phase: str, slot_ids: bytes) -> bytes:
    """AAD of a fetch request and of A's reply box: participant, round, phase, slot list."""
    return post_header(device_id, round_id, phase) + _slot_list_digest(slot_ids)


def fetch_tag(secret: bytes, round_id: int, phase: str, slot_ids: bytes) -> bytes:
    """The registrant's proof of its fetch secret (only it and A hold the secret), bound to the
    whole slot list (a fixed-size suffix, so the variable-length phase name is unambiguous)."""
    msg = b"decentsim/fetch/v2" + phase_aad(round_id, phase) + _slot_list_digest(slot_ids)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def request_digest(msg: Message) -> bytes:
    """SHA-256 of a request's canonical bytes: what servers compare to recognise a replay."""
    return hashlib.sha256(_REQUEST_LABEL + msg.to_bytes()).digest()


def valid_item_count(n_items: int, items_per_device: int) -> bool:
    """Whether a post of ``n_items`` items is ``m × items_per_device`` for some ``m ≥ 1`` and
    within :data:`MAX_ITEMS_PER_POST`."""
    return 1 <= n_items <= MAX_ITEMS_PER_POST and n_items % items_per_device == 0


def check_item_count(n_items: int, items_per_device: int, phase: str) -> None:
    """Refuse a post whose item count is not a positive multiple of ``items_per_device`` (one
    block per device the participant hosts) or exceeds :data:`MAX_ITEMS_PER_POST`.

    Raises:
        WrongLength: naming the count and the rule it breaks.
    """
    if n_items > MAX_ITEMS_PER_POST:
        raise WrongLength(
            f"post has {n_items} items, more than MAX_ITEMS_PER_POST={MAX_ITEMS_PER_POST}"
        )
    if n_items < 1 or n_items % items_per_device:
        raise WrongLength(
            f"phase {phase!r} takes m × items_per_device={items_per_device} items per post "
            f"(m ≥ 1 devices), post has {n_items}"
        )


def _check_whole_groups(spec: RoundSpec, n_slots: int) -> None:
    """Raise :class:`PartialGroup` unless ``n_slots`` fills whole slot groups of every
    pseudonym phase of the round (a device registers its day's beacons as whole groups)."""
    unit = spec.registration_unit()
    if n_slots % unit:
        raise PartialGroup(
            f"round {spec.round_id}: a registration of {n_slots} slot(s) is not whole groups of "
            f"{unit}"
        )


def fetch_slot_matrix(slot_ids: bytes) -> npt.NDArray[np.uint8]:
    """The ``(n, 8)`` slot ids of a fetch, ``0 ≤ n ≤`` :data:`MAX_SLOTS_PER_FETCH`; none
    (``n = 0``) asks for every slot the participant registered this round, in its order.

    Raises:
        WrongLength: not whole ids, or too many.
    """
    ids = as_id_matrix(slot_ids)
    if len(ids) > MAX_SLOTS_PER_FETCH:
        raise WrongLength(
            f"a fetch names 0..{MAX_SLOTS_PER_FETCH} slots (MAX_SLOTS_PER_FETCH; 0: every "
            f"registered slot), got {len(ids)}"
        )
    return ids


def dense_slot_ids(p: PhaseSpec, table: SlotTable) -> bytes:
    """The slot ids a dense-mode post of phase ``p`` names: every aggregate slot, in order (public
    names, the same in every post; the servers check them against their table), or none for a
    pseudonym phase, whose posts follow the agreed directory by position."""
    return table.id_bytes() if p.kind is SlotKind.AGGREGATE else b""


def spec_digest(spec: RoundSpec) -> bytes:
    """A digest of a round spec, so C and A can check they run the same round."""
    parts = [spec.round_id.to_bytes(8, "big")]
    for p in spec.phases:
        parts += [p.name.encode(), b"\x00", p.kind.value.encode(), b"\x00"]
        parts += [p.dim.to_bytes(4, "big"), p.items_per_device.to_bytes(4, "big")]
        parts += [n.encode() + b"\x00" for n in p.aggregate_slots]
        if p.dp is not None:
            # 0xFF never occurs in UTF-8 names, and the encoding has a fixed length: unambiguous
            # (a phase without DP keeps its former digest)
            parts += [b"\xff", p.dp.encode()]
        if p.group_slots != 1:
            # 0xFE never occurs in UTF-8 either; a phase without groups keeps its digest
            parts += [b"\xfe", p.group_slots.to_bytes(4, "big")]
    return hashlib.sha256(b"decentsim/round-spec/v1" + b"".join(parts)).digest()


def noise_context(deployment: Deployment, round_id: int, phase: str, surviving: bytes) -> bytes:
    """What a server's noise for one release is derived from (with its own noise secret).

    Binds the deployment (both servers' public keys), the round, the phase and the agreed
    surviving-set digest: re-opening the same surviving set re-adds the identical noise (so
    repeated requests cannot average it away), any other release gets independent noise.
    """
    name = phase.encode()
    return b"".join(
        (
            _NOISE_LABEL,
            hashlib.sha256(deployment.coordinator_public + deployment.aggregator_public).digest(),
            round_id.to_bytes(8, "big"),
            len(name).to_bytes(1, "big"),
            name,
            surviving,
        )
    )


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
        #: told of every message in and out (the audit transcript); ``None``: nothing recorded
        self.observer: Observer | None = None
        self._min_cohort = 0
        #: this server's own noise secret for DP phases: never sent, never logged. A fresh one
        #: per process by default; a service sets its persisted one so that a restarted server
        #: re-adds the same noise to a re-opened release.
        self.noise_secret = os.urandom(NOISE_SECRET_BYTES)
        if deployment.mode is Mode.PLAINTEXT:
            _warn_plaintext(self.role)

    @property
    def min_cohort(self) -> int:
        """Minimum cohort: a slot group holding fewer summands is released as zeros (0: off)."""
        return self._min_cohort

    @min_cohort.setter
    def min_cohort(self, k: int) -> None:
        if k > 1 and self.deployment.mode is Mode.DENSE:
            raise ValueError(
                f"min_cohort={k} needs per-slot summand counts, which dense mode hides from both "
                "servers: use mailbox or shuffled mode for a minimum cohort"
            )
        self._min_cohort = k

    def _group_totals(
        self,
        acc: ShareAccumulator,
        idx: npt.NDArray[np.int64],
        row: npt.NDArray[np.int64],
        group_slots: int,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Share-sum totals and summand counts of a fetch's groups: slot ``idx[j]`` adds into
        release row ``row[j]``; every group has ``group_slots`` slots (``authorize_fetch``).

        A group's total is released as one sum: more than ``max_summands`` summands in it
        withhold it, as for an overflowed slot (a registrant's bound check assumes at most
        ``max_summands`` summands per row).

        Raises:
            OverflowBoundError: a slot or a group offered more than ``max_summands`` summands.
        """
        sums, counts = acc.released_sums(idx)
        if group_slots == 1:  # every slot its own group, rows in request order
            return sums, counts
        order = np.argsort(row, kind="stable")
        # int64 addition wraps modulo 2^64: exactly the ring's sum of shares
        totals = sums[order].reshape(-1, group_slots, sums.shape[1]).sum(axis=1)
        group_counts = counts[order].reshape(-1, group_slots).sum(axis=1)
        # dense mode: a count is the number of participants' posts, which all cover every slot;
        # the servers never see how many contributions a group holds, and the registrant's bound
        # check (max_summands) is the overflow check
        over = group_counts > self.deployment.codec.max_summands
        if self.deployment.mode is not Mode.DENSE and over.any():
            raise OverflowBoundError(
                f"{int(over.sum())} group(s) hold more than "
                f"max_summands={self.deployment.codec.max_summands} summands; their totals are "
                "withheld"
            )
        return totals, group_counts

    def _cohort_rows(
        self, rows: npt.NDArray[np.int64], counts: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """A fetch's share-sum rows (one per slot group) with groups of fewer than
        ``min_cohort`` summands zeroed.

        Both servers hold the same agreed summands, so both zero the same groups and the
        registrant's total of such a group is exactly zero. Summands include the zero-valued padding
        dummies (servers cannot tell them apart): ``min_cohort`` bounds items, not distinct
        real contributors.
        """
        if self.min_cohort <= 1:
            return rows
        return np.where((counts < self.min_cohort)[:, None], np.int64(0), rows)

    def _open(self, spec: RoundSpec) -> None:
        if spec.round_id in self.rounds:
            raise PhaseError(f"round {spec.round_id} is already open")
        for p in spec.phases:
            if p.dp is not None:
                check_headroom(p.dp, self.codec)  # a noisy sum must not wrap 2^64
        self.rounds[spec.round_id] = _Round(spec)

    def _released_aggregates(
        self, rnd: _Round, phase: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """This server's share sums and counts of an agreed aggregate phase, with its own part
        of the DP noise added when the phase carries a ``DPConfig``."""
        p = rnd.phase(phase)
        acc = self._accumulator(rnd, phase)
        sums, counts = acc.released_sums(np.arange(acc.n_slots))
        if p.dp is not None:
            assert acc.surviving_digest is not None  # released_sums requires agreement
            ctx = noise_context(self.deployment, rnd.spec.round_id, phase, acc.surviving_digest)
            sums = noisy_share_sums(p.dp, sums, NoiseRng.derive(self.noise_secret, ctx))
        return sums, counts

    def _round(self, round_id: int) -> _Round:
        rnd = self.rounds.get(round_id)
        if rnd is None:
            raise UnknownRound(f"round {round_id} is not open on the {self.role}")
        return rnd

    def _accumulator(self, rnd: _Round, phase: str) -> ShareAccumulator:
        acc = rnd.accumulators.get(phase)
        if acc is None:
            p = rnd.phase(phase)
            kind = DenseAccumulator if self.deployment.mode is Mode.DENSE else ShareAccumulator
            acc = kind(len(rnd.table(phase)), p.dim, self.codec)
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
        #: DP settings A's operator requires, by phase name (see :meth:`open_round`)
        self.phase_dp: dict[str, DPConfig] = {}

    def open_round(self, spec: RoundSpec) -> None:
        """A's operator opens a round from its own copy of the spec.

        A phase named in ``phase_dp`` gets A's own DP settings when the spec carries none (a
        spec from the wire never does); a spec carrying different ones is refused. Either way
        C's ``OpenRound`` digest must then match, so C and A add noise under identical settings.

        Raises:
            AgreementError: the spec's DP settings of a phase differ from ``phase_dp``.
        """
        phases = []
        for p in spec.phases:
            want = self.phase_dp.get(p.name)
            if want is not None and p.dp is None:
                p = replace(p, dp=want)
            elif want is not None and p.dp != want:
                raise AgreementError(
                    f"round {spec.round_id} phase {p.name!r}: the spec's DP settings differ "
                    "from the aggregator's"
                )
            phases.append(p)
        self._open(RoundSpec(spec.round_id, tuple(phases)))

    def handle(self, raw: bytes) -> bytes:
        """Serve one request from C; refusals come back as :class:`ErrorReply`."""
        if self.observer is not None:
            self.observer("in", "coordinator", raw)
        try:
            msg = decode(raw)
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise MessageError(f"the aggregator does not serve {type(msg).__name__}")
            reply = handler(self, msg).to_bytes()
        except SecureSumError as err:
            reply = ErrorReply(type(err).__name__, str(err)).to_bytes()
        if self.observer is not None:
            self.observer("out", "coordinator", reply)
        return reply

    def _on_open_round(self, m: OpenRound) -> Message:
        if spec_digest(self._round(m.round_id).spec) != m.spec_digest:
            raise AgreementError(
                f"round {m.round_id}: C and A hold different round specs (phases, slots or "
                "DP settings)"
            )
        return Agreed(m.spec_digest)

    def _on_register(self, m: RelayRegister) -> Message:
        rnd = self._round(m.round_id)
        _check_device_id(m.device_id)
        digest_m = request_digest(m)
        # a relay retried after a lost reply: answer it again (state unchanged)
        cached = rnd.registry.replay(m.device_id, digest_m)
        if cached is not None:
            return RegisterResponse.from_bytes(cached)
        if not rnd.registration_open:
            raise PhaseClosed(f"round {m.round_id}: registration is closed")
        aad = post_header(m.device_id, m.round_id, "")
        inner = open_envelope(self.keypair, m.sealed_for_a, INFO_REGISTER, aad)
        if len(inner) != SECRET_BYTES + _DIGEST:
            raise WrongLength(f"registration secret block has {len(inner)} bytes")
        secret, digest = inner[:SECRET_BYTES], inner[SECRET_BYTES:]
        if not hmac.compare_digest(digest, hashlib.sha256(m.slot_ids).digest()):
            raise NotRegistrant("relayed slot list differs from the one the device sealed")
        _check_whole_groups(rnd.spec, len(as_id_matrix(m.slot_ids)))
        rnd.registry.check_new(m.device_id, m.slot_ids)
        reply = RegisterResponse(box_seal(secret, b"registered" + digest, INFO_REGISTER_ACK, aad))
        rnd.registry.register(m.device_id, m.slot_ids, digest_m, reply.to_bytes(), secret)
        return reply

    def _on_close_registration(self, m: CloseRegistration) -> Message:
        rnd = self._round(m.round_id)
        digest = hashlib.sha256(rnd.registry.table.id_bytes()).digest()
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
        dense = self.deployment.mode is Mode.DENSE
        dense_ids = dense_slot_ids(p, table) if dense else b""
        # one public-key open per post is inherent; everything after it is batched over items
        n_posts = len(m.device_ids)
        ok = np.zeros(n_posts, dtype=bool)
        sizes = np.zeros(n_posts, dtype=np.int64)  # items per post: m × k, m may vary by post
        seeds: list[bytes] = []
        for i, (device, slot_ids, sealed) in enumerate(
            zip(m.device_ids, m.slot_ids, m.sealed_for_a, strict=True)
        ):
            if dense:  # every slot of the table, in order
                n_items, rest = (len(table), 0) if slot_ids == dense_ids else (0, 1)
            else:
                n_items, rest = divmod(len(slot_ids), SLOT_ID_BYTES)
            valid = n_items > 0 if dense else valid_item_count(n_items, k)
            if len(device) != DEVICE_ID_BYTES or rest or not valid:
                continue
            sizes[i] = n_items
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
        good_sizes = sizes[good]
        if isinstance(acc, DenseAccumulator):
            blocks = expand_seed_runs(seeds, (good_sizes * p.dim).tolist())
            keys = b"".join([unit_key(m.device_ids[i], m.round_id, m.phase) for i in good.tolist()])
            res = acc.submit_blocks(keys, blocks.reshape(len(good), len(table), p.dim))
            rejected = n_posts - len(good) + res.conflicting + res.over_bound
            return RelayReceipt(res.accepted, res.replayed, rejected)
        keys = [unit_key(m.device_ids[i], m.round_id, m.phase) for i in good.tolist()]
        # C relays each unit once, so the slices are independent; a relay naming a unit twice
        # is taken whole, so that a unit with two contents is refused in both (submit_many)
        whole = len(set(keys)) < len(keys)
        accepted = replayed = 0
        rejected = n_posts - len(good)
        for lo, hi in _slices(good_sizes, len(good_sizes) if whole else RELAY_SLICE_ITEMS):
            part = good[lo:hi]
            ids = as_id_matrix(b"".join([m.slot_ids[i] for i in part.tolist()]))
            slot_idx, known = table.find(ids)
            row_post = np.repeat(np.arange(len(part)), good_sizes[lo:hi])
            post_known = np.bincount(row_post, weights=~known, minlength=len(part)) == 0
            if plaintext:
                shares = np.zeros((len(slot_idx), p.dim), dtype=np.int64)
            else:
                # each post's seed expands to its own length; one buffer for the slice
                runs = (good_sizes[lo:hi] * p.dim).tolist()
                shares = expand_seed_runs(seeds[lo:hi], runs).reshape(-1, p.dim)
            use = post_known[row_post]
            res = acc.submit_many(
                b"".join([keys[lo + j] for j in np.flatnonzero(post_known).tolist()]),
                slot_idx[use],
                shares[use],
                good_sizes[lo:hi][post_known],
            )
            accepted, replayed = accepted + res.accepted, replayed + res.replayed
            rejected += len(part) - int(post_known.sum()) + res.conflicting + res.over_bound
        return RelayReceipt(accepted, replayed, rejected)

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
            n_items, rest = divmod(len(blob), size_c)
            if rest or not valid_item_count(n_items, k):
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
        sums, counts = self._released_aggregates(rnd, m.phase)
        return AggregateShares(sums.astype("<i8").tobytes(), counts.astype("<i8").tobytes())

    def _on_fetch(self, m: RelayFetch) -> Message:
        rnd = self._round(m.round_id)
        if rnd.phase(m.phase).kind is not SlotKind.PSEUDONYM:
            raise RegistrationError(f"phase {m.phase!r} has no pseudonym slots to fetch")
        ids = fetch_slot_matrix(m.slot_ids)
        acc = self._accumulator(rnd, m.phase)
        acc.sums()  # nothing is released before agreement
        group = rnd.phase(m.phase).group_slots
        reg, idx, row = rnd.registry.authorize_fetch(m.device_id, ids, group)
        digest = request_digest(m)
        cached = rnd.registry.cached_fetch(reg, m.phase, digest)
        if cached is not None:  # C retried after losing the reply: the same bytes again
            return FetchReply.from_bytes(cached)
        aad = fetch_aad(m.device_id, m.round_id, m.phase, m.slot_ids)
        tag = open_envelope(self.keypair, m.sealed_for_a, INFO_FETCH, aad)
        assert reg.fetch_secret is not None
        if not hmac.compare_digest(
            tag, fetch_tag(reg.fetch_secret, m.round_id, m.phase, m.slot_ids)
        ):
            raise NotRegistrant("fetch proof does not match the registrant's secret")
        rows = self._cohort_rows(*self._group_totals(acc, idx, row, group))
        box = box_seal(reg.fetch_secret, rows.astype("<i8").tobytes(), INFO_FETCH_REPLY, aad)
        reply = FetchReply(box)
        rnd.registry.record_fetch(reg, m.phase, digest, reply.to_bytes())
        return reply

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


def _slices(sizes: npt.NDArray[np.int64], max_items: int) -> list[tuple[int, int]]:
    """Consecutive ``[lo, hi)`` ranges of posts holding at most ``max_items`` items each (a
    larger post alone), covering every post."""
    ends = np.cumsum(sizes)
    bounds = [0]
    while bounds[-1] < len(sizes):
        done = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
        hi = int(np.searchsorted(ends, done + max_items, side="right"))
        bounds.append(max(hi, bounds[-1] + 1))
    return list(itertools.pairwise(bounds))


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
        raw = msg.to_bytes()
        if self.observer is not None:
            self.observer("out", "aggregator", raw)
        try:
            reply = self._to_a(raw)
            if self.observer is not None:
                self.observer("in", "aggregator", reply)
            return _expect(reply, expect)
        except UnknownRound as err:
            round_id = getattr(msg, "round_id", None)
            if round_id is not None and round_id in self.rounds:
                raise RoundLost(
                    f"round {round_id} is open here but not at the aggregator (it restarted): "
                    "the round's attempt is void"
                ) from err
            raise

    # -- orchestration ----------------------------------------------------------------------
    def open_round(self, spec: RoundSpec) -> None:
        """Open a round here and check that A opened the same spec."""
        self._ask(OpenRound(spec.round_id, spec_digest(spec)), Agreed)
        self._open(spec)

    def close_registration(self, round_id: int) -> None:
        """End registration: both servers freeze the same slot directory."""
        rnd = self._round(round_id)
        digest = hashlib.sha256(rnd.registry.table.id_bytes()).digest()
        self._ask(CloseRegistration(round_id, digest), Agreed)
        rnd.registration_open = False

    def exclude_device(self, round_id: int, phase: str, device_id: bytes) -> bool:
        """Drop a participant's post before the phase closes (e.g. it broke the deadline).

        Its A-part is never relayed, so the surviving set excludes it at both servers (for a
        pool: all its devices' items).
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
        sums, counts = self._released_aggregates(rnd, phase)
        a = self._ask(AggregateRequest(round_id, phase), AggregateShares)
        assert isinstance(a, AggregateShares)
        a_sums = np.frombuffer(a.sums, dtype="<i8").astype(np.int64).reshape(sums.shape)
        a_counts = np.frombuffer(a.counts, dtype="<i8").astype(np.int64)
        if not np.array_equal(a_counts, counts):
            raise AgreementError("per-slot summand counts differ between the servers")
        if self.deployment.mode is Mode.DENSE:
            # a dense count is a number of participants, each summing any number of devices:
            # the bound is the devices' own (max_summands)
            counts = np.full_like(counts, self.codec.max_summands)
        # a sum outside count × max_encoded (+ the noise bound) means an out-of-range
        # contribution or a wrap
        both = (sums.view(np.uint64) + a_sums.view(np.uint64)).view(np.int64)
        if p.dp is None:
            total = self.codec.check_sum(both, counts)
        else:
            total = check_noisy_sum(p.dp, self.codec, both, counts)
        return {name: total[i] for i, name in enumerate(p.aggregate_slots)}

    # -- device-facing ----------------------------------------------------------------------
    def handle_device(self, raw: bytes, peer: bytes, decoded: Message | None = None) -> bytes:
        """Serve one participant request. ``peer`` is the participant id (``device_id``) the
        transport authenticated; ``decoded`` is ``raw`` already decoded by the transport, which
        checked its routing fields (decoding a dense post again would copy megabytes).

        Writes are idempotent: an identical registration, post or fetch is answered again
        (receipt ``fresh=0`` for a post, the stored reply otherwise) without changing state.

        Raises:
            SecureSumError: a specific subclass for every refusal; state is unchanged.
        """
        if self.observer is None:
            return self._serve_device(raw, peer, decoded)
        self.observer("in", peer.hex(), raw)
        reply = self._serve_device(raw, peer, decoded)
        self.observer("out", peer.hex(), reply)
        return reply

    def _serve_device(self, raw: bytes, peer: bytes, decoded: Message | None) -> bytes:
        msg = decode(raw) if decoded is None else decoded
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
        _check_device_id(m.device_id)
        digest = request_digest(m)
        # an identical resend (lost reply, restarted participant) gets the stored reply, without
        # a relay, even after registration closed: it changes nothing and reveals nothing new
        cached = rnd.registry.replay(m.device_id, digest)
        if cached is not None:
            return RegisterResponse.from_bytes(cached)
        if not rnd.registration_open:
            raise PhaseClosed(f"round {m.round_id}: registration is closed")
        _check_whole_groups(rnd.spec, len(as_id_matrix(m.slot_ids)))
        rnd.registry.check_new(m.device_id, m.slot_ids)
        # A registers first: if it refuses, C's registry is untouched
        resp = self._ask(
            RelayRegister(m.device_id, m.round_id, m.slot_ids, m.sealed_for_a), RegisterResponse
        )
        rnd.registry.register(m.device_id, m.slot_ids, digest, resp.to_bytes())
        return resp

    def _directory(self, m: DirectoryRequest) -> Message:
        rnd = self._round(m.round_id)
        if rnd.registration_open:
            raise PhaseError(
                f"round {m.round_id}: the slot directory is final only after registration"
            )
        return DirectoryResponse(rnd.registry.table.id_bytes())

    def _post_mailbox(self, m: MailboxPost) -> Message:
        if self.deployment.mode is Mode.SHUFFLED:
            raise MessageError("this deployment runs shuffled mode; mailbox posts are refused")
        rnd = self._round(m.round_id)
        self._check_open(rnd, m.phase)
        _check_device_id(m.device_id)
        p = rnd.phase(m.phase)
        if m.dim != p.dim:
            raise WrongLength(f"phase {m.phase!r} has dim {p.dim}, post has {m.dim}")
        dense = self.deployment.mode is Mode.DENSE
        table = rnd.table(m.phase)
        if dense and m.slot_ids != dense_slot_ids(p, table):
            raise MessageError(
                "this deployment runs dense mode: a post covers the whole slot table and names "
                "its slots only in an aggregate phase (every aggregate slot, in order)"
            )
        if dense:
            n_items = len(table)
        else:
            ids = as_id_matrix(m.slot_ids)
            n_items = len(ids)
            check_item_count(n_items, p.items_per_device, m.phase)
        if len(m.share_c) != 8 * n_items * p.dim:
            raise WrongLength(
                f"share block is {len(m.share_c)} bytes; expected {n_items} × {p.dim} int64"
            )
        plaintext = self.deployment.mode is Mode.PLAINTEXT
        if plaintext == bool(m.sealed_for_a):
            raise MessageError("sealed A-part must be present in mailbox mode, absent in plaintext")
        # a view of the post (no copy of a dense post's megabytes); the accumulators only read it
        shares = (
            np.frombuffer(m.share_c, dtype="<i8").astype(np.int64, copy=False).reshape(-1, p.dim)
        )
        key = unit_key(m.device_id, m.round_id, m.phase)
        acc = self._accumulator(rnd, m.phase)
        if isinstance(acc, DenseAccumulator):
            fresh = acc.submit_block(key, shares)
        else:
            fresh = acc.submit(key, table.lookup(ids), shares)
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
        n_items = len(m.items_for_a)
        check_item_count(n_items, p.items_per_device, m.phase)
        if any(len(e) != ITEM_A_BYTES for e in m.items_for_a):
            raise WrongLength(f"every A-item must be {ITEM_A_BYTES} bytes")
        if len(m.outer_for_a) != OVERHEAD + n_items * item_c_bytes(p.dim):
            raise WrongLength(
                f"outer envelope is {len(m.outer_for_a)} bytes; expected "
                f"{OVERHEAD + n_items * item_c_bytes(p.dim)} for {n_items} items of dim {p.dim}"
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
        ids = fetch_slot_matrix(m.slot_ids)
        acc = self._accumulator(rnd, m.phase)
        acc.sums()  # nothing is released before agreement
        reg, idx, row = rnd.registry.authorize_fetch(m.device_id, ids, p.group_slots)
        digest = request_digest(m)
        cached = rnd.registry.cached_fetch(reg, m.phase, digest)
        if cached is not None:  # a retry of the answered request: the same bytes, nothing new
            return FetchResponse.from_bytes(cached)
        rows = self._cohort_rows(*self._group_totals(acc, idx, row, p.group_slots))
        reply = self._ask(
            RelayFetch(m.device_id, m.round_id, m.phase, m.slot_ids, m.sealed_for_a), FetchReply
        )
        assert isinstance(reply, FetchReply)
        resp = FetchResponse(rows.astype("<i8").tobytes(), reply.box)
        # recorded only once A has answered: a refused fetch changes nothing
        rnd.registry.record_fetch(reg, m.phase, digest, resp.to_bytes())
        return resp


def _length_prefixed(b: bytes) -> bytes:
    return len(b).to_bytes(4, "big") + b


class _Choices:
    """The random choices of one request: fresh, or derived from the participant's secret.

    Without a secret every choice is fresh from the OS CSPRNG (and every envelope gets a fresh
    ephemeral key). With one, a request key is derived first::

        K = HKDF-SHA256(ikm=secret, salt=label, info=label ‖ C's key ‖ A's key ‖ participant ‖
                        round ‖ phase ‖ purpose ‖ SHA-256(content), 32)

    where ``content`` is everything the request says (its values and slots), and then each choice
    from ``K``, domain-separated by what it is for and its index: byte strings as the AES-128-CTR
    stream of ``HKDF(K, "bytes" ‖ what)``, envelope ephemerals through
    :func:`~.envelope.derive_ephemeral` with seed ``HKDF(K, "ephemeral" ‖ what ‖ index)``, which
    also binds the envelope's plaintext, info and AAD. So rebuilding the same request gives the
    same bytes, and a request with other content shares nothing with it (no PRG mask, contribution
    id, dummy pick or AEAD key/nonce is ever reused across different content).
    """

    def __init__(
        self,
        secret: bytes | None,
        deployment: Deployment,
        device_id: bytes,
        round_id: int,
        phase: str,
        purpose: bytes,
        content: bytes,
    ) -> None:
        self._key: bytes | None = None
        if secret is not None:
            context = b"".join(
                (
                    _DERIVE_LABEL,
                    # another deployment (other servers) never sees the same derived values
                    _length_prefixed(deployment.coordinator_public),
                    _length_prefixed(deployment.aggregator_public),
                    device_id,
                    round_id.to_bytes(8, "big"),
                    _length_prefixed(phase.encode()),
                    _length_prefixed(purpose),
                    hashlib.sha256(content).digest(),
                )
            )
            self._key = hkdf_sha256(secret, _DERIVE_LABEL, context, 32)

    def take(self, what: bytes, n: int) -> bytes:
        """``n`` random bytes for the choice ``what``."""
        if self._key is None:
            return os.urandom(n)
        stream_key = hkdf_sha256(self._key, _DERIVE_LABEL, b"bytes" + _length_prefixed(what), 16)
        return aes_ctr_keystream(stream_key, PRG_IV, n)

    def seal(
        self, what: bytes, index: int, recipient: bytes, plaintext: bytes, info: bytes, aad: bytes
    ) -> bytes:
        """Seal an envelope; with a secret its ephemeral key is derived (deterministic)."""
        if self._key is None:
            return seal(recipient, plaintext, info, aad)
        label = b"ephemeral" + _length_prefixed(what) + index.to_bytes(8, "big")
        return seal(
            recipient,
            plaintext,
            info,
            aad,
            ephemeral_seed=hkdf_sha256(self._key, _DERIVE_LABEL, label, 32),
        )


class DeviceClient:
    """A participant's side of the protocol; ``send`` delivers bytes to C and returns its reply.

    A participant is one device (a phone) or a pool of ``devices`` devices that registers,
    posts and fetches as one party under one id: every post carries exactly
    ``devices × items_per_device`` items (real items plus zero-valued dummies), in a random order.

    With ``secret`` (32 bytes the participant persists), every random choice of a request is
    derived from it (see :class:`_Choices`): a participant restarted after a crash rebuilds the
    same requests byte for byte, and the servers count the resend as a replay. Servers then see
    that two identical requests are identical — nothing else. Without it, choices are fresh
    (``os.urandom``) and only this object's own resends are byte-identical.
    """

    def __init__(
        self,
        device_id: bytes,
        deployment: Deployment,
        send: Callable[[bytes], bytes],
        directory_cache: dict[int, SlotTable] | None = None,
        devices: int = 1,
        secret: bytes | None = None,
    ) -> None:
        """``directory_cache`` may be shared by the clients of one process (the directory is
        public and identical for everyone), so it is fetched once per round.

        Raises:
            WrongLength: a malformed id or secret.
            SecureSumError: ``devices`` < 1.
        """
        _check_device_id(device_id)
        if devices < 1:
            raise SecureSumError(f"a participant hosts at least one device, got devices={devices}")
        if secret is not None and len(secret) != PARTICIPANT_SECRET_BYTES:
            raise WrongLength(
                f"participant secret must be {PARTICIPANT_SECRET_BYTES} bytes, got {len(secret)}"
            )
        self.device_id = device_id
        self.deployment = deployment
        self.codec = deployment.codec
        self.devices = devices
        self._send = send
        self._secret = secret
        self._secrets: dict[int, bytes] = {}  # fetch secret per round
        self._directory: dict[int, SlotTable] = {} if directory_cache is None else directory_cache
        self._aggregate_tables: dict[tuple[int, str], SlotTable] = {}
        self._outbox: dict[tuple[int, str], bytes] = {}
        #: every request built, by what it asks for, so a retry resends the same bytes
        self._registrations: dict[tuple[int, bytes], bytes] = {}  # (round, slot list)
        self._fetches: dict[tuple[int, str, bytes], bytes] = {}  # (round, phase, slot list)
        self._registered: dict[int, int] = {}  # slots registered (acknowledged) per round
        if deployment.mode is Mode.PLAINTEXT:
            _warn_plaintext("device")

    def forget_before(self, round_id: int) -> None:
        """Drop what this client remembers of rounds older than ``round_id`` (their requests,
        fetch secrets and directories): a long run must not keep every day in memory."""
        for table in (self._secrets, self._directory, self._registered):
            for r in [r for r in table if r < round_id]:
                del table[r]
        for keyed in (self._aggregate_tables, self._outbox, self._registrations, self._fetches):
            for key in [k for k in keyed if k[0] < round_id]:
                del keyed[key]

    def _choices(self, round_id: int, phase: str, purpose: bytes, content: bytes) -> _Choices:
        return _Choices(
            self._secret, self.deployment, self.device_id, round_id, phase, purpose, content
        )

    def _fetch_secret(self, round_id: int) -> bytes | None:
        """This round's fetch secret: remembered, or re-derived from the participant secret."""
        secret = self._secrets.get(round_id)
        if secret is None and self._secret is not None:
            choices = self._choices(round_id, "", b"registration-secret", b"")
            secret = self._secrets[round_id] = choices.take(b"fetch-secret", SECRET_BYTES)
        return secret

    def build_registration(self, round_id: int, rpis: bytes | Sequence[bytes]) -> bytes:
        """The registration request for this participant's beacons (RPIs, or their
        concatenation) in a round (no sending).

        Rebuilding it for the same RPIs gives the same bytes (remembered here; re-derived by a
        participant with a secret).

        Raises:
            WrongLength: an RPI is not 16 bytes.
        """
        if not isinstance(rpis, bytes) and any(len(r) != RPI_BYTES for r in rpis):
            raise WrongLength(f"RPI must be {RPI_BYTES} bytes")
        joined = rpis if isinstance(rpis, bytes) else b"".join(rpis)
        slot_ids = pseudonym_slots(joined, round_id, self.deployment.deployment_key)
        known = self._registrations.get((round_id, slot_ids))
        if known is not None:
            return known
        secret = self._fetch_secret(round_id)
        if secret is None:
            secret = self._secrets[round_id] = os.urandom(SECRET_BYTES)
        digest = hashlib.sha256(slot_ids).digest()
        aad = post_header(self.device_id, round_id, "")
        choices = self._choices(round_id, "", b"register", slot_ids)
        sealed = choices.seal(
            b"register", 0, self.deployment.aggregator_public, secret + digest, INFO_REGISTER, aad
        )
        raw = RegisterRequest(self.device_id, round_id, slot_ids, sealed).to_bytes()
        self._registrations[(round_id, slot_ids)] = raw
        return raw

    def padding_beacons(self, round_id: int, count: int) -> bytes:
        """``count`` dummy beacons (16 random-looking bytes each, concatenated) to register
        beside real ones, so that every device registers the same number of slots (in a run
        with pilots, a simulated device pads the intervals of a physical radio it does not
        have). Nobody hears a dummy, so its slot sums to zero. Derived from the participant's
        secret like every choice of a request: a restarted participant registers the same."""
        if count < 0:
            raise SecureSumError(f"count must be >= 0, got {count}")
        choices = self._choices(round_id, "", b"padding-beacons", count.to_bytes(8, "big"))
        return choices.take(b"beacons", RPI_BYTES * count)

    def register(self, round_id: int, rpis: bytes | Sequence[bytes]) -> list[bytes]:
        """Register the pseudonym slots of this participant's beacons (RPIs) for a round;
        returns the slot ids (:meth:`register_ids` returns them as one ``bytes``).

        A participant registers once per round (all its devices' beacons together); calling
        this again with the same RPIs resends the identical request, which C answers again.

        Raises:
            RegistrationError: A's acknowledgement does not verify (C cannot forge it), or
                (:class:`AlreadyRegistered`) another slot list was registered this round.
        """
        return [bytes(r) for r in as_id_matrix(self.register_ids(round_id, rpis))]

    def register_ids(self, round_id: int, rpis: bytes | Sequence[bytes]) -> bytes:
        """:meth:`register`, returning the slot ids concatenated (a pool registers thousands:
        no Python object per slot)."""
        raw = self.build_registration(round_id, rpis)
        slot_ids = RegisterRequest.from_bytes(raw).slot_ids
        resp = RegisterResponse.from_bytes(self._send(raw))
        secret = self._secrets[round_id]
        aad = post_header(self.device_id, round_id, "")
        ack = box_open(secret, resp.ack_from_a, INFO_REGISTER_ACK, aad)
        if ack != b"registered" + hashlib.sha256(slot_ids).digest():
            raise RegistrationError("the aggregator acknowledged a different slot list")
        self._registered[round_id] = len(slot_ids) // SLOT_ID_BYTES
        return slot_ids

    def directory(self, round_id: int) -> SlotTable:
        """The round's registered pseudonym slots (cached after the first request)."""
        if round_id not in self._directory:
            resp = DirectoryResponse.from_bytes(self._send(DirectoryRequest(round_id).to_bytes()))
            self._directory[round_id] = SlotTable(resp.slot_ids)
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
        slots: bytes | Sequence[bytes | str],
        values: npt.ArrayLike,
    ) -> bytes:
        """Encode, pad, order, share and seal a post (no sending): the bytes to send to C.

        ``slots`` are slot ids (or aggregate slot names), or their ids concatenated in one
        ``bytes`` (a pool's day: no Python object per item). ``values`` has one row of ``dim``
        per slot; at most ``devices × items_per_device`` rows.
        Missing rows are zero-valued dummies to random slots of the phase, so every post of
        this participant has the same size and item count; the items are then put in a random
        order, so positions reveal neither which items are dummies nor which device of a pool
        posted which.

        Raises:
            WrongLength: wrong shape, or more items than ``devices × items_per_device``.
            EncodingError: a value outside the codec's range.
        """
        p = spec.phase(phase)
        n_items = self.devices * p.items_per_device
        real = as_id_matrix(
            slots
            if isinstance(slots, bytes)
            else [aggregate_slot(s) if isinstance(s, str) else s for s in slots]
        )
        x = np.asarray(values, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != p.dim or x.shape[0] != len(real):
            raise WrongLength(
                f"values must have shape ({len(real)}, {p.dim}) for phase {phase!r}, got {x.shape}"
            )
        if len(real) > n_items:
            raise WrongLength(
                f"{len(real)} items exceed items_per_device={p.items_per_device} × "
                f"devices={self.devices} of {phase!r}"
            )
        check_item_count(n_items, p.items_per_device, phase)
        pool = self._slot_pool(spec, p)
        # checked here too: in shuffled mode C cannot see slots, and a bad item would only be
        # dropped silently by the receiving server at close
        real_idx = pool.lookup(real)
        encoded_real = self.codec.encode(x).astype(np.int64)
        if self.deployment.mode is Mode.DENSE:
            return self._dense_post(spec.round_id, p, pool, real_idx, encoded_real).to_bytes()
        n_dummy = n_items - len(real)
        if n_dummy and not pool:
            raise WrongLength(f"phase {phase!r} has no slots to pad with dummies")
        content = b"".join(
            (n_items.to_bytes(4, "big"), real.tobytes(), encoded_real.astype("<i8").tobytes())
        )
        choices = self._choices(spec.round_id, phase, b"post", content)
        pick = np.frombuffer(choices.take(b"dummy-slots", 8 * n_dummy), dtype="<u8")
        pick = (pick % np.uint64(max(len(pool), 1))).astype(np.int64)
        ids = np.concatenate([real, pool.id_matrix()[pick]]) if n_dummy else real
        encoded = np.zeros((n_items, p.dim), dtype=np.int64)
        encoded[: len(real)] = encoded_real
        order = np.argsort(
            np.frombuffer(choices.take(b"item-order", 8 * n_items), dtype="<u8"), kind="stable"
        )
        slot_ids, encoded = np.ascontiguousarray(ids[order]).tobytes(), encoded[order]
        rid = spec.round_id
        if self.deployment.mode is Mode.SHUFFLED:
            return self._shuffled_post(rid, phase, slot_ids, encoded, choices).to_bytes()
        if self.deployment.mode is Mode.PLAINTEXT:
            share_c, sealed = encoded, b""
        else:
            seed = choices.take(b"mailbox-seed", SEED_BYTES)
            share_c = split_with_seed(encoded, seed)
            header = post_header(self.device_id, rid, phase)
            digest = hashlib.sha256(header + slot_ids).digest()
            a_pub = self.deployment.aggregator_public
            sealed = choices.seal(b"mailbox", 0, a_pub, seed + digest, INFO_MAILBOX, header)
        return MailboxPost(
            self.device_id, rid, phase, p.dim, slot_ids, share_c.astype("<i8").tobytes(), sealed
        ).to_bytes()

    def _dense_post(
        self,
        round_id: int,
        p: PhaseSpec,
        table: SlotTable,
        idx: npt.NDArray[np.int64],
        encoded: npt.NDArray[np.int64],
    ) -> MailboxPost:
        """One C-share of every slot of the phase, in the slot table's order: the participant's
        contributions summed per slot, zeros elsewhere, masked by one PRG seed sealed to A.
        Every participant's post covers every slot, so neither server learns which slots it
        contributed to, nor how many. It names the slots of an aggregate phase (public names,
        the same in every post) and none of a pseudonym phase (the agreed directory, by
        position: :func:`dense_slot_ids`)."""
        n_slots = len(table)
        words = n_slots * p.dim
        if words > MAX_DENSE_WORDS:
            raise WrongLength(
                f"a dense post of phase {p.name!r} holds {n_slots} slots × dim {p.dim} = {words} "
                f"words, more than MAX_DENSE_WORDS={MAX_DENSE_WORDS}: use mailbox or shuffled "
                "mode for this many slots"
            )
        dense = np.zeros((n_slots, p.dim), dtype=np.int64)
        np.add.at(dense, idx, encoded)  # int64 additions wrap modulo 2^64: the ring's sum
        # derived from everything posted, as a mailbox post's seed is: a resend is identical
        content = b"".join((b"dense", idx.astype("<i8").tobytes(), encoded.astype("<i8").tobytes()))
        choices = self._choices(round_id, p.name, b"post", content)
        seed = choices.take(b"mailbox-seed", SEED_BYTES)
        header = post_header(self.device_id, round_id, p.name)
        names = dense_slot_ids(p, table)
        digest = hashlib.sha256(header + names).digest()
        a_pub = self.deployment.aggregator_public
        sealed = choices.seal(b"mailbox", 0, a_pub, seed + digest, INFO_MAILBOX, header)
        mask_in_place(dense, seed)  # the C-share, without copying megabytes
        return MailboxPost(
            self.device_id,
            round_id,
            p.name,
            p.dim,
            names,
            dense.astype("<i8", copy=False).tobytes(),
            sealed,
        )

    def _shuffled_post(
        self,
        round_id: int,
        phase: str,
        slot_ids: bytes,
        encoded: npt.NDArray[np.int64],
        choices: _Choices,
    ) -> ShuffledPost:
        n = encoded.shape[0]
        seed_bytes = choices.take(b"item-seeds", SEED_BYTES * n)
        seeds = [seed_bytes[i * SEED_BYTES : (i + 1) * SEED_BYTES] for i in range(n)]
        cids = self._new_cids(n, choices)
        share_c = split_rows(encoded, seeds).astype("<i8")
        aad = phase_aad(round_id, phase)
        c_pub, a_pub = self.deployment.coordinator_public, self.deployment.aggregator_public
        slot = [slot_ids[i * SLOT_ID_BYTES : (i + 1) * SLOT_ID_BYTES] for i in range(n)]
        # one public-key seal per item and server is inherent to shuffled mode
        inner_c = b"".join(
            choices.seal(
                b"item-for-c", i, c_pub, cids[i] + slot[i] + share_c[i].tobytes(), INFO_ITEM_C, aad
            )
            for i in range(n)
        )
        items_a = tuple(
            choices.seal(b"item-for-a", i, a_pub, cids[i] + slot[i] + seeds[i], INFO_ITEM_A, aad)
            for i in range(n)
        )
        header = post_header(self.device_id, round_id, phase)
        outer = choices.seal(b"outer", 0, a_pub, inner_c, INFO_OUTER, header)
        return ShuffledPost(self.device_id, round_id, phase, outer, items_a)

    def _new_cids(self, n: int, choices: _Choices) -> list[bytes]:
        """Random (or secret-derived) contribution ids: they must carry nothing about the sender."""
        raw = choices.take(b"contribution-ids", CID_BYTES * n)
        return [raw[i * CID_BYTES : (i + 1) * CID_BYTES] for i in range(n)]

    def post(
        self,
        spec: RoundSpec,
        phase: str,
        slots: bytes | Sequence[bytes | str],
        values: npt.ArrayLike,
    ) -> bool:
        """Build, remember and send a post; returns False if C saw it already (a replay)."""
        return self._deliver(self.stage(spec, phase, slots, values))

    def stage(
        self,
        spec: RoundSpec,
        phase: str,
        slots: bytes | Sequence[bytes | str],
        values: npt.ArrayLike,
    ) -> bytes:
        """Build and remember a post without sending it; :meth:`resend` sends it (a pool
        sends one participant's post while it builds the next)."""
        raw = self.build_post(spec, phase, slots, values)
        self._outbox[(spec.round_id, phase)] = raw
        return raw

    def resend(self, round_id: int, phase: str) -> bool:
        """Retry the remembered post byte for byte (safe: C counts it once).

        Raises:
            PhaseError: this participant has not posted in that round and phase.
        """
        raw = self._outbox.get((round_id, phase))
        if raw is None:
            raise PhaseError(f"no post to resend for round {round_id} phase {phase!r}")
        return self._deliver(raw)

    def _deliver(self, raw: bytes) -> bool:
        return bool(PostReceipt.from_bytes(self._send(raw)).fresh)

    def build_fetch(
        self, round_id: int, phase: str, slot_ids: Sequence[bytes] | None = None
    ) -> bytes:
        """The fetch request for the totals of this participant's slot groups (no sending):
        those of ``slot_ids``, or with ``None`` every slot it registered this round (the
        request then names none: 8 bytes a slot fewer each way).

        One fetch per (participant, round, phase) is answered: name every slot wanted in one
        request. Rebuilding it for the same slots gives the same bytes, which the servers answer
        again (a retry after a lost reply or a restart).

        Raises:
            TypeError: ``slot_ids`` is one ``bytes`` object instead of a sequence of ids.
            WrongLength: malformed ids, none, or more than ``MAX_SLOTS_PER_FETCH``.
            RegistrationError: no fetch secret for the round (not registered, no secret).
        """
        if isinstance(slot_ids, (bytes, bytearray)):
            raise TypeError(
                "slot_ids is a sequence of 8-byte slot ids, not one bytes object: "
                "wrap a single slot in a list"
            )
        raw_ids = (
            b""
            if slot_ids is None
            else fetch_slot_matrix(as_id_matrix(list(slot_ids)).tobytes()).tobytes()
        )
        if slot_ids is not None and not raw_ids:
            raise WrongLength("a fetch names at least one slot (None: every registered slot)")
        known = self._fetches.get((round_id, phase, raw_ids))
        if known is not None:
            return known
        secret = self._fetch_secret(round_id)
        if secret is None:
            raise RegistrationError(f"this participant registered no slots in round {round_id}")
        aad = fetch_aad(self.device_id, round_id, phase, raw_ids)
        tag = fetch_tag(secret, round_id, phase, raw_ids)
        choices = self._choices(round_id, phase, b"fetch", raw_ids)
        sealed = choices.seal(b"fetch", 0, self.deployment.aggregator_public, tag, INFO_FETCH, aad)
        raw = FetchRequest(self.device_id, round_id, phase, raw_ids, sealed).to_bytes()
        self._fetches[(round_id, phase, raw_ids)] = raw
        return raw

    def fetch(
        self, round_id: int, phase: str, slot_ids: Sequence[bytes] | None, group_slots: int = 1
    ) -> npt.NDArray[np.float64]:
        """Fetch and decode the totals of this participant's slot groups (the phase's
        ``group_slots``): shape ``(len(slot_ids) // group_slots, dim)``."""
        return self.codec.decode(self.fetch_ring(round_id, phase, slot_ids, group_slots))

    def fetch_ring(
        self, round_id: int, phase: str, slot_ids: Sequence[bytes] | None, group_slots: int = 1
    ) -> npt.NDArray[np.int64]:
        """Fetch the exact ring totals of this participant's slot groups: one int64 row per
        group, in order of each group's first slot in ``slot_ids`` (``None``: every slot it
        registered this round, in registration order). ``group_slots`` is the phase's
        (``PhaseSpec.group_slots``); the slots must make whole groups.

        Raises:
            NotRegistrant / UnknownSlot: a slot is not this participant's (nothing is released).
            PartialGroup: the slots name part of a group (nothing is released).
            AlreadyFetched: this participant fetched the phase with a different request.
            PhaseNotReleased: the phase's surviving set is not agreed yet.
            OverflowBoundError: a sum is withheld, or a total is out of range.
        """
        if slot_ids is None and round_id not in self._registered:
            raise RegistrationError(f"this participant registered no slots in round {round_id}")
        count = self._registered[round_id] if slot_ids is None else len(slot_ids)
        if group_slots < 1 or count % group_slots:
            raise PartialGroup(f"{count} slot(s) do not make whole groups of {group_slots}")
        raw = self.build_fetch(round_id, phase, slot_ids)
        raw_ids = FetchRequest.from_bytes(raw).slot_ids
        n = count // group_slots
        resp = FetchResponse.from_bytes(self._send(raw))
        aad = fetch_aad(self.device_id, round_id, phase, raw_ids)
        a = box_open(self._secrets[round_id], resp.box_from_a, INFO_FETCH_REPLY, aad)
        c_sum = np.frombuffer(resp.share_sum_c, dtype="<i8").astype(np.int64)
        a_sum = np.frombuffer(a, dtype="<i8").astype(np.int64)
        if c_sum.shape != a_sum.shape or c_sum.size == 0 or c_sum.size % n:
            raise WrongLength(
                f"the servers' share sums ({c_sum.size} and {a_sum.size} words) do not form "
                f"{n} equal rows"
            )
        # the participant is not told the counts; max_summands bounds any honest sum
        return self.codec.check_sum((c_sum + a_sum).reshape(n, -1))


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
        deployment_key: bytes | None = None,
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
            # a fresh secret key unless given one (b"": a deployment of aggregate slots only)
            os.urandom(DEPLOYMENT_KEY_BYTES) if deployment_key is None else deployment_key,
        )
        self.tap = tap
        #: the simulated participants share the public slot directory (fetched once per round)
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

    def device(
        self, device_id: bytes | None = None, devices: int = 1, secret: bytes | None = None
    ) -> DeviceClient:
        """A new participant client (random 16-byte id unless given) linked to C, hosting
        ``devices`` devices, deterministic if given a ``secret``."""
        did = device_id if device_id is not None else os.urandom(DEVICE_ID_BYTES)

        def send(raw: bytes) -> bytes:
            resp = self.coordinator.handle_device(raw, did)
            if self.tap:
                self.log.append(("device->c", raw, resp))
            return resp

        return DeviceClient(did, self.deployment, send, self.directory_cache, devices, secret)

    def open_round(self, spec: RoundSpec) -> None:
        """Both operators open the round (A from its own copy; C checks they match)."""
        self.aggregator.open_round(spec)
        self.coordinator.open_round(spec)
